"""The one parametrization every method is a case of: ``W_eff = M ⊙ (W0 + ΔW)``.

It is a ``torch.nn.utils.parametrize`` parametrization on a layer's ``weight``, so:

* the layer keeps its class (HF ``save_pretrained`` works after merging);
* the mask (a bool buffer), the update ΔW and any learned scores are submodules of the layer,
  hence in ``state_dict``, moved by ``.to(device)`` and replicated by DDP with no extra code;
* :func:`merge_` (``remove_parametrizations(leave_parametrized=True)``) bakes ``W_eff`` into
  a plain weight.

Everything works on the ``[out, in]`` view; HF ``Conv1D`` weights are transposed in and out.

Two pluggable pieces, both optional ``nn.Module``s:

* ``delta()`` returns ΔW (``[out, in]``), e.g. a LoRA product;
* ``score(w)`` returns importance scores given the dense ``W0 + ΔW``. When present, the mask
  is a straight-through estimator (:class:`StraightThroughMask`): its value is exactly ``M``
  but ``∂L/∂S = ∂L/∂W' ⊙ W`` (movement pruning, PST). Without it the mask is a
  constant and pruned weights get exactly zero gradient. A score of the form
  ``|W| + f(θ)`` (PST) may set ``magnitude_term = True`` and compute ``|W|`` without
  autograd: the mask then adds that term's gradient ``sgn(W) ⊙ ∂L/∂S = ∂L/∂W' ⊙ |W|`` itself,
  one full-size temporary instead of four.

Masking is ``where(M, W, 0)``, computed on the weights' bits (:mod:`sparseft.sparse.masking`: no branch
per entry, no float copy of the mask): a pruned weight that is inf or NaN contributes 0, not NaN.

A mask can also be *held* in ``W0`` itself (:mod:`sparseft.sparse.inplace`): with ``W0`` kept
exactly zero where ``M = 0``, ``M ⊙ W0 = W0`` and the forward returns the stored weight as it is,
the plain dense forward (only a layer without ΔW and scores).

**The update on the input side.** While no mask applies (``M = 1``: no mask yet, or a layer made
with ``masked=False``, which has none at all) and there are no scores,
``x·(W0 + ΔW)ᵀ = x·W0ᵀ + x·ΔWᵀ``: the parametrization returns ``W0`` as it is and a forward hook
on the layer adds ``x·ΔWᵀ`` from the input (:meth:`~sparseft.sparse.deltas.WeightDelta.on_input`):

    y = x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ        (LoRA; PEFT's forward, operation for operation)

No ``W0 + B·A`` is formed and autograd saves ``x`` and the rank-r intermediate, not a full-size
weight. The first mask set (:meth:`SparseLayer.set_mask_`, or a loaded mask that prunes) moves the
update into the weight, ``M ⊙ (W0 + ΔW)``, for good: DSEE before its pruning is LoRA's cost,
after it the masking forward's results as before. Meanwhile ``module.weight`` is ``W0``:
:meth:`SparseLayer.weight` is the effective weight whichever side ΔW is on, and :func:`merge_`
bakes ``W0 + ΔW`` in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparseft.sparse.deltas import add_delta, on_input
from sparseft.sparse.layers import LinearLayer, as_out_in, find_linear_layers
from sparseft.sparse.masking import apply_mask, masked


class SparseWeight(nn.Module):
    """Parametrization ``W_eff = M ⊙ (W0 + ΔW)`` of one linear weight.

    Args:
        shape: ``(out_features, in_features)``.
        transposed: the stored weight is ``[in, out]`` (HF ``Conv1D``).
        delta: module whose ``forward()`` returns ΔW, or None.
        score: module whose ``forward(w)`` returns scores for the straight-through mask, or None.
        masked: False for a layer that is never masked (``M = 1`` always, LoRA): no mask buffer.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        transposed: bool = False,
        delta: nn.Module | None = None,
        score: nn.Module | None = None,
        masked: bool = True,
    ) -> None:
        super().__init__()
        self.transposed = transposed
        self.delta = delta
        self.score = score
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool) if masked else None)
        self.mask_from_scores: Callable[[torch.Tensor], torch.Tensor] | None = None
        #: ``W0`` holds the mask's zeros, so ``W_eff = W0`` (:func:`sparseft.sparse.inplace.hold_` sets it;
        #: a new mask clears it). Not saved: a loaded ``W0`` holds whatever zeros it was saved with.
        self.held = False
        #: ΔW is applied to the layer's input (``M = 1``; see the module docstring); a mask set clears it.
        self.update_on_input = delta is not None and score is None

    def dense(self, stored: torch.Tensor) -> torch.Tensor:
        """``W0 + ΔW`` as ``[out, in]``, before masking."""
        return add_delta(as_out_in(stored, self.transposed), self.delta)

    def refresh_mask_on_forward(self, select: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Have the next forward set the mask to ``select(scores)`` from the scores it computes.

        The straight-through forward computes ``score(W0 + ΔW)`` anyway; a method whose mask is
        a selection of exactly those scores (PST's top-k, recomputed at every step) then pays
        for the scores once per step instead of twice. The next forward (with or without
        gradient) applies it once; later forwards reuse the mask until the next request.
        """
        if self.score is None:
            raise ValueError("only a layer with a score module can take its mask from the forward's scores")
        self.mask_from_scores = select

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        if self.held or self.update_on_input:  # W0 = M ⊙ W0 already, or ΔW applied to the input (M = 1)
            return stored
        weight = self.dense(stored)
        if self.mask is None:
            return as_out_in(weight, self.transposed)
        tracking = torch.is_grad_enabled()
        if self.score is None or (not tracking and self.mask_from_scores is None):  # scores only carry gradient
            return as_out_in(apply_mask(weight, self.mask), self.transposed)
        scores = self.score(weight)
        if self.mask_from_scores is not None:
            self.mask.copy_(self.mask_from_scores(scores.detach()))
            self.mask_from_scores = None
        if tracking:
            magnitude_term = bool(getattr(self.score, "magnitude_term", False))
            masked = StraightThroughMask.apply(weight, scores, self.mask, magnitude_term)
        else:
            masked = apply_mask(weight, self.mask)
        return as_out_in(masked, self.transposed)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """A loaded mask that prunes moves ΔW into the weight (as setting it does). An all-ones mask saved
        for a layer that now has none (DSEE at sparsity 0 before masks became optional) is ``M = 1``: dropped."""
        key = f"{prefix}mask"
        if self.mask is None and key in state_dict and bool(state_dict[key].all()):
            state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)
        if self.mask is not None and not bool(self.mask.all()):
            self.update_on_input = False


def add_update_on_input(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook of a parametrized layer: ``y + x·ΔWᵀ`` while its update is on the input side."""
    param = module.parametrizations.weight[0]
    if not param.update_on_input:
        return None
    return output + on_input(args[0], param.delta)


class StraightThroughMask(torch.autograd.Function):
    """``W' = M ⊙ W`` whose backward treats the mask as the identity of the scores.

    Gives ``∂L/∂W = ∂L/∂W' ⊙ M`` and ``∂L/∂S = ∂L/∂W' ⊙ W``: the same as
    ``W ⊙ (M + S − stop_grad(S))``, without its three full-size temporaries. With
    ``magnitude_term`` the scores are ``|W| + f(θ)`` computed without autograd through ``|W|``,
    and ``∂L/∂W`` also gets that term's share, ``sgn(W) ⊙ ∂L/∂S = ∂L/∂W' ⊙ |W|`` (PST's U·V
    learn through both ``M ⊙ W`` and ``|W|``).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, weight: torch.Tensor, scores: torch.Tensor,
                mask: torch.Tensor, magnitude_term: bool) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.magnitude_term = magnitude_term
        return masked(weight, mask)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, mask = ctx.saved_tensors
        if ctx.magnitude_term:  # ∂L/∂W' ⊙ (|W| + M), in one buffer
            return weight.abs().mul_(grad).addcmul_(grad, mask), grad * weight, None, None
        return masked(grad, mask), grad * weight, None, None


@dataclass(frozen=True)
class SparseLayer:
    """A target layer together with its attached parametrization."""

    layer: LinearLayer
    param: SparseWeight

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def row_blocks(self) -> int:
        """Matrices fused in this layer (3 for a ``qkv`` projection): masks rank each separately."""
        return self.layer.fused_matrices

    @property
    def stored_weight(self) -> torch.Tensor:
        """The stored (trainable or frozen) ``W0`` in its original layout."""
        return self.layer.module.parametrizations.weight.original

    def dense(self) -> torch.Tensor:
        """``W0 + ΔW`` as ``[out, in]``."""
        return self.param.dense(self.stored_weight)

    @property
    def mask(self) -> torch.Tensor:
        """The keep-mask ``[out, in]``; all ones, built on demand, for a layer made with ``masked=False``."""
        if self.param.mask is None:
            device = self.stored_weight.device  # a weight still to be loaded (meta) has masks on the CPU
            return torch.ones(self.layer.shape, dtype=torch.bool, device=None if device.type == "meta" else device)
        return self.param.mask

    def weight(self) -> torch.Tensor:
        """The effective weight ``M ⊙ (W0 + ΔW)`` as ``[out, in]``, whichever side ΔW is applied on."""
        if self.param.update_on_input:
            return self.dense()
        return self.layer.weight()

    def set_mask_(self, keep: torch.Tensor) -> None:
        """Replace the keep-mask in place (same device, dtype bool).

        A held mask (:mod:`sparseft.sparse.inplace`) is released: ``W0`` holds the old mask's zeros, not
        the new one's, so the forward masks again until :func:`~sparseft.sparse.inplace.hold_` zeroes them.
        An update on the input side moves into the weight, where the mask applies to it.

        Raises:
            ValueError: the layer was made with ``masked=False``.
        """
        if self.param.mask is None:
            raise ValueError(f"layer {self.name!r} has no mask (made with masked=False): it is never pruned")
        self.param.mask.copy_(keep)
        self.param.held = False
        self.param.update_on_input = False


def attach(
    layer: LinearLayer,
    delta: nn.Module | None = None,
    score: nn.Module | None = None,
    freeze_base: bool = False,
    masked: bool = True,
) -> SparseLayer:
    """Register a :class:`SparseWeight` on ``layer`` (and, with a ΔW, the hook that applies it on the
    input side while no mask applies); optionally freeze ``W0``."""
    module = layer.module
    if parametrize.is_parametrized(module, "weight"):
        raise ValueError(f"layer {layer.name!r} is already sparsified: two strategies cannot share a layer")
    weight = module.weight
    param = SparseWeight(layer.shape, layer.transposed, delta, score, masked)
    # a backbone built on the meta device (sharded loading) gets a real mask, ΔW and scores, which FSDP2 shards
    # from these values, while W0 is read from the checkpoint shard by shard (sparseft.training.sharding); a
    # module that can set its start again once it has storage (``empty_start``) stays on the meta device too
    param.to(device=None if weight.is_meta else weight.device, dtype=weight.dtype)
    for part in (delta, score):
        if weight.is_meta and getattr(part, "empty_start", ()):
            part.to("meta")
    # on a meta W0 the consistency check would mix devices: a meta weight has a shape and nothing to check
    parametrize.register_parametrization(module, "weight", param, unsafe=weight.is_meta)
    if delta is not None:
        module.register_forward_hook(add_update_on_input)
    if freeze_base:
        module.parametrizations.weight.original.requires_grad_(False)
    return SparseLayer(layer, param)


def sparse_layers(model: nn.Module) -> list[SparseLayer]:
    """Every layer of ``model`` that carries a :class:`SparseWeight`, in module order."""
    found = []
    for layer in find_linear_layers(model):
        if parametrize.is_parametrized(layer.module, "weight"):
            param = layer.module.parametrizations.weight[0]
            if isinstance(param, SparseWeight):
                found.append(SparseLayer(layer, param))
    return found


def updates_into_weights_(model: nn.Module) -> list[SparseLayer]:
    """Move every update on the input side into its weight: ``module.weight`` is ``M ⊙ (W0 + ΔW)`` again,
    for code that reads effective weights outside the forward (reports, merging). Returns the layers."""
    layers = sparse_layers(model)
    for sparse in layers:
        sparse.param.update_on_input = False
    return layers


def merge_(model: nn.Module) -> int:
    """Bake ``M ⊙ (W0 + ΔW)`` into plain weights everywhere (an update on the input side included; its
    hook is removed); returns the number of layers merged."""
    layers = updates_into_weights_(model)
    for sparse in layers:
        module = sparse.layer.module
        with torch.no_grad():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        for key in [key for key, hook in module._forward_hooks.items() if hook is add_update_on_input]:
            del module._forward_hooks[key]
    return len(layers)

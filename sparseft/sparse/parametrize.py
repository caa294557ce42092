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

Masking is ``where(M, W, 0)``: no float copy of the mask per step, and a pruned weight that
is inf or NaN contributes 0, not NaN.

A mask can also be *held* in ``W0`` itself (:mod:`sparseft.sparse.inplace`): with ``W0`` kept
exactly zero where ``M = 0``, ``M ⊙ W0 = W0`` and the forward returns the stored weight as it is,
the plain dense forward (only a layer without ΔW and scores).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparseft.sparse.deltas import add_delta
from sparseft.sparse.layers import LinearLayer, as_out_in, find_linear_layers


class SparseWeight(nn.Module):
    """Parametrization ``W_eff = M ⊙ (W0 + ΔW)`` of one linear weight.

    Args:
        shape: ``(out_features, in_features)``.
        transposed: the stored weight is ``[in, out]`` (HF ``Conv1D``).
        delta: module whose ``forward()`` returns ΔW, or None.
        score: module whose ``forward(w)`` returns scores for the straight-through mask, or None.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        transposed: bool = False,
        delta: nn.Module | None = None,
        score: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.transposed = transposed
        self.delta = delta
        self.score = score
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool))
        self.mask_from_scores: Callable[[torch.Tensor], torch.Tensor] | None = None
        #: ``W0`` holds the mask's zeros, so ``W_eff = W0`` (:func:`sparseft.sparse.inplace.hold_` sets it;
        #: a new mask clears it). Not saved: a loaded ``W0`` holds whatever zeros it was saved with.
        self.held = False

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
        if self.held:  # W0 = M ⊙ W0 already: the dense forward and backward, nothing to mask
            return stored
        weight = self.dense(stored)
        tracking = torch.is_grad_enabled()
        if self.score is None or (not tracking and self.mask_from_scores is None):  # scores only carry gradient
            return as_out_in(torch.where(self.mask, weight, 0.0), self.transposed)
        scores = self.score(weight)
        if self.mask_from_scores is not None:
            self.mask.copy_(self.mask_from_scores(scores.detach()))
            self.mask_from_scores = None
        if tracking:
            magnitude_term = bool(getattr(self.score, "magnitude_term", False))
            masked = StraightThroughMask.apply(weight, scores, self.mask, magnitude_term)
        else:
            masked = torch.where(self.mask, weight, 0.0)
        return as_out_in(masked, self.transposed)


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
        return torch.where(mask, weight, 0.0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, mask = ctx.saved_tensors
        if ctx.magnitude_term:  # ∂L/∂W' ⊙ (|W| + M), in one buffer
            grad_weight = weight.abs().mul_(grad).addcmul_(grad, mask)
        else:
            grad_weight = torch.where(mask, grad, 0.0)
        return grad_weight, grad * weight, None, None


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
        return self.param.mask

    def set_mask_(self, keep: torch.Tensor) -> None:
        """Replace the keep-mask in place (same device, dtype bool).

        A held mask (:mod:`sparseft.sparse.inplace`) is released: ``W0`` holds the old mask's zeros, not
        the new one's, so the forward masks again until :func:`~sparseft.sparse.inplace.hold_` zeroes them.
        """
        self.param.mask.copy_(keep)
        self.param.held = False


def attach(
    layer: LinearLayer,
    delta: nn.Module | None = None,
    score: nn.Module | None = None,
    freeze_base: bool = False,
) -> SparseLayer:
    """Register a :class:`SparseWeight` on ``layer``; optionally freeze ``W0``."""
    module = layer.module
    if parametrize.is_parametrized(module, "weight"):
        raise ValueError(f"layer {layer.name!r} is already sparsified: two strategies cannot share a layer")
    weight = module.weight
    param = SparseWeight(layer.shape, layer.transposed, delta, score).to(device=weight.device, dtype=weight.dtype)
    parametrize.register_parametrization(module, "weight", param)
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


def merge_(model: nn.Module) -> int:
    """Bake ``M ⊙ (W0 + ΔW)`` into plain weights everywhere; returns the number of layers merged."""
    layers = sparse_layers(model)
    for sparse in layers:
        with torch.no_grad():
            parametrize.remove_parametrizations(sparse.layer.module, "weight", leave_parametrized=True)
    return len(layers)

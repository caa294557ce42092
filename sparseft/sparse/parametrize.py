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
  constant and pruned weights get exactly zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

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

    def dense(self, stored: torch.Tensor) -> torch.Tensor:
        """``W0 + ΔW`` as ``[out, in]``, before masking."""
        weight = as_out_in(stored, self.transposed)
        return weight if self.delta is None else weight + self.delta()

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        weight = self.dense(stored)
        if self.score is None or not torch.is_grad_enabled():  # the score only carries gradient
            masked = weight * self.mask
        else:
            masked = StraightThroughMask.apply(weight, self.score(weight), self.mask)
        return as_out_in(masked, self.transposed)


class StraightThroughMask(torch.autograd.Function):
    """``W' = M ⊙ W`` whose backward treats the mask as the identity of the scores.

    Gives ``∂L/∂W = ∂L/∂W' ⊙ M`` and ``∂L/∂S = ∂L/∂W' ⊙ W``: the same as
    ``W ⊙ (M + S − stop_grad(S))``, without its three full-size temporaries.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, weight: torch.Tensor, scores: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        return weight * mask

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weight, mask = ctx.saved_tensors
        return grad * mask, grad * weight, None


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
        """Replace the keep-mask in place (same device, dtype bool)."""
        self.param.mask.copy_(keep)


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

"""Masks held in the weights: ``W0`` kept exactly zero where ``M = 0``, so the forward is the dense one.

The parametrization computes ``W_eff = where(M, W0, 0)`` in every forward and ``where(M, ∂L/∂W_eff, 0)``
in every backward: two full-size passes and a full-size temporary per layer and step, on top of the
matmuls. When a weight once pruned never returns — the mask is static (SPDF), or its scores include
the mask (magnitude's ``|W| ⊙ M``) — the zeros can be stored instead (as Cerebras' static sparsity
and ``torch.ao.pruning`` do):

* :func:`hold_`: ``W0 ← M ⊙ W0``, then the parametrization returns ``W0`` as it is (``held``);
* before every optimizer step, :func:`mask_gradients_`: ``∂L/∂W0 ← M ⊙ ∂L/∂W0``, the gradient the
  parametrization's backward gives (so gradient clipping, Adam's moments and the kept weights come
  out the same, bit for bit);
* after every optimizer step, :func:`mask_weights_`: ``W0 ← M ⊙ W0`` (moments of weights pruned by
  an earlier update still decay, and would move them; any optimizer is covered).

Two in-place passes per optimizer step, no temporary: a training step costs what the dense one does,
plus those passes. What differs from the parametrized run is only ``W0`` where pruned: 0 instead of a
value no computation reads. A new mask (``SparseLayer.set_mask_``) releases the hold until
:func:`hold_` zeroes the newly pruned weights.

Under FSDP2 each rank writes the rows of ``W0`` (and of its gradient) that it holds; the mask's
matching rows are cached until the mask changes. Call :func:`hold_` and the masking functions outside
:func:`~sparseft.sparse.sharding.whole_parameters` (a gathered copy's writes are dropped).

Plain PyTorch: a training loop calls :func:`hold_` once, then :func:`mask_gradients_` before and
:func:`mask_weights_` after every ``optimizer.step()``.
"""

from __future__ import annotations

import torch

from sparseft.sparse.layers import as_out_in
from sparseft.sparse.parametrize import SparseLayer
from sparseft.sparse.sharding import is_sharded, local_rows


def can_hold(layer: SparseLayer) -> bool:
    """Whether ``layer``'s mask can be held in ``W0``: no ΔW (``W_eff`` is ``M ⊙ W0`` alone) and no
    straight-through scores (they need ``W_eff``'s gradient, which only the masking forward gives)."""
    return layer.param.delta is None and layer.param.score is None


def stored_keep(layer: SparseLayer) -> torch.Tensor:
    """The keep-mask as ``W0`` is stored (``[in, out]`` for HF ``Conv1D``), only the rows this rank holds
    of a sharded ``W0``; contiguous. Built again only when the mask changes (version or storage)."""
    mask, stored = layer.mask, layer.stored_weight
    keep = as_out_in(mask, layer.layer.transposed)
    if not is_sharded(stored) and keep.is_contiguous():
        return keep
    key = (mask.data_ptr(), mask._version, stored.device)
    cached = getattr(layer.param, "_stored_keep", None)
    if cached is None or cached[0] != key:
        keep = local_rows(keep, stored) if is_sharded(stored) else keep.contiguous()
        layer.param._stored_keep = cached = (key, keep)
    return cached[1]


def zero_pruned_(target: torch.Tensor, keep: torch.Tensor) -> None:
    """``target ← where(keep, target, 0)`` in place; ``keep`` in ``target``'s layout (this rank's rows of a
    sharded ``target``). NaN and inf where pruned become 0."""
    local = target.to_local() if is_sharded(target) else target
    torch.where(keep, local, local.new_zeros(()), out=local)


@torch.no_grad()
def hold_(layers: list[SparseLayer]) -> None:
    """``W0 ← M ⊙ W0`` and have every layer's forward return ``W0`` itself.

    Raises:
        ValueError: a layer has ΔW or scores (:func:`can_hold`).
    """
    for layer in layers:
        if not can_hold(layer):
            raise ValueError(f"layer {layer.name}: a mask with ΔW or scores is applied in the forward, not held")
        zero_pruned_(layer.stored_weight, stored_keep(layer))
        layer.param.held = True


def release_(layers: list[SparseLayer]) -> None:
    """Mask in the forward again (``W_eff = where(M, W0, 0)``), whatever ``W0`` holds where pruned."""
    for layer in layers:
        layer.param.held = False


@torch.no_grad()
def mask_gradients_(layers: list[SparseLayer]) -> None:
    """``∂L/∂W0 ← where(M, ∂L/∂W0, 0)``: pruned gradients exactly 0 (NaN becomes 0)."""
    for layer in layers:
        grad = layer.stored_weight.grad
        if grad is not None:
            zero_pruned_(grad, stored_keep(layer))


@torch.no_grad()
def mask_weights_(layers: list[SparseLayer]) -> None:
    """``W0 ← where(M, W0, 0)``."""
    for layer in layers:
        zero_pruned_(layer.stored_weight, stored_keep(layer))


@torch.no_grad()
def mask_optimizer_state_(layers: list[SparseLayer], optimizers: list[torch.optim.Optimizer]) -> None:
    """Every optimizer state tensor of ``W0``'s shape (Adam's moments) ``← M ⊙ state``: a pruned weight
    restarts from zero moments if it is ever trained again (SPDF's switch to dense)."""
    for layer in layers:
        weight, keep = layer.stored_weight, stored_keep(layer)
        for optimizer in optimizers:
            for value in optimizer.state.get(weight, {}).values():
                if torch.is_tensor(value) and value.shape == weight.shape:
                    zero_pruned_(value, keep)

"""Masks held in the weights: ``W0`` kept exactly zero where ``M = 0``, so the forward is the dense one.

The parametrization computes ``W_eff = where(M, W0, 0)`` in every forward and ``where(M, ∂L/∂W_eff, 0)``
in every backward: two full-size passes and a full-size temporary per layer and step, on top of the
matmuls. When a weight once pruned never returns — the mask is static (SPDF), or its scores include
the mask (magnitude's ``|W| ⊙ M``) — the zeros can be stored instead (as Cerebras' static sparsity
and ``torch.ao.pruning`` do):

* :func:`hold_`: ``W0 ← M ⊙ W0`` and ``s ← M ⊙ s`` for every optimizer state ``s`` of ``W0``'s shape
  (Adam's moments), then the parametrization returns ``W0`` as it is (``held``);
* before every optimizer step, :func:`mask_gradients_`: ``∂L/∂W0 ← M ⊙ ∂L/∂W0``, the gradient the
  parametrization's backward gives (so gradient clipping and the kept weights' moments and values
  come out the same, bit for bit);
* after every optimizer step, :func:`mask_weights_` (``W0 ← M ⊙ W0``) only for an optimizer that
  can move a weight whose gradient and state are 0 (:func:`pruned_stay_zero`): Muon's or Shampoo's
  update of a masked gradient is dense, AdamW's and SGD's is 0 where the gradient is.

One in-place pass per optimizer step with AdamW, none full-size allocated: a training step costs
what the dense one does, plus that pass. What differs from the masking run is only what no
computation reads: ``W0`` and its optimizer state where pruned (0 instead of stale values). A new
mask (``SparseLayer.set_mask_``) releases the hold until :func:`hold_` zeroes the newly pruned.

Under FSDP2 each rank writes the rows of ``W0`` (its gradient, its state) that it holds; the mask's
matching rows are cached until the mask changes. Call these functions outside
:func:`~sparseft.sparse.sharding.whole_parameters` (a gathered copy's writes are dropped).

Plain PyTorch: a training loop calls :func:`hold_` when a mask changes, :func:`mask_gradients_` before
every ``optimizer.step()`` and, unless :func:`pruned_stay_zero`, :func:`mask_weights_` after it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sparseft.sparse import masking
from sparseft.sparse.layers import as_out_in
from sparseft.sparse.parametrize import SparseLayer
from sparseft.sparse.sharding import is_sharded, local_part, local_rows


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
    """``target ← where(keep, target, 0)`` in place, bit for bit (:func:`sparseft.sparse.masking.zero_pruned_`);
    ``keep`` in ``target``'s layout (this rank's rows of a sharded ``target``)."""
    masking.zero_pruned_(local_part(target), keep)


#: Optimizers whose update is elementwise and 0 where the gradient and every state entry are 0 (weight
#: decay of a zero weight included): with them pruned weights stay 0 without masking after the step.
ELEMENTWISE_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD, torch.optim.NAdam,
                          torch.optim.RAdam, torch.optim.Adamax, torch.optim.RMSprop, torch.optim.Adagrad)


def pruned_stay_zero(optimizers: Iterable[torch.optim.Optimizer]) -> bool:
    """Whether every optimizer leaves a weight at 0 whose gradient and state are 0 (its exact class is
    one of :data:`ELEMENTWISE_OPTIMIZERS`; a subclass may change the update)."""
    return all(type(optimizer) in ELEMENTWISE_OPTIMIZERS for optimizer in optimizers)


@torch.no_grad()
def hold_(layers: list[SparseLayer], optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """``W0 ← M ⊙ W0`` and each of ``optimizers``' states of ``W0``'s shape likewise, and have every
    layer's forward return ``W0`` itself.

    Raises:
        ValueError: a layer has ΔW or scores (:func:`can_hold`).
    """
    for layer in layers:
        if not can_hold(layer):
            raise ValueError(f"layer {layer.name}: a mask with ΔW or scores is applied in the forward, not held")
    mask_weights_(layers)
    mask_optimizer_state_(layers, optimizers)
    for layer in layers:
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
def mask_optimizer_state_(layers: list[SparseLayer], optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Every optimizer state tensor of ``W0``'s shape (Adam's moments) ``← M ⊙ state``: a zero gradient
    then leaves a pruned weight at 0, and it restarts from zero moments if it is ever trained again
    (SPDF's switch to dense)."""
    optimizers = list(optimizers)
    for layer in layers:
        weight, keep = layer.stored_weight, stored_keep(layer)
        for optimizer in optimizers:
            for value in optimizer.state.get(weight, {}).values():
                if torch.is_tensor(value) and value.shape == weight.shape:
                    zero_pruned_(value, keep)

"""Static masks (chosen once, SPDF's sparse phase), keeping pruned entries exactly zero, and
removing the masks for dense training.

Plain PyTorch, no Lightning: a loop calls :func:`random_scores` / ``prune_`` once, then
:func:`mask_gradients_` before and :func:`mask_weights_and_state_` after every optimizer step,
and :func:`densify_` to train the pruned weights again.

What holds zeros where ``M = 0``, for a layer ``W_eff = M ⊙ W0``:

* ``W_eff``: always (the parametrization's ``where(M, W0, 0)``);
* ``∂L/∂W0``: exactly 0 by the same ``where`` (NaN and inf included); :func:`mask_gradients_`
  makes it explicit, as the reference does, so nothing added to the gradient later leaks in;
* under FSDP2 (sharded ``W0``, gradient and moments) each rank masks the rows it holds;
* ``W0`` and AdamW's ``exp_avg`` / ``exp_avg_sq``: 0 once zeroed, and kept there by the
  arithmetic when the gradient is 0 (``m ← β₁m + (1−β₁)·0``, ``W ← W(1 − ηλ) − η·0/(0+ε)``);
  :func:`mask_weights_and_state_` re-applies the mask after every step anyway, as Cerebras'
  static sparsity optimizer does, so another optimizer or a hand-edited weight cannot revive one.
"""

from __future__ import annotations

import hashlib
import re

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparseft.sparse.layers import as_out_in
from sparseft.sparse.parametrize import SparseLayer
from sparseft.sparse.prune import sparsify
from sparseft.sparse.sharding import is_sharded, masked_fill_local_

PARAMETRIZED_SUFFIX = ".parametrizations.weight.original"


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit seed from a run seed and a parameter name: the same on every rank and in every
    run, and independent of module order (SHA-256, not Python's salted ``hash``)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def random_scores(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform ``[0, 1)`` float64 scores for one parameter, seeded by :func:`parameter_seed`
    (Cerebras' ``init_method: random`` draws ``rng.random(shape)`` with a per-weight seed).
    The top ``1 − s`` of them is a uniformly random mask with an exact count."""
    generator = torch.Generator().manual_seed(parameter_seed(seed, name))
    return torch.rand(shape, generator=generator, dtype=torch.float64)


def stored_keep(layer: SparseLayer) -> torch.Tensor:
    """The keep-mask in the stored weight's layout (``[in, out]`` for HF ``Conv1D``)."""
    return as_out_in(layer.mask, layer.layer.transposed)


@torch.no_grad()
def mask_gradients_(layers: list[SparseLayer]) -> None:
    """``∂L/∂W0 ← where(M, ∂L/∂W0, 0)``: pruned gradients exactly 0 (NaN becomes 0)."""
    for layer in layers:
        grad = layer.stored_weight.grad
        if grad is not None:
            masked_fill_local_(grad, stored_keep(layer))


@torch.no_grad()
def mask_weights_and_state_(layers: list[SparseLayer], optimizers: list[torch.optim.Optimizer]) -> None:
    """``W0 ← M ⊙ W0`` and every optimizer state tensor of ``W0``'s shape (Adam's moments) likewise."""
    for layer in layers:
        weight, keep = layer.stored_weight, stored_keep(layer)
        masked_fill_local_(weight, keep)
        for optimizer in optimizers:
            for value in optimizer.state.get(weight, {}).values():
                if torch.is_tensor(value) and value.shape == weight.shape:
                    masked_fill_local_(value, keep)


@torch.no_grad()
def densify_(layers: list[SparseLayer]) -> None:
    """Remove the masks: ``W0`` zeroed where pruned becomes the layer's plain, fully trainable weight.

    The parameter object is kept (``leave_parametrized=False`` re-registers ``W0`` itself), so an
    optimizer and DDP that hold it keep working; the pruned entries restart from 0.

    Under FSDP2 (``W0`` sharded) the parametrization stays and its mask becomes all ones instead:
    FSDP2 registered ``W0`` as the parametrization's ``original`` and gathers it there for every
    forward, so removing the parametrization would leave the layer's weight out of the gathers.
    ``where(1, W0, 0)`` is ``W0`` bit for bit and so is its gradient, so training is dense all the
    same; the checkpoint keeps the all-ones masks, which merge (export) and a resume handle as any mask.
    """
    for layer in layers:
        weight, keep = layer.stored_weight, stored_keep(layer)
        masked_fill_local_(weight, keep)
        if is_sharded(weight):
            layer.set_mask_(torch.ones_like(layer.mask))
        else:
            parametrize.remove_parametrizations(layer.layer.module, "weight", leave_parametrized=False)


def sparse_names(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of the layers that a saved ``state_dict`` holds as ``M ⊙ W0`` parametrizations."""
    return [key[: -len(PARAMETRIZED_SUFFIX)] for key in state_dict if key.endswith(PARAMETRIZED_SUFFIX)]


def load_densified_(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Load a (possibly sparse) ``state_dict`` into a plain ``model`` as dense weights ``M ⊙ W0``.

    Sparse layers are parametrized to read their mask and ``W0``, then densified; returns their names.

    Raises:
        ValueError: the state does not fit the model (other architecture or sizes).
    """
    names = sparse_names(state_dict)
    layers = sparsify(model, [re.escape(name) for name in names]) if names else []
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        densify_(layers)
        raise ValueError(f"the saved weights do not fit this model: {error}") from None
    densify_(layers)
    return names

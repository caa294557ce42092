"""Static masks (chosen once, SPDF's sparse phase), and removing them for dense training.

Plain PyTorch, no Lightning: a loop calls :func:`random_scores` / ``prune_`` once, then holds the
masks in the weights (:mod:`sparseft.sparse.inplace`: ``W0`` zero where pruned, gradients masked
before every optimizer step), and :func:`densify_` to train the pruned weights again.

What holds zeros where ``M = 0``, for a layer ``W_eff = M ⊙ W0``:

* ``W0``, hence ``W_eff``: zeroed when the mask is held, and kept there by a zero gradient (and by
  masking after every step for an optimizer that is not elementwise);
* ``∂L/∂W0``: masked before every optimizer step (NaN and inf included), so nothing added to the
  gradient leaks in;
* AdamW's ``exp_avg`` / ``exp_avg_sq``: 0 from the start and kept there by the arithmetic, the
  gradient being 0 (``m ← β₁m + (1−β₁)·0``); zeroed again at the switch to dense;
* under FSDP2 (sharded ``W0``, gradient and moments) each rank masks the rows it holds.
"""

from __future__ import annotations

import hashlib
import re

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparseft.sparse.inplace import hold_, mask_weights_, release_
from sparseft.sparse.parametrize import SparseLayer
from sparseft.sparse.prune import sparsify
from sparseft.sparse.sharding import is_sharded

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


@torch.no_grad()
def densify_(layers: list[SparseLayer]) -> None:
    """Remove the masks: ``W0`` zeroed where pruned becomes the layer's plain, fully trainable weight.

    The parameter object is kept (``leave_parametrized=False`` re-registers ``W0`` itself), so an
    optimizer and DDP that hold it keep working; the pruned entries restart from 0.

    Under FSDP2 (``W0`` sharded) the parametrization stays and its mask becomes all ones, held
    (:func:`~sparseft.sparse.inplace.hold_`: the forward returns ``W0``): FSDP2 registered ``W0`` as the
    parametrization's ``original`` and gathers it there for every forward, so removing the
    parametrization would leave the layer's weight out of the gathers. Training is dense all the same;
    the checkpoint keeps the all-ones masks, which merge (export) and a resume handle as any mask.
    """
    mask_weights_(layers)
    release_(layers)
    for layer in layers:
        if is_sharded(layer.stored_weight):
            layer.set_mask_(torch.ones_like(layer.mask))
            hold_([layer])  # all ones: nothing to zero, whatever W0 is loaded later
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

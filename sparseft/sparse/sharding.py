"""Whole tensors of a model sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``), for the
mask machinery that works outside the forward.

FSDP2 turns every parameter of a sharded module into a ``DTensor`` that holds, on each rank, a
slice of rows (``Shard(0)``). Inside the forward FSDP2 gathers them and the parametrization
``W_eff = M ⊙ (W0 + ΔW)`` sees whole tensors; outside it (mask updates, reports) a parameter is
a shard, and a mask is a whole-matrix buffer (FSDP2 does not shard buffers: every rank holds
every mask, one byte per weight). So:

* :func:`whole_parameters` gathers the parameters of some modules (all-gather, the same on
  every rank) for the span of a ``with`` block, to read: scores, top-k and masks computed there
  are the ones an unsharded model gives, bit for bit, on every rank;
* :func:`masked_fill_local_` applies a whole mask to a sharded tensor (a gradient, a weight, an
  optimizer moment) on the rows this rank holds, with no communication.
* :func:`total` sums a whole or sharded tensor into a plain one, differentiably: a loss term on
  parameters outside the forward (movement's penalty on its scores) is then the same on every rank.

Plain PyTorch; on a model that is not sharded both do what the unsharded code does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a shard of a whole tensor that other ranks hold the rest of)."""
    return isinstance(tensor, DTensor)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """What this process holds of ``tensor``: its shard of a DTensor, the tensor itself otherwise."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def has_meta_parameters(model: nn.Module) -> bool:
    """Whether some parameter of ``model`` has no storage yet: built without its weights (meta device), to be
    read shard by shard after FSDP2 splits it (sharded loading)."""
    return any(local_part(parameter).is_meta for parameter in model.parameters())


def sharded_parameters(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` (or of its submodules) is a DTensor."""
    return any(is_sharded(parameter) for parameter in module.parameters())


@contextmanager
def whole_parameters(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, every DTensor parameter of ``modules`` (and their submodules) is its whole
    tensor, gathered from every rank; plain parameters are untouched.

    For reading only: the whole tensors are copies, and what is written to them is dropped at the
    end of the block (write a shard with :func:`masked_fill_local_`). Every rank must enter the
    block with the same modules: the gather is a collective. Gathered tensors do not require
    gradients; a parameter's gradient, where it has one, is gathered with it.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        with torch.no_grad():
            for module in modules:
                for owner in module.modules():
                    for name, parameter in list(owner._parameters.items()):
                        if parameter is not None and is_sharded(parameter):
                            whole = nn.Parameter(parameter.full_tensor(), requires_grad=False)
                            if parameter.grad is not None:  # a gradient criterion reads it
                                whole.grad = parameter.grad.full_tensor()
                            owner._parameters[name] = whole
                            swapped.append((owner, name, parameter))
        yield
    finally:
        for owner, name, parameter in reversed(swapped):
            owner._parameters[name] = parameter


def local_rows(whole: torch.Tensor, like: DTensor) -> torch.Tensor:
    """The part of ``whole`` that ``like`` (a DTensor of ``whole``'s shape) holds on this rank."""
    if tuple(whole.shape) != tuple(like.shape):
        raise ValueError(f"a tensor of shape {tuple(whole.shape)} cannot index a shard of {tuple(like.shape)}")
    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()


def masked_fill_local_(target: torch.Tensor, keep: torch.Tensor, value: float = 0.0) -> None:
    """``target ← where(keep, target, value)`` in place, for a whole ``target`` or for this rank's
    shard of a sharded one (``keep`` is the whole mask; no communication)."""
    if is_sharded(target):
        target.to_local().masked_fill_(~local_rows(keep, target), value)
    else:
        target.masked_fill_(~keep, value)


def total(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of every entry of ``tensor``, whole or sharded, as a plain 0-d tensor equal on every rank.

    For a DTensor this rank sums its shard and an all-reduce adds the others (a collective: every
    rank calls it). Autograd goes back through it to this rank's shard only, undivided: added to
    each rank's loss, the term's gradient on every shard is the one one process computes on the
    whole tensor. That is what DDP's averaging of every rank's identical term's gradient gives too,
    while FSDP2 averages only the gradients of the forward (reduce-scatter) and adds this one to
    the sharded parameter's gradient as it is.
    """
    summed = tensor.sum()
    return summed.full_tensor() if is_sharded(summed) else summed

"""FSDP2 for sparseft: the ``fsdp2`` trainer strategy and how a backbone is sharded.

``--trainer.strategy fsdp2`` is Lightning's ``ModelParallelStrategy`` with all processes in one
data-parallel dimension and no tensor parallelism: every parameter, gradient and optimizer
state is split across all ranks (FSDP2, ``fully_shard``), each rank trains on its own batches.
:meth:`SparseFTModule.configure_model` calls :func:`shard_backbone_`, which shards each
transformer block and then the root, as the FSDP2 documentation recommends: the forward gathers
one block at a time.

Sparsity strategies attach in ``setup``, before ``configure_model``, so their masks (buffers, not
sharded: every rank holds them whole), scores, low-rank factors and slices are sharded with the
blocks they belong to. What they compute outside the forward gathers one layer's tensors at a
time (:mod:`sparseft.sparse.sharding`).

**Sharded loading.** A module built inside :func:`sharded_loading` (the CLI does so under ``fsdp2``
when the strategy allows it) or inside Lightning's ``trainer.init_module(empty_init=True)`` has its
backbone's parameters on the meta device (:mod:`sparseft.backbones.empty`); the strategy attaches
to shapes, ``fully_shard`` splits the shapes, and :func:`load_weights_` then gives each process
storage for its own rows and reads just those from the checkpoint. Per process, the backbone costs
its share of the weights plus one tensor being read, not the whole model. The strategy's own
tensors (masks, ΔW, scores) are built whole in every process before sharding, as without sharded
loading, except parameters whose start can be set again once they have storage (``empty_start``:
movement's constant scores, as large as the weights; S²FT's zero Δ), which are born on the meta
device too and set after sharding. A strategy that reads the weights when it attaches (DSEE's
supports, S²FT's weight and data criteria, SPDF's magnitude masks) says so (``attaches_to_empty``)
and the CLI loads the whole backbone in every process for it, as before.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from sparseft.backbones.empty import CheckpointTensors
from sparseft.sparse.sharding import local_part

FSDP2_NAME = "fsdp2"
_SHARDED_LOADING: ContextVar[bool] = ContextVar("sparseft_sharded_loading", default=False)


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` as pure FSDP2: one data-parallel dimension over every process of every
    node (``ModelParallelStrategy`` alone puts a node's processes in a tensor-parallel dimension).

    Args:
        param_dtype: FSDP2's own mixed precision, the usual choice on GPUs: parameters are gathered and
            the forward and backward computed in this dtype (``bfloat16``), while the shards the optimizer
            updates, and masks chosen from them, stay in their own dtype (float32 under ``32-true``).
            None: no casting (``bf16-mixed`` is then Lightning's autocast over float32 gathers).
        reduce_dtype: the dtype gradients are reduced in across ranks; with ``param_dtype`` set, float32
            unless given.
        tensor_parallel_size: 1 (sparseft shards with FSDP2 only; other values are refused at setup).
        **kwargs: ``ModelParallelStrategy``'s other arguments.
    """

    def __init__(self, param_dtype: Literal["bfloat16", "float16"] | None = None,
                 reduce_dtype: Literal["float32", "bfloat16"] | None = None, tensor_parallel_size: int = 1,
                 **kwargs: Any) -> None:
        super().__init__(tensor_parallel_size=tensor_parallel_size, **kwargs)
        if reduce_dtype is not None and param_dtype is None:
            raise ValueError("--trainer.strategy.reduce_dtype needs --trainer.strategy.param_dtype (FSDP2's mixed "
                             "precision); without it gradients are reduced in the parameters' dtype")
        self.mp_policy = MixedPrecisionPolicy(
            param_dtype=getattr(torch, param_dtype) if param_dtype else None,
            reduce_dtype=getattr(torch, reduce_dtype or "float32") if param_dtype else None,
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


StrategyRegistry.register(FSDP2_NAME, FSDP2Strategy, description="FSDP2 (fully_shard) over all processes",
                          override=True)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The backbone's transformer blocks: the entries of the outermost ``ModuleList`` s that hold linear
    layers (BERT's ``encoder.layer``, GPT-2's ``h``, LLaMA's ``layers``), of the classes the backbone
    names in ``_no_split_modules`` where it names any of them (``GPT2Block``, ``LlamaDecoderLayer``;
    BERT also names its embeddings, which stay with the root)."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList):
            continue
        holding = [child for child in module if any(isinstance(m, nn.Linear | Conv1D) for m in child.modules())]
        blocks.extend(holding)
        inside.update(id(m) for child in holding for m in child.modules())
    named = set(getattr(model, "_no_split_modules", None) or ())
    return [block for block in blocks if type(block).__name__ in named] or blocks


def broadcast_from_first_rank_(model: nn.Module, mesh: DeviceMesh) -> None:
    """Every rank takes the first rank's parameters and buffers, as DDP does when it wraps a model: a
    randomly initialised head, scores or factors drawn differently on another rank would otherwise be
    sharded from different values. One tensor at a time, staged on the mesh's device."""
    if mesh.size() == 1:
        return
    group = mesh.get_group()
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else None
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.is_meta:  # read from the checkpoint by every rank (load_weights_)
                continue
            staged = tensor.detach().to(device or tensor.device)
            dist.broadcast(staged, src=dist.get_global_rank(group, 0), group=group)
            tensor.copy_(staged)


def shard_backbone_(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None) -> int:
    """Give every rank the first rank's values, then ``fully_shard`` every transformer block of ``model``
    and ``model`` itself (the embeddings, the head and whatever lies outside the blocks), over the 1-D
    ``mesh``, with FSDP2's mixed precision ``mp_policy`` (:class:`FSDP2Strategy`). Returns the blocks
    sharded; a model already sharded is left as it is (Lightning calls ``configure_model`` once per run)."""
    if isinstance(model, FSDPModule):
        return 0
    broadcast_from_first_rank_(model, mesh)
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__}: found no transformer blocks to shard with FSDP2")
    # an empty tensor has nothing to shard, and FSDP2's gradient reduce-scatter refuses one (S²FT trains
    # no column of a layer where it selects no head): such parameters stay whole on every rank
    empty = {parameter for parameter in model.parameters() if parameter.numel() == 0}
    policy = mp_policy or MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=empty, mp_policy=policy)
    fully_shard(model, mesh=mesh, ignored_params=empty, mp_policy=policy)
    return len(blocks)


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel dimension of Lightning's device mesh, refusing tensor parallelism (sparseft
    shards with FSDP2 only: a tensor-parallel plan would split the matrices masks are chosen from)."""
    if mesh.ndim > 1 and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"--trainer.strategy ModelParallelStrategy with tensor_parallel_size {mesh['tensor_parallel'].size()}: "
            "sparseft shards with FSDP2 only; use --trainer.strategy fsdp2"
        )
    return mesh["data_parallel"] if mesh.ndim > 1 else mesh


@contextmanager
def sharded_loading() -> Iterator[None]:
    """A :class:`~sparseft.training.module.SparseFTModule` made inside builds its backbone without weights, to be
    read shard by shard in ``configure_model`` (:func:`load_weights_`)."""
    token = _SHARDED_LOADING.set(True)
    try:
        yield
    finally:
        _SHARDED_LOADING.reset(token)


def sharded_loading_requested() -> bool:
    """Inside :func:`sharded_loading`, or inside a meta-device context (Lightning's
    ``trainer.init_module(empty_init=True)`` under ``fsdp2``)."""
    return _SHARDED_LOADING.get() or torch.get_default_device().type == "meta"


@torch.no_grad()
def load_weights_(model: PreTrainedModel, directory: str | Path) -> list[str]:
    """Give every meta parameter of ``model`` storage and read its values from the checkpoint in ``directory``:
    a parameter sharded by FSDP2 only its local rows, any other one whole. Every process reads the same
    file, so every rank holds the same values with no communication.

    A backbone weight the checkpoint lacks is refused (it would start at random). A parameter outside the
    backbone that the checkpoint lacks, or stores in another shape (a new task head), is initialised as
    Hugging Face initialises a new ``Linear`` (normal with ``initializer_range``, zero bias; ones for a
    norm's 1-D weight), drawn whole from a generator seeded alike on every rank, so every rank
    agrees. Returns those parameters' names.
    """
    empty = _materialize_(model)
    empty -= _reset_empty_init_(model, empty)
    missing = []
    aliases: dict[int, list[str]] = {}  # tied weights: one parameter, several names (embeddings and LM head)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    prefix = getattr(model, "base_model_prefix", "")
    with CheckpointTensors(directory) as checkpoint:
        for name, parameter in model.named_parameters():
            if name not in empty:  # the strategy's ΔW and scores: kept as they were
                continue
            local = local_part(parameter)
            index = _local_index(parameter)
            keys = sorted({checkpoint.key_of(alias, prefix) for alias in aliases[id(parameter)]} - {None})
            if len(keys) > 1 and not _all_equal(checkpoint, keys):  # from_pretrained unties them then
                raise ValueError(
                    f"{directory} stores {' and '.join(keys)} with different values, which the model's config ties "
                    "into one parameter: set tie_word_embeddings to false in its config.json, or load the whole "
                    "backbone (build the module outside sharded loading)"
                )
            key = keys[0] if keys else None
            if key is not None and checkpoint.shape(key) == tuple(parameter.shape):
                if local.numel():
                    local.copy_(checkpoint.read(key, index))
                continue
            if prefix and name.startswith(f"{prefix}."):  # a backbone weight, not a new task head
                raise ValueError(
                    f"{directory}: no tensor for the backbone weight {name} (as save_pretrained names it), so sharded "
                    "loading would start it at random: re-save the checkpoint with save_pretrained, or load the "
                    "whole backbone (--trainer.strategy ddp, or build the module outside sharded loading)"
                )
            missing.append(name)
            local.copy_(_new_parameter(name, tuple(parameter.shape), model.config)[index])
    return missing


def _reset_empty_init_(model: nn.Module, empty: set[str]) -> set[str]:
    """Set the start of the parameters created without storage (among ``empty``) by modules that can
    (``empty_start`` names them, ``reset_empty_()`` sets them: movement's constant scores, S²FT's zero Δ);
    returns their names."""
    done: set[str] = set()
    for prefix, module in model.named_modules():
        names = {f"{prefix}.{name}" if prefix else name for name in getattr(module, "empty_start", ())}
        if names and names <= empty:
            module.reset_empty_()
            done |= names
    return done


def _materialize_(model: nn.Module) -> set[str]:
    """Storage for every meta parameter of ``model``, keeping every other tensor's values; returns the names of
    those that were meta (their values still to be read). ``to_empty`` is the call FSDP2 supports for this (it
    re-registers its shards); it empties every tensor, so the real parameters (the strategy's ΔW and scores) are
    kept aside, each process its own shards of them, and copied back, and the buffers (masks, rotary
    frequencies) are put back as they were, with no copy."""
    parameters = dict(model.named_parameters())
    kept = {name: local_part(tensor).clone() for name, tensor in parameters.items() if not local_part(tensor).is_meta}
    buffers = [(module, name, buffer) for module in model.modules() for name, buffer in module._buffers.items()
               if buffer is not None and not buffer.is_meta]
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # keeps each Parameter object: tied weights stay tied
    try:
        model.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)
    for module, name, buffer in buffers:
        module._buffers[name] = buffer
    for name, tensor in model.named_parameters():
        if name in kept:
            local_part(tensor).copy_(kept[name])
    return set(parameters) - set(kept)


def _all_equal(checkpoint: CheckpointTensors, keys: list[str]) -> bool:
    """Whether the stored tensors ``keys`` hold the same values (each read whole, one at a time)."""
    first = checkpoint.read(keys[0], ())
    return all(torch.equal(checkpoint.read(key, ()), first) for key in keys[1:])


def _local_index(parameter: torch.Tensor) -> tuple[slice, ...]:
    """Which part of the whole tensor this process holds: all of it, or its FSDP2 shard."""
    if not isinstance(parameter, DTensor):
        return tuple(slice(0, size) for size in parameter.shape)
    shape, offset = compute_local_shape_and_global_offset(parameter.shape, parameter.device_mesh,
                                                          parameter.placements)
    return tuple(slice(start, start + size) for start, size in zip(offset, shape))


def _new_parameter(name: str, shape: tuple[int, ...], config: Any) -> torch.Tensor:
    """A parameter the checkpoint does not hold, as ``PreTrainedModel._init_weights`` makes one for a
    ``Linear`` or a norm, from a generator seeded by the process's initial seed (equal on every rank
    after ``seed_everything``) and the name."""
    if len(shape) == 1:
        return torch.ones(shape) if name.endswith("weight") and "norm" in name.lower() else torch.zeros(shape)
    generator = torch.Generator().manual_seed(torch.initial_seed() + sum(map(ord, name)))
    return torch.empty(shape).normal_(0.0, getattr(config, "initializer_range", 0.02), generator=generator)

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
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from transformers.pytorch_utils import Conv1D

FSDP2_NAME = "fsdp2"


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` as pure FSDP2: one data-parallel dimension over every process of every
    node (``ModelParallelStrategy`` alone puts a node's processes in a tensor-parallel dimension)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)

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
            staged = tensor.detach().to(device or tensor.device)
            dist.broadcast(staged, src=dist.get_global_rank(group, 0), group=group)
            tensor.copy_(staged)


def shard_backbone_(model: nn.Module, mesh: DeviceMesh) -> int:
    """Give every rank the first rank's values, then ``fully_shard`` every transformer block of ``model``
    and ``model`` itself (the embeddings, the head and whatever lies outside the blocks), over the 1-D
    ``mesh``. Returns the blocks sharded; a model already sharded is left as it is (Lightning calls
    ``configure_model`` once per run)."""
    if isinstance(model, FSDPModule):
        return 0
    broadcast_from_first_rank_(model, mesh)
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__}: found no transformer blocks to shard with FSDP2")
    # an empty tensor has nothing to shard, and FSDP2's gradient reduce-scatter refuses one (S²FT trains
    # no column of a layer where it selects no head): such parameters stay whole on every rank
    empty = {parameter for parameter in model.parameters() if parameter.numel() == 0}
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=empty)
    fully_shard(model, mesh=mesh, ignored_params=empty)
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

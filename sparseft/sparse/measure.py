"""Measure a sparsified model: per-layer sparsity, parameter counts, FLOPs, remaining weights.

Sparsity is *measured* on the effective weights (exact zeros), never copied from a target,
so a measurement can be trusted after any merge or export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparseft.sparse.layers import block_index, find_linear_layers
from sparseft.sparse.parametrize import sparse_layers


@dataclass(frozen=True)
class LayerSparsity:
    """Measured sparsity of one linear layer."""

    name: str
    role: str | None
    shape: tuple[int, int]
    nonzero: int

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.numel


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; shared tensors are counted once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total


def measure_layers(model: nn.Module, only_sparsified: bool = True) -> list[LayerSparsity]:
    """Measured sparsity of the sparsified layers (or of every linear layer)."""
    layers = [s.layer for s in sparse_layers(model)] if only_sparsified else find_linear_layers(model)
    stats = []
    with torch.no_grad():
        for layer in layers:
            stats.append(LayerSparsity(layer.name, layer.role, layer.shape, int(layer.weight().count_nonzero())))
    return stats


def linear_flops_per_token(model: nn.Module) -> tuple[int, int]:
    """``(dense, sparse)`` multiply-add FLOPs per token of all linear layers (2 per weight).

    The sparse count assumes a kernel that skips every zero weight; attention score and
    softmax FLOPs, which sparsity does not change, are left out of both.
    """
    stats = measure_layers(model, only_sparsified=False)
    return sum(2 * s.numel for s in stats), sum(2 * s.nonzero for s in stats)


def remaining_weights(model: nn.Module, target_names: list[str]) -> dict[str, float]:
    """Fraction of weights remaining, over the targets only and the way movement pruning reports it.

    The paper's "remaining weights" (``counts_parameters.py``) counts every parameter of the
    transformer blocks: biases and LayerNorm are never pruned and count as remaining in both
    numerator and denominator (10% of BERT-base's 84.9M matrices reads as 10.13%).
    """
    targets = {f"{name}.weight" for name in target_names}
    kept = total = target_kept = target_total = 0
    with torch.no_grad():
        for name, parameter in _effective_parameters(model):
            if block_index(name) is None:
                continue
            nonzero = int(parameter.count_nonzero()) if name in targets else parameter.numel()
            kept, total = kept + nonzero, total + parameter.numel()
            if name in targets:
                target_kept, target_total = target_kept + nonzero, target_total + parameter.numel()
    return {"targets": target_kept / max(target_total, 1), "blocks_paper": kept / max(total, 1)}


def _effective_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every parameter, with sparsified weights as their effective value."""
    params = {name: p for name, p in model.named_parameters() if ".parametrizations." not in name}
    params.update({f"{s.name}.weight": s.layer.module.weight for s in sparse_layers(model)})
    return list(params.items())

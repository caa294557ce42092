"""Attach the parametrization to target layers and set their masks from scores.

These two functions are the whole plain-PyTorch API; strategies call them at Lightning
hooks, and a researcher can call them from any training loop::

    layers = sparsify(model, targets=["q", "v"])
    prune_(layers, [s.dense().abs() for s in layers], sparsity=0.5)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sparseft.sparse.layers import LinearLayer
from sparseft.sparse.masks import CountRule, check_sparsity, global_topk_masks, nm_mask, topk_mask
from sparseft.sparse.parametrize import SparseLayer, attach
from sparseft.sparse.targets import TargetSpec, select_targets

_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class MaskPattern:
    """Which entries compete for survival: ``layer`` (top-k per layer), ``global`` (top-k over
    all target layers together) or ``N:M`` (e.g. ``2:4``: n of every m consecutive inputs)."""

    scope: str
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str) -> MaskPattern:
        if text in ("layer", "global"):
            return cls(text)
        match = _NM.match(text)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            nm_mask(torch.zeros(1, m), n, m)  # validates 0 < n < m
            return cls("nm", n, m)
        raise ValueError(f"unknown mask pattern {text!r}; use 'layer', 'global' or 'N:M' such as '2:4'")

    @property
    def nm_sparsity(self) -> float:
        return 1.0 - self.n / self.m


def sparsify(
    model: nn.Module,
    targets: TargetSpec = None,
    make_delta: Callable[[LinearLayer], nn.Module | None] | None = None,
    make_score: Callable[[LinearLayer], nn.Module | None] | None = None,
    freeze_base: bool = False,
) -> list[SparseLayer]:
    """Attach ``W_eff = M ⊙ (W0 + ΔW)`` to every target layer (masks start all ones)."""
    return [
        attach(
            layer,
            delta=make_delta(layer) if make_delta else None,
            score=make_score(layer) if make_score else None,
            freeze_base=freeze_base,
        )
        for layer in select_targets(model, targets)
    ]


@torch.no_grad()
def prune_(
    layers: list[SparseLayer],
    scores: list[torch.Tensor],
    sparsity: float,
    pattern: str = "layer",
    rule: CountRule = "round",
) -> None:
    """Set every layer's mask to keep its highest scores at the given sparsity.

    Per-layer top-k ranks the q, k and v parts of a fused ``qkv`` projection separately.
    ``rule`` says how the pruned count rounds (:func:`~sparseft.sparse.masks.pruned_count`).

    With an N:M pattern ``sparsity`` only switches masks on (> 0) or off (0).
    """
    check_sparsity(sparsity)
    parsed = MaskPattern.parse(pattern)
    if parsed.scope == "global":
        masks = global_topk_masks(scores, sparsity, rule)
    elif parsed.scope == "nm":
        masks = [nm_mask(s, parsed.n, parsed.m) if sparsity > 0 else torch.ones_like(s, dtype=torch.bool)
                 for s in scores]
    else:
        masks = [topk_mask(s, sparsity, layer.row_blocks, rule) for s, layer in zip(scores, layers, strict=True)]
    for layer, keep in zip(layers, masks, strict=True):
        layer.set_mask_(keep)


def prune_on_next_forward_(layers: list[SparseLayer], sparsity: float, rule: CountRule = "round") -> None:
    """Per-layer top-k as :func:`prune_`, of the scores each layer's next forward computes.

    For layers whose scores come from their score module (``score(W0 + ΔW)``, as PST): the
    forward computes them for the straight-through gradient anyway, so the mask is taken from
    them there instead of computing them twice. The masks are the ones ``prune_`` would set
    from the same parameters; they change when the model next runs.
    """
    check_sparsity(sparsity)
    for layer in layers:
        select = functools.partial(topk_mask, sparsity=sparsity, row_blocks=layer.row_blocks, rule=rule)
        layer.param.refresh_mask_on_forward(select)

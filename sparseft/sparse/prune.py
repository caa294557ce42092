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
from sparseft.sparse.masks import (
    CountRule,
    check_sparsity,
    global_topk_masks,
    group_topk_mask,
    nm_kept_per_group,
    nm_mask,
    topk_mask,
)
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
        if not isinstance(text, str):  # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124
            raise ValueError(f"mask pattern must be a string such as '2:4', got {text!r}: quote it in YAML")
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

    def check_fits(self, layers: list[LinearLayer]) -> None:
        """N:M groups ``m`` consecutive inputs: refuse target layers whose input width is not a multiple of it.

        Called when a strategy attaches, so a misfit stops the run at once, naming the layer.
        """
        if self.scope != "nm":
            return
        misfits = [f"{layer.name} ({layer.shape[1]} inputs)" for layer in layers if layer.shape[1] % self.m]
        if misfits:
            raise ValueError(
                f"pattern {self.n}:{self.m} needs an input width divisible by {self.m} in every target layer, but not "
                f"{', '.join(misfits)}: leave them out of the targets or use pattern 'layer'"
            )

    def layer_selector(self, sparsity: float, row_blocks: int = 1,
                       rule: CountRule = "round") -> Callable[[torch.Tensor], torch.Tensor]:
        """``scores ↦ keep-mask`` of one layer at ``sparsity``: exact top-k (``layer``), or the
        top :func:`~sparseft.sparse.masks.nm_kept_per_group` of every group of ``m`` inputs (N:M)."""
        if self.scope == "nm":
            return functools.partial(group_topk_mask, kept=nm_kept_per_group(sparsity, self.n, self.m), m=self.m)
        if self.scope == "layer":
            return functools.partial(topk_mask, sparsity=sparsity, row_blocks=row_blocks, rule=rule)
        raise ValueError(f"pattern {self.scope!r} ranks all layers together; it has no mask of one layer")


def sparsify(
    model: nn.Module,
    targets: TargetSpec = None,
    make_delta: Callable[[LinearLayer], nn.Module | None] | None = None,
    make_score: Callable[[LinearLayer], nn.Module | None] | None = None,
    freeze_base: bool = False,
    masked: bool = True,
) -> list[SparseLayer]:
    """Attach ``W_eff = M ⊙ (W0 + ΔW)`` to every target layer (masks start all ones; none with
    ``masked=False``, for layers never pruned)."""
    return [
        attach(
            layer,
            delta=make_delta(layer) if make_delta else None,
            score=make_score(layer) if make_score else None,
            freeze_base=freeze_base,
            masked=masked,
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

    With an N:M pattern every group of ``m`` inputs keeps its top
    ``nm_kept_per_group(sparsity, n, m)`` scores: ``m`` (dense) at 0, ``n`` at ``1 − n/m``.
    """
    check_sparsity(sparsity)
    parsed = MaskPattern.parse(pattern)
    parsed.check_fits([layer.layer for layer in layers])
    if parsed.scope == "global":
        masks = global_topk_masks(scores, sparsity, rule)
    else:
        masks = [parsed.layer_selector(sparsity, layer.row_blocks, rule)(s)
                 for s, layer in zip(scores, layers, strict=True)]
    for layer, keep in zip(layers, masks, strict=True):
        layer.set_mask_(keep)


def prune_on_next_forward_(
    layers: list[SparseLayer], sparsity: float, rule: CountRule = "round", pattern: str = "layer"
) -> None:
    """Per-layer masks as :func:`prune_` (``layer`` or N:M), of the scores each layer's next forward computes.

    For layers whose scores come from their score module (``score(W0 + ΔW)``, as PST): the
    forward computes them for the straight-through gradient anyway, so the mask is taken from
    them there instead of computing them twice. The masks are the ones ``prune_`` would set
    from the same parameters; they change when the model next runs.
    """
    check_sparsity(sparsity)
    parsed = MaskPattern.parse(pattern)
    for layer in layers:
        layer.param.refresh_mask_on_forward(parsed.layer_selector(sparsity, layer.row_blocks, rule))

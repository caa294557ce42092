"""Which heads and FFN channels S²FT trains: units, scores, allocation.

A *unit* is an attention query head (its ``head_dim`` input columns of the attention output,
``o``) or an FFN channel (its input column of ``ffn_out``). Every block contributes one head
group and one channel group (:func:`unit_groups`). Selection picks ``k`` units of each kind:

* ``allocation: global`` ranks all (layer, unit) pairs of a kind together, the reference's one
  ``random.sample`` over ``L·H`` heads and ``L·d_ff`` channels (per-layer counts vary);
  ``layer`` picks the same share in every block;
* ``k = int(ratio · units)`` or an explicit count (:func:`unit_count`);
* scores (:func:`unit_scores`), one per unit, the paper's selection ablation: ``random``
  (seeded uniform: top-k of i.i.d. uniforms is a uniform sample), ``weight`` ``‖W[:, u]‖_F``,
  ``activation`` ``‖X[..., u]‖_F`` over calibration tokens, ``weight_activation`` (their
  product per column, summed over the unit) and ``gradient`` ``‖∂L/∂W[:, u]‖_F`` over
  calibration batches; ``order: largest`` or ``smallest``.

Heads are *query* heads: under grouped-query attention a selected query head trains its own
o columns; the row side (v) of a selection is the key/value head of its group (:func:`plan_slices`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from sparseft.sparse.layers import LinearLayer
from sparseft.sparse.masks import keep_highest
from sparseft.sparse.structured import HeadLayout, group_blocks
from sparseft.sparse.targets import select_targets

Criterion = Literal["random", "weight", "activation", "weight_activation", "gradient"]
Allocation = Literal["global", "layer"]
Order = Literal["largest", "smallest"]
UnitKind = Literal["heads", "channels"]
DATA_CRITERIA = ("activation", "weight_activation", "gradient")


@dataclass(frozen=True)
class UnitGroup:
    """The selectable units of one column-side layer: ``units`` blocks of ``width`` input columns."""

    layer: LinearLayer
    kind: UnitKind
    units: int
    width: int

    def columns(self, units: torch.Tensor) -> torch.Tensor:
        """Input columns owned by ``units`` (sorted)."""
        offsets = torch.arange(self.width, device=units.device)
        return (units.sort().values[:, None] * self.width + offsets).flatten()

    def reduce(self, per_column: torch.Tensor) -> torch.Tensor:
        """Per-column values summed over each unit's columns."""
        return per_column.reshape(self.units, self.width).sum(1)


def unit_groups(model: nn.Module) -> list[UnitGroup]:
    """Per block: query heads of ``o`` and channels of ``ffn_out``, in block order."""
    blocks = group_blocks(select_targets(model, None))
    layout = HeadLayout.of(model)
    groups = []
    for block in blocks:
        if (o := block.get("o")) is not None:
            groups.append(UnitGroup(o, "heads", layout.num_heads, layout.head_dim))
        if (ffn_out := block.get("ffn_out")) is not None:
            groups.append(UnitGroup(ffn_out, "channels", ffn_out.shape[1], 1))
    if not groups:
        raise ValueError("S²FT needs the o / ffn_out role presets for this model type (sparseft.sparse.layers)")
    return groups


def unit_count(ratio: float, count: int | None, total: int, option: str = "count", unit: str = "units") -> int:
    """``count`` when given, else ``int(ratio · total)`` (the reference's rounding).

    Raises:
        ValueError: the count is not in ``[0, total]``; the message names the ``option`` that gave it
            and what its ``unit`` is, since a count of heads is over every layer, not per layer.
    """
    k = count if count is not None else int(ratio * total + 1e-9)
    if not 0 <= k <= total:
        raise ValueError(f"{option} {k}: the model has {total} {unit} to select from; give 0 to {total}")
    return k


def allocate(
    scores: list[torch.Tensor], k: int, allocation: Allocation, order: Order = "largest",
) -> list[torch.Tensor]:
    """Selected unit indices per group: the ``k`` best over all groups, or ``k`` split over groups.

    With ``layer`` allocation each group gets ``k // n`` and the first ``k % n`` groups one more.
    Ties go to the lower index (:func:`keep_highest`).
    """
    signed = [s.float() if order == "largest" else -s.float() for s in scores]
    if allocation == "global":
        flat = torch.cat(signed)
        chunks = keep_highest(flat, flat.numel() - k).split([s.numel() for s in signed])
    elif allocation == "layer":
        counts = [k // len(signed) + (i < k % len(signed)) for i in range(len(signed))]
        chunks = [keep_highest(s, s.numel() - c) for s, c in zip(signed, counts)]
    else:
        raise ValueError(f"unknown allocation {allocation!r}; use 'global' or 'layer'")
    return [chunk.nonzero().flatten() for chunk in chunks]


def unit_scores(
    model: nn.Module, groups: list[UnitGroup], criterion: Criterion, seed: int = 0,
    batches: Iterable[dict[str, torch.Tensor]] | None = None,
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """One score per unit of every group (higher ranks first with ``order: largest``)."""
    if criterion == "random":
        generator = torch.Generator().manual_seed(seed)  # CPU, the same on every rank and device
        return [torch.rand(group.units, generator=generator) for group in groups]
    weights = [group.layer.weight().detach().float() for group in groups]
    if criterion == "weight":
        return [group.reduce(w.pow(2).sum(0)).sqrt() for group, w in zip(groups, weights)]
    if criterion not in DATA_CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}")
    if batches is None or loss_fn is None:
        raise ValueError(f"criterion {criterion!r} needs calibration batches and a loss")
    energy = calibrate(model, groups, batches, loss_fn, gradient=criterion == "gradient")
    if criterion == "weight_activation":  # Σ_{j∈u} ‖W[:, j]‖·‖X[..., j]‖
        return [group.reduce(w.pow(2).sum(0).sqrt() * e.sqrt()) for group, w, e in zip(groups, weights, energy)]
    return [group.reduce(e).sqrt() for group, e in zip(groups, energy)]


def calibrate(
    model: nn.Module, groups: list[UnitGroup], batches: Iterable[dict[str, torch.Tensor]],
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], gradient: bool = False,
) -> list[torch.Tensor]:
    """Per input column of every group's layer: ``Σ_tokens X[..., j]²`` or, with ``gradient``,
    ``Σ_batches Σ_i (∂L/∂W)[i, j]²``. Only the groups' weights get a gradient, one batch at a
    time; no parameter changes and no gradient is left behind."""
    energy = [torch.zeros(group.layer.shape[1]) for group in groups]
    inputs: dict[int, torch.Tensor] = {}
    handles = [group.layer.module.register_forward_pre_hook(_recorder(i, inputs)) for i, group in enumerate(groups)]
    weights = [group.layer.module.weight for group in groups]
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        for batch in batches:
            with torch.enable_grad() if gradient else torch.no_grad():
                for w in weights:
                    w.requires_grad_(gradient)
                    w.grad = None
                loss = loss_fn(batch)
                if gradient:
                    loss.backward()
            for i, group in enumerate(groups):
                if gradient:
                    grad = weights[i].grad.detach().float()
                    energy[i] += (grad.t() if group.layer.transposed else grad).pow(2).sum(0).cpu()
                else:
                    x = inputs[i].detach().float()
                    energy[i] += x.reshape(-1, x.shape[-1]).pow(2).sum(0).cpu()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for w in weights:
            w.grad = None
    return energy


def _recorder(i: int, store: dict[int, torch.Tensor]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        store[i] = args[0]

    return hook


def plan_slices(
    model: nn.Module, groups: list[UnitGroup], selected: list[torch.Tensor], rows: bool = False,
) -> dict[str, tuple[str, torch.Tensor]]:
    """Per layer name, ``(axis, indices)``: the selected units' columns of ``o`` / ``ffn_out`` and,
    with ``rows``, the matching rows of v (the key/value heads of the selected query heads'
    groups; GPT-2's v block of the fused ``c_attn``) and of every ``ffn_in`` (up and gate)."""
    plan = {group.layer.name: ("columns", group.columns(units)) for group, units in zip(groups, selected)}
    if not rows:
        return plan
    layout = HeadLayout.of(model)
    blocks = {block.index: block for block in group_blocks(select_targets(model, None))}
    for group, units in zip(groups, selected):
        block = blocks[group.layer.layer_index]
        if group.kind == "channels":
            plan.update({layer.name: ("rows", units.sort().values) for layer in block.ffn_in})
            continue
        kv_heads = (units // (layout.num_heads // layout.num_kv_heads)).unique()
        v_rows = UnitGroup(group.layer, "heads", layout.num_kv_heads, layout.head_dim).columns(kv_heads)
        if (v := block.get("v")) is not None:
            plan[v.name] = ("rows", v_rows)
        elif (qkv := block.get("qkv")) is not None:  # [q; k; v]: v starts after q and k
            plan[qkv.name] = ("rows", v_rows + (layout.num_heads + layout.num_kv_heads) * layout.head_dim)
    return plan

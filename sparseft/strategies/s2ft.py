"""S²FT: structured sparse fine-tuning with partial back-propagation (Yang et al., NeurIPS 2024)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from sparseft.sparse.freezing import freeze_backbone_
from sparseft.sparse.layers import find_linear_layers
from sparseft.sparse.schedules import SparsitySchedule
from sparseft.sparse.selection import (
    DATA_CRITERIA,
    Allocation,
    Criterion,
    Order,
    UnitGroup,
    allocate,
    plan_slices,
    unit_count,
    unit_groups,
    unit_scores,
)
from sparseft.sparse.slices import SlicedLayer, slice_layer_
from sparseft.strategies.base import SparsityStrategy, check_learning_rates
from sparseft.strategies.registry import register_strategy

Plan = dict[str, tuple[str, torch.Tensor]]

#: the reference's ratios, the defaults of ``head_ratio`` and ``channel_ratio``
HEAD_RATIO, CHANNEL_RATIO = 0.052, 0.02
#: what ``heads`` and ``channels`` count: units over all blocks, not per block
UNITS = {"heads": "query heads (counted over all layers)", "channels": "FFN channels (counted over all layers)"}


@register_strategy("s2ft")
class S2FT(SparsityStrategy):
    """S²FT: train the weight slices of a few selected heads and FFN channels; all else is frozen.

    "Select sparsely, compute densely". For the selected query heads H_s and FFN channels C_s,
    only the input columns they own in the attention output (``o``) and the FFN output
    (``ffn_out``) are trained (the released scripts' column side):

        W_o = W0_o + Δ_o·E_{H_s}ᵀ,   W_down = W0_down + Δ_down·E_{C_s}ᵀ,   Δ = 0 at the start

    with the partial back-propagation of §3.3 (:class:`sparseft.sparse.slices.PartialBackprop`):
    ``∂L/∂Δ = dYᵀ·X[..., sel]`` saves only ``X[..., sel]``, ``∂L/∂X = dY·W``, and no gradient or
    optimizer state of full shape exists. ``rows`` adds the coupled row side (v rows of the
    selected heads' key/value heads, up and gate rows of the selected channels).

    Its "sparsity" is that of the *update*: the fraction of ``o`` / ``ffn_out`` (and, with
    ``rows``, v / ffn_in) weights left untrained. Weights are never zeroed, there is no schedule,
    and nothing is permuted: merged weights and adapters are index-aligned with the base model.
    Unlike the reference: correct under grouped-query attention (heads are query heads; the v
    rows follow their KV group), and the slices are ordinary parameters, so DDP and gradient
    accumulation work.

    Runs on: ``setup`` (select on rank 0, calibrating on the training data for data-driven
    criteria, broadcast, swap in the slice layers, freeze everything else).

    Args:
        head_ratio: fraction of all (layer, query head) pairs trained (reference: 0.052).
        channel_ratio: fraction of all (layer, FFN channel) pairs trained (reference: 0.02).
        heads: number of heads to train instead of ``head_ratio``.
        channels: number of FFN channels to train instead of ``channel_ratio``.
        sparsity: instead of the ratios, the update's sparsity: both ratios become ``1 − sparsity``
            (refused together with a ratio or count, which it would override).
        allocation: ``global`` (one ranking over all layers, the reference) or ``layer`` (the
            same count in every block).
        criterion: ``random`` (seeded; the reference), ``weight``, ``activation``,
            ``weight_activation`` or ``gradient`` (the paper's selection ablation).
        order: keep the ``largest`` or the ``smallest`` scores.
        rows: also train the coupled rows (v, up and gate); they save their full input.
        seed: seed of the random criterion.
        calibration_batches: training batches scored by data-driven criteria (on rank 0; at least 1).
        learning_rate: learning rate of the slices (None: the model's).
        weight_decay: weight decay of the slices (reference: 0).
        train_head: also train the task head; None (default): a classifier or QA head trains, an LM
            head stays frozen (the reference trains nothing but the slices of a causal LM).
        log_layers: log every layer's update sparsity.
    """

    freeze_base = True

    def __init__(
        self,
        head_ratio: float = HEAD_RATIO,
        channel_ratio: float = CHANNEL_RATIO,
        heads: int | None = None,
        channels: int | None = None,
        sparsity: float | None = None,
        allocation: Allocation = "global",
        criterion: Criterion = "random",
        order: Order = "largest",
        rows: bool = False,
        seed: int = 0,
        calibration_batches: int = 8,
        learning_rate: float | None = None,
        weight_decay: float = 0.0,
        train_head: bool | None = None,
        log_layers: bool = True,
    ) -> None:
        super().__init__(sparsity or 0.0, None, SparsitySchedule(kind="constant"), "layer", log_layers)
        head_ratio, channel_ratio = check_selection(head_ratio, channel_ratio, heads, channels, sparsity)
        if criterion in DATA_CRITERIA and calibration_batches < 1:
            raise ValueError(
                f"--sparsity.criterion {criterion} scores heads and channels on calibration_batches training batches, "
                f"but --sparsity.calibration_batches is {calibration_batches}: every score would be 0; give at least 1 "
                "(default 8), or criterion random"
            )
        if order not in ("largest", "smallest"):
            raise ValueError(f"unknown order {order!r}; use 'largest' or 'smallest'")
        check_learning_rates("sparsity", learning_rate=learning_rate)
        self.head_ratio, self.channel_ratio, self.heads, self.channels = head_ratio, channel_ratio, heads, channels
        self.allocation, self.criterion, self.order, self.rows = allocation, criterion, order, rows
        self.seed, self.calibration_batches = seed, calibration_batches
        self.learning_rate, self.weight_decay, self.train_head = learning_rate, weight_decay, train_head
        self._plan: Plan | None = None
        self.layers: list[SlicedLayer] = []

    # ---- plain PyTorch part ---------------------------------------------------------------
    def select(self, model: nn.Module, batches: Any = None, loss_fn: Any = None) -> Plan:
        """Per layer name ``(axis, indices)``; data-driven criteria need ``batches`` and ``loss_fn``."""
        groups = unit_groups(model)
        scores = unit_scores(model, groups, self.criterion, self.seed, batches, loss_fn)
        selected: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(groups)
        for members, k in self._unit_counts(groups):
            chosen = allocate([scores[i] for i in members], k, self.allocation, self.order)
            for i, units in zip(members, chosen):
                selected[i] = units
        return plan_slices(model, groups, selected, self.rows)

    def _unit_counts(self, groups: list[UnitGroup]) -> list[tuple[list[int], int]]:
        """Per kind of unit the model has (heads, channels): its groups' indices and how many units to select."""
        counts = []
        for kind, ratio, count in (("heads", self.head_ratio, self.heads),
                                   ("channels", self.channel_ratio, self.channels)):
            members = [i for i, group in enumerate(groups) if group.kind == kind]
            if members:
                total = sum(groups[i].units for i in members)
                counts.append((members, unit_count(ratio, count, total, f"--sparsity.{kind}", UNITS[kind])))
        return counts

    def check_model(self, model: nn.Module) -> None:
        """Also refuse ``heads`` / ``channels`` above what the model has, before the data is read."""
        super().check_model(model)
        self._unit_counts(unit_groups(model))

    @classmethod
    def attaches_to_empty(cls, init_args: Mapping[str, Any]) -> bool:
        """The seeded random selection reads shapes only (Δ starts at zero); weight and data criteria read
        the weights (and run the model) to choose."""
        return init_args.get("criterion", "random") == "random"

    def attach(self, model: nn.Module) -> list[SlicedLayer]:
        """Swap the planned layers for slice layers and freeze the rest (idempotent)."""
        if self.layers:
            return self.layers
        if self._plan is None:
            if self.criterion in DATA_CRITERIA:  # e.g. rebuilt for export: the checkpoint restores the slices
                rank_zero_warn(f"criterion {self.criterion!r} without calibration data: empty slices until a "
                               "checkpoint is loaded (call select(model, batches, loss_fn) to choose them)")
                self._plan = {group.layer.name: ("columns", torch.empty(0, dtype=torch.long))
                              for group in unit_groups(model)}
            else:
                self._plan = self.select(model)
        by_name = {layer.name: layer for layer in find_linear_layers(model)}
        self.layers = [slice_layer_(model, by_name[name], index, axis) for name, (axis, index) in self._plan.items()]
        train_head = self.train_head if self.train_head is not None else model.get_output_embeddings() is None
        freeze_backbone_(model, {id(p) for p in self.slice_parameters()}, train_head)
        self._measure()
        self.final_sparsity = self.applied_sparsity = self.measured_sparsity()
        return self.layers

    def slice_parameters(self) -> list[nn.Parameter]:
        """The trainable ``Δ`` of every slice layer."""
        return [layer.module.delta for layer in self.layers]

    def _measure(self) -> None:
        self._measured = {layer.name: 1.0 - layer.trained / layer.numel for layer in self.layers}

    def measured_sparsity(self) -> float:
        """Fraction of the target weights (o, ffn_out; with ``rows`` also v, ffn_in) not trained."""
        total = sum(layer.numel for layer in self.layers)
        return 1.0 - sum(layer.trained for layer in self.layers) / max(total, 1)

    def needs_update(self, sparsity: float) -> bool:
        return False  # the selection is fixed at setup: no schedule, no masks to move

    def update_masks(self, sparsity: float) -> None:
        self._measure()

    # ---- Lightning hooks -----------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.check_weights_present(pl_module.model)
        if not self.layers and self._plan is None:
            plan = self._calibrated_plan(trainer, pl_module) if trainer.is_global_zero else None
            self._plan = trainer.strategy.broadcast(plan, src=0)
        super().setup(trainer, pl_module, stage)

    def _calibrated_plan(self, trainer: Trainer, pl_module: LightningModule) -> Plan:
        if self.criterion not in DATA_CRITERIA:
            return self.select(pl_module.model)
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError(f"criterion {self.criterion!r} calibrates on the datamodule's training data: "
                             "fit with a datamodule, or call select() yourself")
        model, was_training = pl_module.model, pl_module.model.training
        device = trainer.strategy.root_device
        model.to(device).eval()

        def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            inputs = {key: value.to(device) for key, value in pl_module.model_inputs(batch).items()}
            return model(**inputs).loss

        try:
            batches = itertools.islice(datamodule.train_dataloader(), self.calibration_batches)
            return {name: (axis, index.cpu()) for name, (axis, index) in self.select(model, batches, loss_fn).items()}
        finally:
            model.train(was_training)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # the model's state has restored the checkpoint's slices
        self.final_sparsity = self.applied_sparsity = self.measured_sparsity()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Nothing to harden: the selection never changes."""

    def param_groups(self) -> list[dict[str, Any]]:
        group: dict[str, Any] = {"params": self.slice_parameters(), "weight_decay": self.weight_decay}
        if self.learning_rate is not None:
            group["lr"] = self.learning_rate
        return [group]


def check_selection(
    head_ratio: float, channel_ratio: float, heads: int | None, channels: int | None, sparsity: float | None
) -> tuple[float, float]:
    """The ratios S²FT selects with, refusing settings that contradict each other or train nothing.

    ``sparsity`` stands for both ratios (``1 − sparsity``), so it cannot come with ratios or counts of
    its own (it silently won over them); head and channel shares both 0 leave no parameter to train
    (as magnitude and SPDF refuse their empty cases).
    """
    if sparsity is not None:
        given = [f"--sparsity.{name}" for name, value, default in (
            ("head_ratio", head_ratio, HEAD_RATIO), ("channel_ratio", channel_ratio, CHANNEL_RATIO),
            ("heads", heads, None), ("channels", channels, None)) if value != default]
        if given:
            raise ValueError(
                f"--sparsity.sparsity sets both head_ratio and channel_ratio to 1 - sparsity, but {', '.join(given)} "
                f"{'is' if len(given) == 1 else 'are'} also given: give either sparsity or the ratios and counts, "
                "not both"
            )
        head_ratio = channel_ratio = 1.0 - sparsity
    for name, ratio in (("head_ratio", head_ratio), ("channel_ratio", channel_ratio)):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"--sparsity.{name} must be in [0, 1], got {ratio}")
    if (heads if heads is not None else head_ratio) == 0 and (channels if channels is not None else channel_ratio) == 0:
        raise ValueError(
            "--sparsity.head_ratio (or heads) and --sparsity.channel_ratio (or channels) are both 0: S²FT would "
            "train nothing; raise either of them above 0"
        )
    return head_ratio, channel_ratio

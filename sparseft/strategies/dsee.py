"""DSEE: dually sparsity-embedded efficient tuning (Chen et al., ACL 2023)."""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from sparseft.sparse.decompose import SupportMethod, sparse_support
from sparseft.sparse.deltas import LowRank, RowBlocks, ScaledSum, SparseResidual, check_rank
from sparseft.sparse.freezing import freeze_backbone_
from sparseft.sparse.layers import LinearLayer
from sparseft.sparse.masks import keep_highest, pruned_count
from sparseft.sparse.parametrize import SparseLayer
from sparseft.sparse.prune import prune_, sparsify
from sparseft.sparse.schedules import SparsitySchedule
from sparseft.sparse.structured import (
    ATTENTION_ROLES,
    FFN_ROLES,
    Block,
    HeadLayout,
    channel_masks,
    channel_scores,
    group_blocks,
    head_masks,
    head_scores,
    split_qkv,
)
from sparseft.sparse.targets import TargetSpec, select_targets, update_targets
from sparseft.strategies.base import SparsityStrategy, check_learning_rates
from sparseft.strategies.registry import register_strategy

Supports = dict[str, list[torch.Tensor]]


@register_strategy("dsee")
class DSEE(SparsityStrategy):
    """DSEE: a frozen ``W0``, a low-rank plus sparse update, then one-shot pruning and re-tuning.

    One run, three stages (the paper's two scripts, with the optimizer restarted in between):

    1. **Sparsity-embedded tuning** (eq. 1): ``ΔW = (α/r)·(B·A + S2)`` on ``targets`` (q and v),
       A: r×in ~ N(0, 0.02²), B = 0, and S2 holding ``num_sparse`` values, initially 0, on a
       fixed support Ω = top-N ``|S|`` of a decomposition ``W0 ≈ U·V + S`` with ``card(S) = N``
       and ``rank(U·V) ≤ decompose_rank`` (eq. 2, GreBsmo; sparseft's solver, not the reference's
       loop, which ``support: grebsmo_reference`` reproduces), computed on rank 0 and broadcast.
       Only A, B, S2 (and the head) train.
    2. **Pruning** at the first step the schedule gives a sparsity above 0 (default: one shot
       half-way), of the *effective* weight ``W0 + ΔW`` (the mask is inside the
       parametrization, so the merged model is really sparse; the reference masks W0 only):
       ``global`` / ``layer`` magnitude pruning of ``prune_targets`` by ``|W0 + ΔW|``
       (``criterion: weight``, the paper) or by ``|ΔW|`` where there is an update and ``|W0|``
       elsewhere, as two pools (``criterion: update``, the released scripts' ``ABS``); or
       ``heads``: in every block drop the ``floor(sparsity·heads)`` heads with the lowest
       ``Σ_{rows of h} |ΔW_q| + |ΔW_v|`` (masking their q, k, v rows and output columns), and
       ``ffn_sparsity`` of the FFN channels by ``‖W_in[j,:]‖₁·‖W_out[:,j]‖₁``.
    3. **Re-tuning**: A, B, S2 and the head continue; the optimizer and the LR schedule restart
       (a LambdaLR schedule, the module's, is stretched over the remaining steps).

    A cubic or linear ``schedule`` prunes gradually after the restart instead (not in the paper).
    ``num_sparse: 0`` with ``sparsity: 0`` is LoRA (the paper's baseline; the ``lora`` strategy is
    standard LoRA). Until a layer's mask is first set, its ΔW is applied on the input side,
    ``y = x·W0ᵀ + b + (α/r)·(x·Aᵀ·Bᵀ + x·S2ᵀ)`` (no ``W0 + ΔW`` formed: LoRA's cost); from then on
    in the weight, ``M ⊙ (W0 + ΔW)``. At sparsity 0 no layer has a mask. Export removes pruned heads
    and FFN channels physically.

    Runs on: ``setup`` (supports on rank 0, attach, freeze), ``on_train_start`` (re-stretch the
    LR schedule when resuming in stage 3), ``on_train_batch_start`` (prune; restart the
    optimizer at the stage boundary), ``on_train_end``.

    Args:
        sparsity: ``global``/``layer``: fraction of the ``prune_targets`` weights removed (paper:
            0.5); ``heads``: fraction of heads removed in every block, ``floor(sparsity·heads)``
            (0.25: 3 of 12). Under GQA whole key/value groups are removed.
        targets: layers that get the update ΔW (roles or whole-name regular expressions; default:
            ``q`` and ``v``, or GPT-2's fused ``qkv``).
        prune_targets: layers pruned by ``global``/``layer`` (default: every block linear).
        pattern: ``global`` (one magnitude ranking, the paper), ``layer`` or ``heads``.
        criterion: ``weight`` (``|W0 + ΔW|``) or ``update`` (``|ΔW|`` / ``|W0|``, two pools).
        ffn_sparsity: with ``heads``, fraction of FFN channels removed in every block.
        schedule: when pruning happens (default: one shot at half of the optimizer steps).
        rank: r of ``B·A``.
        alpha: α; ΔW is scaled by α/r.
        num_sparse: N, the size of Ω in every target matrix (64, the paper's text; the reference's
            ``run_glue.py`` defaults to 128 and its scripts pass 16).
        support: ``grebsmo`` (rank ≤ ``decompose_rank``, ``card(S) = N``), ``grebsmo_reference``
            (the official loop and ``kthvalue >=`` rule: more than N entries on ties, all of them
            when its rank saturates, as on any matrix with a side of 496 or less; a warning names
            the layer), ``magnitude`` (top-N ``|W0|``) or ``random``.
        decompose_rank: rank cap of ``U·V`` for ``grebsmo`` (the reference grows it to 496).
        seed: seed of the support choice.
        learning_rate: learning rate of A, B and S2 before pruning (None: the model's).
        retune_learning_rate: learning rate of A, B and S2 after pruning (None: as before).
        train_head: also train the task head (the reference does).
        log_layers: log every layer's sparsity.
    """

    freeze_base = True

    def __init__(
        self,
        sparsity: float = 0.5,
        targets: TargetSpec = None,
        prune_targets: TargetSpec = None,
        pattern: Literal["global", "layer", "heads"] = "global",
        criterion: Literal["weight", "update"] = "weight",
        ffn_sparsity: float = 0.0,
        schedule: SparsitySchedule | None = None,
        rank: int = 16,
        alpha: float = 32.0,
        num_sparse: int = 64,
        support: SupportMethod = "grebsmo",
        decompose_rank: int = 16,
        seed: int = 0,
        learning_rate: float | None = None,
        retune_learning_rate: float | None = None,
        train_head: bool = True,
        log_layers: bool = True,
    ) -> None:
        schedule = schedule or SparsitySchedule(kind="one_shot", initial_warmup=0.5)
        super().__init__(sparsity, targets, schedule, "layer" if pattern == "heads" else pattern, log_layers)
        if pattern == "heads" and schedule.ramps:
            raise ValueError("pattern 'heads' prunes once: use a one_shot schedule")
        if criterion not in ("weight", "update"):
            raise ValueError(f"unknown criterion {criterion!r}; use 'weight' or 'update'")
        if not 0.0 <= ffn_sparsity < 1.0 or (ffn_sparsity and pattern != "heads"):
            raise ValueError("ffn_sparsity must be in [0, 1) and is used with pattern 'heads' only")
        self.pattern, self.prune_targets, self.criterion = pattern, prune_targets, criterion
        self.ffn_sparsity = ffn_sparsity
        self.rank, self.alpha, self.num_sparse, self.support = rank, alpha, num_sparse, support
        self.decompose_rank, self.seed = decompose_rank, seed
        check_learning_rates("sparsity", learning_rate=learning_rate, retune_learning_rate=retune_learning_rate)
        self.learning_rate, self.retune_learning_rate, self.train_head = learning_rate, retune_learning_rate, train_head
        self.stage: Literal["tune", "retune"] = "tune"
        self.boundary_step: int | None = None
        self._supports: Supports | None = None
        self._update_names: set[str] = set()
        self._layout: HeadLayout | None = None

    # ---- plain PyTorch part ---------------------------------------------------------------
    def update_targets(self, model: nn.Module) -> list[LinearLayer]:
        """The layers that get ΔW: ``targets``, or by default q and v (GPT-2: the fused qkv)."""
        return update_targets(model, self.targets)

    def check_model(self, model: nn.Module) -> None:
        """Targets and prune targets must match layers, ``rank`` must fit every update matrix, and every update
        matrix must hold ``num_sparse`` values."""
        self.check_rank(model)
        sizes = {layer.name: (layer.shape[0] // layer.fused_matrices, layer.shape[1])
                 for layer in self.update_targets(model)}
        name, (rows, columns) = min(sizes.items(), key=lambda item: item[1][0] * item[1][1])
        if self.num_sparse > rows * columns:
            raise ValueError(
                f"sparsity.num_sparse {self.num_sparse} is more than the {rows}x{columns} = {rows * columns} weights "
                f"of {name}: set sparsity.num_sparse to at most {rows * columns}"
            )
        self._pruned_names(model)

    def choose_supports(self, model: nn.Module) -> Supports:
        """Ω for every matrix of every update target (a fused qkv layer holds three)."""
        self.check_model(model)
        generator = torch.Generator().manual_seed(self.seed)
        supports = {}
        for layer in self.update_targets(model):
            chunks = layer.weight().detach().float().cpu().chunk(layer.fused_matrices)
            supports[layer.name] = [sparse_support(chunk, self.num_sparse, self.support, self.decompose_rank,
                                                   generator) for chunk in chunks]
            selected, wanted = sum(s.numel() for s in supports[layer.name]), self.num_sparse * len(chunks)
            if selected > wanted:  # only grebsmo_reference's `kthvalue >=` rule keeps ties
                why = "dense S2: its S is 0" if selected == layer.weight().numel() else "ties in |S|"
                rank_zero_warn(f"DSEE {self.support}: {layer.name} selects {selected} of {layer.weight().numel()} "
                               f"entries, not {wanted} ({why})")
        return supports

    def make_delta(self, layer: LinearLayer) -> nn.Module | None:
        if layer.name not in self._update_names:
            return None
        out_features, in_features = layer.shape
        shape = (out_features // layer.fused_matrices, in_features)
        parts = [self._update(shape, support) for support in self._supports[layer.name]]
        return parts[0] if len(parts) == 1 else RowBlocks(parts)

    def _update(self, shape: tuple[int, int], support: torch.Tensor) -> nn.Module:
        low_rank = LowRank(shape, self.rank, 1.0, left_std=None, right_std=0.02)
        parts = [low_rank, SparseResidual(shape, support)] if self.num_sparse else [low_rank]
        return ScaledSum(parts, self.alpha / self.rank)

    def check_rank(self, model: nn.Module) -> None:
        """Refuse a ``rank`` above a target matrix's (before any support is computed)."""
        for layer in self.update_targets(model):
            out_features, in_features = layer.shape
            check_rank(self.rank, (out_features // layer.fused_matrices, in_features), layer.name, "sparsity.rank")

    def attach(self, model: nn.Module) -> list[SparseLayer]:
        if self.layers:
            return self.layers
        self.check_model(model)
        self._update_names = {layer.name for layer in self.update_targets(model)}
        if self._supports is None:
            self._supports = self.choose_supports(model)
        names = self._update_names | self._pruned_names(model)
        # no masks at sparsity 0 (LoRA, with S2): nothing is ever pruned
        self.layers = sparsify(model, [re.escape(name) for name in names], self.make_delta, None, True,
                               masked=self.final_sparsity > 0)
        freeze_backbone_(model, {id(p) for p in self.update_parameters()}, self.train_head)
        self._layout = HeadLayout.of(model) if self.pattern == "heads" else None
        self._measure()
        return self.layers

    def _pruned_names(self, model: nn.Module) -> set[str]:
        if self.final_sparsity == 0:
            return set()
        if self.pattern != "heads":
            return {layer.name for layer in select_targets(model, self.prune_targets)}
        roles = ATTENTION_ROLES + (FFN_ROLES if self.ffn_sparsity else ())
        names = {layer.name for layer in select_targets(model, None) if layer.role in roles}
        if not names:
            raise ValueError("pattern 'heads' needs attention role presets for this model type")
        return names

    @property
    def structured(self) -> bool:
        return self.pattern == "heads"

    def update_parameters(self) -> list[nn.Parameter]:
        """A, B and S2 values of every update target."""
        return [p for layer in self.layers if layer.param.delta is not None for p in layer.param.delta.parameters()]

    def compute_scores(self) -> list[torch.Tensor]:
        """Unstructured scores of every layer: ``|W0 + ΔW|``, or ``|ΔW|`` where there is an update
        (criterion ``update``); pruned weights score 0, so a gradual schedule never revives them."""
        return [
            (layer.param.delta() if self.criterion == "update" and layer.param.delta is not None
             else layer.dense()).abs() * layer.mask
            for layer in self.layers
        ]

    @torch.no_grad()
    def update_masks(self, sparsity: float) -> None:
        if self.pattern == "heads":
            if sparsity > 0:
                by_name = {layer.name: layer for layer in self.layers}
                for name, keep in self.structured_masks().items():
                    by_name[name].set_mask_(keep)
        else:
            scores = self.compute_scores()
            for pool in self._pools():
                prune_([self.layers[i] for i in pool], [scores[i] for i in pool], sparsity, self.pattern)
        self.applied_sparsity = sparsity
        self._measure()

    def _pools(self) -> list[list[int]]:
        """Layers ranked together: all, or (criterion ``update``) those with and without ΔW apart."""
        if self.criterion == "weight":
            return [list(range(len(self.layers)))]
        with_update = [i for i, layer in enumerate(self.layers) if layer.param.delta is not None]
        without = [i for i, layer in enumerate(self.layers) if layer.param.delta is None]
        return [pool for pool in (with_update, without) if pool]

    def structured_masks(self) -> dict[str, torch.Tensor]:
        """Head (and FFN channel) keep-masks for every block, by layer name."""
        by_name = {layer.name: layer for layer in self.layers}
        masks: dict[str, torch.Tensor] = {}
        for block in group_blocks([layer.layer for layer in self.layers]):
            scores = head_scores(*self._query_value_deltas(block, by_name), self._layout)
            keep = keep_highest(scores, pruned_count(self._layout.units, self.final_sparsity))
            masks.update(head_masks(block, keep, self._layout))
            if self.ffn_sparsity:
                into = [by_name[layer.name].dense() for layer in block.ffn_in]
                channels = channel_scores(into, by_name[block.get("ffn_out").name].dense())
                dropped = pruned_count(len(channels), self.ffn_sparsity)
                masks.update(channel_masks(block, keep_highest(channels, dropped)))
        return masks

    def _query_value_deltas(self, block: Block, by_name: dict[str, SparseLayer]) -> tuple[Any, Any]:
        """``ΔW_q`` and ``ΔW_v`` of a block (None where that projection has no update)."""
        deltas = {role: by_name[layer.name].param.delta for role, layer in block.roles.items()}
        found = {role: delta() for role, delta in deltas.items() if role in ("q", "v", "qkv") and delta is not None}
        if not found:
            raise ValueError(f"block {block.index}: head scores need an update on q or v (targets {self.targets})")
        if "qkv" in found:
            query, _, value = split_qkv(found["qkv"], self._layout)
            return query, value
        return found.get("q"), found.get("v")

    # ---- Lightning hooks -----------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.check_weights_present(pl_module.model)
        if not self.layers and self._supports is None:
            self.check_rank(pl_module.model)  # on every rank, before rank 0 computes the supports
            supports = self.choose_supports(pl_module.model) if trainer.is_global_zero else None
            self._supports = trainer.strategy.broadcast(supports, src=0)
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.stage == "retune":  # resumed after the boundary: the module rebuilt a full-length schedule
            stretch_schedules_(trainer, self.boundary_step, self.total_steps)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.stage == "tune" and self.applied_sparsity > 0:
            self.stage, self.boundary_step = "retune", self.step
            restart_optimization_(trainer, self.step, self.total_steps)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        pl_module.log("dsee/stage", float(self.stage == "retune"))

    def param_groups(self) -> list[dict[str, Any]]:
        group: dict[str, Any] = {"params": self.update_parameters(), "weight_decay": 0.0}
        retuning = self.stage == "retune" and self.retune_learning_rate is not None
        learning_rate = self.retune_learning_rate if retuning else self.learning_rate
        if learning_rate is not None:
            group["lr"] = learning_rate
        return [group]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stage": self.stage, "boundary_step": self.boundary_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.stage, self.boundary_step = state_dict["stage"], state_dict["boundary_step"]


def restart_optimization_(trainer: Trainer, step: int, total_steps: int) -> None:
    """Fresh optimizers and LR schedules from ``configure_optimizers``, stretched over the steps left.

    Lightning fetches ``trainer.optimizers`` after ``on_train_batch_start``, so the new
    optimizer takes this very step.
    """
    trainer.strategy.setup_optimizers(trainer)
    stretch_schedules_(trainer, step, total_steps)


def stretch_schedules_(trainer: Trainer, start: int, total_steps: int) -> None:
    """Make each LambdaLR schedule, written for ``total_steps``, span the steps after ``start``."""
    factor = total_steps / max(1, total_steps - start)
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            scheduler.lr_lambdas = [_stretched(fn, factor) for fn in scheduler.lr_lambdas]
        else:
            rank_zero_warn(f"DSEE restarts {type(scheduler).__name__} as configured, not over the steps left")


def _stretched(schedule: Any, factor: float) -> Any:
    def stretched(step: int) -> float:  # a plain function: LambdaLR does not checkpoint it
        return schedule(step * factor)

    return stretched

"""Movement pruning (Sanh, Wolf & Rush, NeurIPS 2020), hard (top-k) and soft (threshold)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from sparseft.sparse.freezing import freeze_embeddings_
from sparseft.sparse.layers import LinearLayer
from sparseft.sparse.masks import global_topk_masks, threshold_mask
from sparseft.sparse.parametrize import SparseLayer
from sparseft.sparse.schedules import SparsitySchedule
from sparseft.sparse.scores import LearnedScores, ScoreInit
from sparseft.sparse.sharding import total, whole_parameters
from sparseft.sparse.targets import TargetSpec
from sparseft.strategies.base import SparsityStrategy, check_learning_rates
from sparseft.strategies.registry import register_strategy


def movement_schedule() -> SparsitySchedule:
    """The reference's defaults (README and argparse of ``masked_run_glue.py``): dense for one LR
    warm-up, the final sparsity for the last two (``initial_warmup 1``, ``final_warmup 2``)."""
    return SparsitySchedule(kind="cubic", initial_warmup=1, final_warmup=2, warmup_unit="lr_warmup")


@register_strategy("movement")
class Movement(SparsityStrategy):
    """Movement pruning: learn a score ``S`` per weight and keep the weights that move away from zero.

    ``W' = M(S) ⊙ W`` with a straight-through estimator, so ``∂L/∂S = ∂L/∂W' ⊙ W`` and under
    SGD ``S ≈ -Σ_t W·∂L/∂W`` (eq. 3 of the paper). ``W`` keeps training; pruned weights get
    zero gradient but keep their value and can come back while the scores move.

    * ``hard`` (the paper's MvP): ``M = Top_v(S)`` keeps the top ``1 - s_t`` fraction of each
      matrix (``pattern: global`` ranks all targets together, recomputing the threshold every
      ``global_topk_every`` steps as the reference does), ``s_t`` on the cubic schedule.
    * ``soft``: ``M = σ(S) > τ_t`` with ``τ`` going from 0 to ``final_threshold`` on the
      schedule, plus ``λ_t · mean_matrices(mean σ(S))`` added to the loss, ``λ_t = final_lambda ·
      τ_t / final_threshold``; each matrix keeps at least 0.5% of its weights. The final
      sparsity is what the threshold yields (``sparsity`` is ignored): it is logged and exported.

    As in the paper, embeddings are frozen (``freeze_embeddings``) and the scores have their own
    optimizer group (``score_lr`` 1e-2, no weight decay; the LR schedule applies to it too).
    The mask is recomputed once per optimizer step rather than at every forward, which is the
    same thing between optimizer steps; validation, test, predict, the end of training and
    checkpoints recompute it from the scores the last step left, as the reference's next
    forward would. Kept count ``int((1 − s)·numel)`` per matrix, as emmental's TopKBinarizer.
    Remaining differences from the reference (docs/strategies/movement.md, with numbers): ties
    broken by position; soft pruning's 0.5% floor keeps exactly the floor; evaluation runs at
    the current, not the final, threshold; global top-k is exact.

    Runs on: ``on_train_batch_start`` (masks from the current scores, every step),
    ``training_step`` via ``loss_term`` (soft: the score penalty), ``on_train_end``.

    Args:
        sparsity: hard variant: final fraction of target weights removed.
        variant: ``hard`` (top-k) or ``soft`` (threshold on σ(S) with an L1 penalty).
        targets: role names or whole-name regular expressions (default: all block linears).
        schedule: the cubic schedule of the paper (default: the reference's, dense for one LR
            warm-up, final for the last two; give ``warmup_unit: fraction`` for fractions of training).
        pattern: hard variant: ``layer`` (the paper's default), ``global``, or ``N:M`` such as
            ``2:4`` with ``sparsity`` ``1 − N/M``: every group of M inputs keeps its top scores,
            M then fewer then N as the schedule rises (docs/strategies/movement.md).
        global_topk_every: with ``pattern: global``, steps between threshold recomputations.
        final_threshold: soft variant: final τ on σ(S) (paper: 0.1).
        final_lambda: soft variant: final weight of the score penalty (paper sweeps 1 to 2300).
        score_init: ``constant`` (paper), ``uniform`` or ``kaiming``.
        score_init_scale: constant value, or bound of the uniform init.
        score_lr: learning rate of the scores.
        freeze_embeddings: freeze the input embeddings, as the paper does.
        log_layers: log every target layer's sparsity.
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        variant: Literal["hard", "soft"] = "hard",
        targets: TargetSpec = None,
        schedule: SparsitySchedule | None = None,
        pattern: str = "layer",
        global_topk_every: int = 25,
        final_threshold: float = 0.1,
        final_lambda: float = 0.0,
        score_init: ScoreInit = "constant",
        score_init_scale: float = 0.0,
        score_lr: float = 1e-2,
        freeze_embeddings: bool = True,
        log_layers: bool = True,
    ) -> None:
        super().__init__(sparsity, targets, schedule or movement_schedule(), pattern, log_layers)
        if variant not in ("hard", "soft"):
            raise ValueError(f"unknown movement variant {variant!r}; use hard or soft")
        if variant == "soft" and self.mask_pattern.scope == "nm":
            raise ValueError(
                f"soft movement pruning keeps whatever σ(S) > τ keeps, so it cannot follow pattern {pattern!r}: "
                "use variant hard with it"
            )
        if variant == "soft" and not 0.0 < final_threshold < 1.0:
            raise ValueError(f"final_threshold is a threshold on sigmoid(S) in (0, 1), got {final_threshold}")
        self.variant = variant
        self.global_topk_every = global_topk_every
        self.final_threshold = final_threshold
        self.final_lambda = final_lambda
        check_learning_rates("sparsity", score_lr=score_lr)
        self.score_init, self.score_init_scale, self.score_lr = score_init, score_init_scale, score_lr
        self.freeze_embeddings = freeze_embeddings
        self._global_threshold: float | None = None

    masks_follow_scores = True
    pruned_count_rule = "keep_floor"
    gathers_what_it_reads = True  # one layer's scores at a time (a global top-k keeps them all)
    attaches_to_empty_weights = True  # scores start from their init, not from the weights

    def make_score(self, layer: LinearLayer) -> nn.Module:
        return LearnedScores(layer.shape, self.score_init, self.score_init_scale)

    def attach(self, model: nn.Module) -> list[SparseLayer]:
        if not self.layers and self.freeze_embeddings:
            freeze_embeddings_(model)
        return super().attach(model)

    def scores(self) -> list[torch.Tensor]:
        return [layer.param.score.scores for layer in self.layers]

    def layer_scores(self, layer: SparseLayer) -> torch.Tensor:
        return layer.param.score.scores.detach()

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.scores(), "lr": self.score_lr, "weight_decay": 0.0}]

    def needs_update(self, sparsity: float) -> bool:
        return True  # the scores move at every optimizer step

    # ---- soft variant: τ_t and λ_t follow the schedule --------------------------------------
    def threshold(self) -> float:
        """τ_t: 0 before the schedule starts, then the cubic ramp to ``final_threshold``."""
        shaped = self.schedule.progress(self.step, self.total_steps, self.lr_warmup_steps) or 0.0
        return self.final_threshold * shaped

    def loss_term(self) -> torch.Tensor | None:
        """Soft variant: ``λ_t · mean over matrices of mean σ(S)`` (emmental's l1 regulariser).

        Under FSDP2 the scores are shards here, outside the forward: each matrix's sum is taken over
        every rank's shard (:func:`~sparseft.sparse.sharding.total`), so the penalty and its gradient
        are DDP's."""
        if self.variant != "soft" or self.final_lambda == 0.0:
            return None
        penalty = torch.stack([total(torch.sigmoid(score)) / score.numel() for score in self.scores()]).mean()
        return self.final_lambda * self.threshold() / self.final_threshold * penalty

    @torch.no_grad()
    def update_masks(self, sparsity: float) -> None:
        if self.variant == "soft":
            threshold = self.threshold()
            for layer in self.layers:
                with whole_parameters([layer.param.score]):
                    layer.set_mask_(threshold_mask(torch.sigmoid(self.layer_scores(layer)), threshold))
            self._measure()
            self.applied_sparsity = self.measured_sparsity()  # soft: whatever the threshold yields
        elif self.pattern == "global":
            self._update_global(sparsity)
        else:
            super().update_masks(sparsity)

    def _update_global(self, sparsity: float) -> None:
        """Exact global top-k every ``global_topk_every`` steps (or when the target changes);
        in between, the same score threshold applied to the moving scores."""
        scores = self.gathered_scores()
        if self._global_threshold is None or sparsity != self.applied_sparsity or (
            self.step % self.global_topk_every == 0
        ):
            masks = global_topk_masks(scores, sparsity, self.pruned_count_rule)
            kept = [score[mask] for score, mask in zip(scores, masks) if mask.any()]
            self._global_threshold = float(torch.cat(kept).min()) if sparsity > 0 and kept else None
        else:
            masks = [score >= self._global_threshold for score in scores]
        for layer, keep in zip(self.layers, masks, strict=True):
            layer.set_mask_(keep)
        self.applied_sparsity = sparsity
        self._measure()

    @torch.no_grad()
    def refresh_masks(self) -> None:
        """Masks of the current scores; global top-k is recomputed exactly, as the reference's
        evaluation does, without touching the threshold the training steps reuse."""
        if self.variant == "hard" and self.pattern == "global":
            masks = global_topk_masks(self.gathered_scores(), self.applied_sparsity, self.pruned_count_rule)
            for layer, keep in zip(self.layers, masks, strict=True):
                layer.set_mask_(keep)
            self._measure()
        else:
            super().refresh_masks()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.variant == "hard":
            super().on_train_end(trainer, pl_module)
        else:  # soft: the sparsity is what the threshold yields
            self._refresh_if_stale()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "global_threshold": self._global_threshold}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._global_threshold = state_dict.get("global_threshold")

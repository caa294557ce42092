"""PST: parameter-efficient sparse training (Li et al., IJCAI 2022)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparseft.sparse.deltas import LowRank, RowBlocks, check_rank
from sparseft.sparse.freezing import freeze_backbone_
from sparseft.sparse.importance import PSTImportance
from sparseft.sparse.layers import LinearLayer
from sparseft.sparse.parametrize import SparseLayer
from sparseft.sparse.schedules import SparsitySchedule
from sparseft.sparse.targets import TargetSpec
from sparseft.strategies.base import SparsityStrategy, check_learning_rates
from sparseft.strategies.registry import register_strategy


def _per_matrix(layer: LinearLayer, build: Any) -> nn.Module:
    """``build(shape)`` for a plain layer; one per matrix, stacked, for a fused ``qkv`` layer."""
    blocks = layer.fused_matrices
    out_features, in_features = layer.shape
    if blocks == 1:
        return build(layer.shape)
    return RowBlocks([build((out_features // blocks, in_features)) for _ in range(blocks)])


@register_strategy("pst")
class PST(SparsityStrategy):
    """Parameter-efficient sparse training: a frozen ``W0``, a LoRA update, a factorized importance.

    ``W_eff = W0 + β·U·V`` (U ~ N(0, 1), V = 0), the importance
    ``S = |W_eff| + α1·A·B + α2·(R·1ᵀ + 1·Cᵀ)`` (eq. 6-8), and the forward uses
    ``M ⊙ W_eff`` where ``M`` prunes exactly ``int(numel·s_t)`` lowest scores of each matrix
    (the reference's count), recomputed every optimizer step; validation, test, predict, the end
    of training and checkpoints recompute it from the final scores, as the reference's forward
    and ``convert()`` do. The straight-through mask has no gating, so A, B, R, C
    receive ``(∂L/∂W') ⊙ W_eff`` and U, V get gradient through both ``M ⊙ W_eff`` and
    ``|W_eff|``. Only U, V, A, B, R, C (and optionally the task head) are trained:
    ``17·(out + in)`` parameters per target matrix at the default ranks. For GPT-2, q, k and v
    inside the fused ``c_attn`` are three matrices, each with its own factors and top-k.

    Difference from the reference code, on purpose: ``train_head`` (default on) trains the task
    head, which the official scripts leave at its random initialisation; set it off to
    reproduce them. Export merges ``M ⊙ (W0 + β·U·V)`` into exactly sparse plain weights.

    Runs on: ``setup`` (attach; freeze all but the PST factors and the head),
    ``on_train_batch_start`` (masks from the current scores, every step once pruning starts;
    the training forward computes the scores once and takes the top-k from them, as the
    reference's forward does), ``on_train_end``.

    Args:
        sparsity: final fraction of every target matrix removed (paper: 0.9).
        targets: role names or whole-name regular expressions (default: all block linears).
        schedule: sparsity over training (default cubic, dense 10%, final 30%, as the paper).
        weight_rank: ``r_w``, rank of the update ``U·V``.
        mask_rank: ``r_m``, rank of the data-driven score ``A·B``.
        beta: ``β``, scale of the update.
        alpha1: ``α1``, weight of ``A·B`` in the score.
        alpha2: ``α2``, weight of ``R`` and ``C`` in the score.
        train_head: also train the task head (the official code does not).
        learning_rate: learning rate of the PST factors; None uses the model's.
        pattern: ``layer`` (the paper's per-matrix top-k) or ``N:M`` such as ``2:4`` with
            ``sparsity`` ``1 − N/M``: every group of M inputs keeps its top scores, M then fewer
            then N as the schedule rises (docs/strategies/pst.md).
        log_layers: log every target layer's sparsity.
    """

    freeze_base = True
    masks_from_forward_scores = True
    masks_follow_scores = True
    pruned_count_rule = "floor"
    attaches_to_empty_weights = True  # factors drawn at random; importance computed in the forward

    def __init__(
        self,
        sparsity: float = 0.9,
        targets: TargetSpec = None,
        schedule: SparsitySchedule | None = None,
        weight_rank: int = 8,
        mask_rank: int = 8,
        beta: float = 1.0,
        alpha1: float = 1.0,
        alpha2: float = 1.0,
        train_head: bool = True,
        learning_rate: float | None = None,
        pattern: str = "layer",
        log_layers: bool = True,
    ) -> None:
        super().__init__(sparsity, targets, schedule, pattern, log_layers)
        if self.mask_pattern.scope == "global":
            raise ValueError("PST ranks every matrix on its own: use pattern 'layer' or an N:M pattern such as '2:4'")
        self.weight_rank, self.mask_rank = weight_rank, mask_rank
        self.beta, self.alpha1, self.alpha2 = beta, alpha1, alpha2
        self.train_head = train_head
        check_learning_rates("sparsity", learning_rate=learning_rate)
        self.learning_rate = learning_rate

    def make_delta(self, layer: LinearLayer) -> nn.Module:
        out_features, in_features = layer.shape
        matrix = (out_features // layer.fused_matrices, in_features)
        check_rank(self.weight_rank, matrix, layer.name, "sparsity.weight_rank")
        check_rank(self.mask_rank, matrix, layer.name, "sparsity.mask_rank")
        return _per_matrix(layer, lambda shape: LowRank(shape, self.weight_rank, self.beta, left_std=1.0))

    def make_score(self, layer: LinearLayer) -> nn.Module:
        return _per_matrix(layer, lambda shape: PSTImportance(shape, self.mask_rank, self.alpha1, self.alpha2))

    def attach(self, model: nn.Module) -> list[SparseLayer]:
        if not self.layers:
            super().attach(model)
            freeze_backbone_(model, {id(p) for p in self.factors()}, self.train_head)
        return self.layers

    def factors(self) -> list[nn.Parameter]:
        """U, V, A, B, R, C of every target."""
        return [p for layer in self.layers for module in (layer.param.delta, layer.param.score)
                for p in module.parameters()]

    def layer_scores(self, layer: SparseLayer) -> torch.Tensor:
        return layer.param.score(layer.dense())

    def needs_update(self, sparsity: float) -> bool:
        return sparsity > 0 or sparsity != self.applied_sparsity  # scores move every step

    def param_groups(self) -> list[dict[str, Any]]:
        group: dict[str, Any] = {"params": self.factors(), "weight_decay": 0.0}
        if self.learning_rate is not None:
            group["lr"] = self.learning_rate
        return [group]

"""LoRA: low-rank adaptation (Hu et al., ICLR 2022), the baseline of every sparse fine-tuning paper."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from sparseft.sparse.deltas import LowRank, check_rank
from sparseft.sparse.freezing import freeze_backbone_
from sparseft.sparse.layers import LinearLayer
from sparseft.sparse.parametrize import SparseLayer
from sparseft.sparse.prune import sparsify
from sparseft.sparse.schedules import SparsitySchedule
from sparseft.sparse.targets import TargetSpec, update_targets
from sparseft.strategies.base import SparsityStrategy, check_learning_rates
from sparseft.strategies.registry import register_strategy


@register_strategy("lora")
class LoRA(SparsityStrategy):
    """LoRA: a frozen ``W0`` and a trained low-rank update, computed from the layer's input.

    ``h = W0·x + ΔW·x = W0·x + (α/r)·B·A·x`` (eq. 3), applied as PEFT does,
    ``y = x·W0ᵀ + b + (α/r)·(dropout(x)·Aᵀ)·Bᵀ``: no ``W0 + B·A`` is formed, autograd saves ``x`` and
    the rank-r intermediate, and there is no mask (nothing is pruned). PEFT's defaults and init:
    ``r = 8``, ``α = 8``, dropout 0, ``A: r×in`` kaiming-uniform (a = √5), ``B: out×r`` zero, so
    training starts from the pre-trained model; targets q and v (GPT-2: the fused ``c_attn``, one
    pair for the whole matrix, as PEFT). Only A and B train, and the task head of a classifier or
    QA model (PEFT's ``modules_to_save``); an LM head stays frozen.

    Its sparsity is 0: every weight of a target changes (``B·A`` is dense) and none is removed;
    for LoRA with pruning use ``dsee``. ``sparseft export --adapter_path DIR`` also writes a PEFT
    adapter (:mod:`sparseft.export.peft`) that ``PeftModel.from_pretrained(base, DIR)`` loads.

    Runs on: ``setup`` (attach the factors to the targets, freeze everything else). Nothing
    happens at the training steps: no schedule, no mask.

    Args:
        sparsity: always 0 (any other value is refused): taken so that scripts setting every strategy's
            sparsity run LoRA as the dense-update baseline.
        rank: r, the inner dimension of ``B·A`` (PEFT's ``r``).
        alpha: α; the update is scaled by α/r (PEFT's ``lora_alpha``).
        dropout: dropout probability on the input of ``A`` (PEFT's ``lora_dropout``).
        targets: layers that get an update: role names (``q``, ``k``, ``v``, ``qkv``, ``o``,
            ``ffn_in``, ``ffn_out``, ``all``) or regular expressions matching whole module names
            (default: q and v, or GPT-2's fused qkv).
        learning_rate: learning rate of A and B (None: the model's).
        weight_decay: weight decay of A and B.
        train_head: also train the task head; None (default): a classifier or QA head trains, an LM
            head stays frozen (PEFT's ``modules_to_save`` for its sequence-classification task).
        log_layers: log every target layer's sparsity (0).
    """

    freeze_base = True
    attaches_to_empty_weights = True  # A drawn at random, B zero

    def __init__(
        self,
        sparsity: float = 0.0,
        rank: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        targets: TargetSpec = None,
        learning_rate: float | None = None,
        weight_decay: float = 0.0,
        train_head: bool | None = None,
        log_layers: bool = True,
    ) -> None:
        if sparsity != 0:
            raise ValueError(f"--sparsity.sparsity {sparsity} with lora: LoRA prunes nothing and its update B·A is "
                             "dense, so its sparsity is 0; for LoRA with pruning use the dsee strategy")
        super().__init__(0.0, targets, SparsitySchedule(kind="constant"), "layer", log_layers)
        if rank < 1:
            raise ValueError(f"--sparsity.rank must be >= 1, got {rank}")
        if not alpha > 0:
            raise ValueError(f"--sparsity.alpha must be > 0 (the update is scaled by alpha / rank), got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"--sparsity.dropout must be in [0, 1), got {dropout}")
        check_learning_rates("sparsity", learning_rate=learning_rate)
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.learning_rate, self.weight_decay, self.train_head = learning_rate, weight_decay, train_head

    @property
    def scale(self) -> float:
        """α / r, PEFT's ``scaling``."""
        return self.alpha / self.rank

    def check_model(self, model: nn.Module) -> None:
        """Targets must match layers and ``rank`` must fit every target matrix."""
        for layer in update_targets(model, self.targets):
            check_rank(self.rank, layer.shape, layer.name, "--sparsity.rank")

    def make_delta(self, layer: LinearLayer) -> nn.Module:
        return LowRank(layer.shape, self.rank, self.scale, left_std=None, right_std="kaiming", dropout=self.dropout)

    def attach(self, model: nn.Module) -> list[SparseLayer]:
        """Attach ``B·A`` to the targets, with no mask, and freeze the rest (idempotent)."""
        if not self.layers:
            self.check_model(model)
            names = [re.escape(layer.name) for layer in update_targets(model, self.targets)]
            self.layers = sparsify(model, names, self.make_delta, None, True, masked=False)
            train_head = self.train_head if self.train_head is not None else model.get_output_embeddings() is None
            freeze_backbone_(model, {id(p) for p in self.update_parameters()}, train_head)
            self._measure()
        return self.layers

    def update_parameters(self) -> list[nn.Parameter]:
        """A and B of every target."""
        return [p for layer in self.layers for p in layer.param.delta.parameters()]

    def param_groups(self) -> list[dict[str, Any]]:
        group: dict[str, Any] = {"params": self.update_parameters(), "weight_decay": self.weight_decay}
        if self.learning_rate is not None:
            group["lr"] = self.learning_rate
        return [group]

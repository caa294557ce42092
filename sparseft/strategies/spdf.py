"""SPDF (Thangarasa et al., UAI 2023): static sparse pre-training, then dense fine-tuning."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from sparseft.sparse.flops import FlopCount, model_training_flops
from sparseft.sparse.inplace import mask_optimizer_state_, mask_weights_
from sparseft.sparse.parametrize import SparseLayer
from sparseft.sparse.schedules import SparsitySchedule
from sparseft.sparse.static import PARAMETRIZED_SUFFIX, densify_, load_densified_, random_scores
from sparseft.sparse.targets import TargetSpec
from sparseft.strategies.base import SparsityStrategy, refresh_ddp_buffers
from sparseft.strategies.registry import register_strategy

Phase = Literal["sparse", "dense"]
MaskInit = Literal["random", "magnitude"]


def batch_tokens(batch: Any) -> int:
    """Tokens of one batch on one rank: its attention mask's ones, or every input id without a mask."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


@register_strategy("spdf")
class SPDF(SparsityStrategy):
    """Sparse pre-training with a static mask, then dense fine-tuning from zero (SPDF).

    ``phase: sparse``: at setup every target matrix gets a fixed unstructured mask with exactly
    ``round(s · numel)`` entries pruned (uniform per layer; q, k and v of a fused projection
    counted separately; with ``pattern: "2:4"``, 2 of every 4 consecutive inputs), chosen from
    uniform random scores seeded by ``(seed, parameter name)`` (identical on every rank, in every
    run, whatever the module order) or by ``|W0|``. Then

        W0 ← M ⊙ W0,    W_eff = W0,    ∂L/∂W0 ← M ⊙ ∂L/∂W0 before every optimizer step

    (the mask held in the weights, :mod:`sparseft.sparse.inplace`, as Cerebras' static sparsity: the
    forward is the plain dense one), so neither momentum nor weight decay revives a pruned weight:
    Adam's moments stay 0 where pruned, their gradient being 0 (an optimizer that is not elementwise,
    such as Muon, has ``W0 ← M ⊙ W0`` after every step too). The mask never changes; it is a buffer
    in every checkpoint. With ``dense_from_step`` the run switches to dense at that optimizer
    step (Variable SPDF): pruned weights and their optimizer moments are zeroed, the mask and
    its hooks removed, and every weight trains from there. Under FSDP2 the parametrization, which
    holds the sharded ``W0``, stays with an all-ones mask (``W_eff = W0`` exactly; nothing is masked
    any more): the same training as DDP's plain weights, and checkpoints that resume and export.

    ``phase: dense``: no mask at all. With ``checkpoint`` (a sparse-phase checkpoint of the same
    model config) the model starts from its weights ``M ⊙ W0``; a model exported with
    ``sparseft export`` needs no checkpoint (its pruned weights are stored zeros). The pruned
    weights restart from 0 with the fresh optimizer's zero moments. ``phase: sparse`` with a
    ``checkpoint`` (and the same ``seed``) keeps the pre-training mask while fine-tuning: the
    paper's "sparse fine-tuning" ablation.

    Training FLOPs per token (dense, sparse, reduction; :mod:`sparseft.sparse.flops`) and the
    running total are logged under ``flops/`` and printed at the end.

    Runs on: ``setup`` (mask chosen, or dense weights loaded), ``on_train_start`` (FLOPs per token; a
    warning when ``dense_from_step`` falls after the last step),
    ``on_train_batch_start`` (the Variable-SPDF switch), ``on_before_optimizer_step`` (gradients
    masked), ``on_train_batch_end`` (FLOPs and sparsity logged),
    ``on_train_end`` (FLOP summary).

    Args:
        sparsity: fraction of every target matrix pruned in the sparse phase (0.5–0.75 in the paper).
        phase: ``sparse`` (pre-training) or ``dense`` (fine-tuning).
        init: mask scores: ``random`` (the paper's and the reference's default) or ``magnitude`` (|W0|).
        seed: seed of the random masks (with each parameter's name).
        targets: role names or whole-name regular expressions (default: q, k, v, attention
            output, FFN in and out of every block; never embeddings, norms, biases or the LM head).
        dense_from_step: sparse phase only: switch to dense at this optimizer step (None: never).
        checkpoint: a sparse-phase sparseft checkpoint whose weights ``M ⊙ W0`` the run starts from.
        context_length: tokens each position attends to in the FLOP count (default: the
            datamodule's ``block_size`` / ``max_length``, else the model's maximum positions).
        pattern: ``layer`` (exact count per matrix) or ``N:M`` such as ``2:4`` with ``sparsity``
            ``1 − N/M``: the static mask keeps the N highest-scoring (random or ``|W0|``) of every
            M consecutive inputs, the layout of 2:4 sparse tensor cores.
        log_layers: log every target layer's sparsity.
    """

    holds_masks_in_place = True

    def __init__(
        self,
        sparsity: float = 0.75,
        phase: Phase = "sparse",
        init: MaskInit = "random",
        seed: int = 0,
        targets: TargetSpec = None,
        dense_from_step: int | None = None,
        checkpoint: str | None = None,
        context_length: int | None = None,
        pattern: str = "layer",
        log_layers: bool = True,
    ) -> None:
        super().__init__(sparsity, targets, SparsitySchedule(kind="constant"), pattern, log_layers)
        if self.mask_pattern.scope == "global":
            raise ValueError("SPDF's masks are uniform per matrix: use pattern 'layer' or an N:M pattern such as '2:4'")
        if phase not in ("sparse", "dense"):
            raise ValueError(f"SPDF phase must be 'sparse' or 'dense', got {phase!r}")
        if init not in ("random", "magnitude"):
            raise ValueError(f"SPDF init must be 'random' or 'magnitude', got {init!r}")
        if dense_from_step is not None and (phase != "sparse" or dense_from_step < 0):
            raise ValueError("SPDF: dense_from_step is a step >= 0 of a sparse phase")
        self.phase, self.init, self.seed = phase, init, seed
        self.dense_from_step, self.checkpoint, self.context_length = dense_from_step, checkpoint, context_length
        self.dense = phase == "dense"  # no mask: the dense phase, or after the switch
        self.switched_at: int | None = None
        self.tokens = 0  # training tokens seen (all ranks)
        #: the running batch: (optimizer steps before it, its tokens on all ranks), counted at its end
        self._running: tuple[int, int] | None = None
        self.flops: FlopCount | None = None
        self._prepared = False
        self._loaded = False

    # ---- masks ---------------------------------------------------------------------------
    def layer_scores(self, layer: SparseLayer) -> torch.Tensor:
        if self.init == "magnitude":
            return layer.dense().abs()
        return random_scores(self.seed, f"{layer.name}.weight", tuple(layer.mask.shape))

    def attach(self, model: nn.Module) -> list:
        if self.dense:
            return self.layers
        if not self.layers:
            super().attach(model)
            model.register_load_state_dict_pre_hook(self._densify_for_dense_state)
        return self.layers

    def _densify_for_dense_state(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        """Loading a checkpoint written after the switch (plain weights, no masks): switch first."""
        name = f"{prefix}{self.layers[0].name}" if self.layers else None
        if name and f"{name}.weight" in state_dict and f"{name}{PARAMETRIZED_SUFFIX}" not in state_dict:
            self._drop_masks()

    def _drop_masks(self, optimizers: list[torch.optim.Optimizer] = ()) -> None:
        mask_optimizer_state_(self.layers, list(optimizers))  # pruned weights restart from zero moments
        densify_(self.layers)
        self.layers, self._measured, self.applied_sparsity, self.dense = [], {}, 0.0, True

    @classmethod
    def attaches_to_empty(cls, init_args: Mapping[str, Any]) -> bool:
        """Random masks (the default) read shapes only; magnitude masks and a checkpoint to start from read
        the weights."""
        return init_args.get("init", "random") == "random" and not init_args.get("checkpoint")

    def choose_masks(self, trainer: Trainer | None = None) -> None:
        """The static masks, once: exact per-matrix count, then ``W0 ← M ⊙ W0`` (for a ``W0`` still to be read,
        sharded loading, the masks held in place zero it at the start of training instead)."""
        self.update_masks(self.final_sparsity)
        if self.init == "magnitude" and trainer is not None and trainer.world_size > 1:  # rank 0's weights rule
            masks = trainer.strategy.broadcast([layer.mask.cpu() for layer in self.layers], src=0)
            for layer, keep in zip(self.layers, masks, strict=True):
                layer.set_mask_(keep)
            self._measure()
        if not any(layer.stored_weight.is_meta for layer in self.layers):
            mask_weights_(self.layers)
        self._prepared = True

    # ---- Lightning hooks -----------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.check_weights_present(pl_module.model)
        if self.checkpoint and not self._loaded:
            self._load_checkpoint(pl_module)
        if self.phase == "dense":
            return
        super().setup(trainer, pl_module, stage)
        if not self._prepared and not self.dense:
            self.choose_masks(trainer)

    def _load_checkpoint(self, pl_module: LightningModule) -> None:
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        model_state = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
        try:
            names = load_densified_(pl_module.model, model_state)
        except ValueError as error:
            raise ValueError(f"SPDF: checkpoint {self.checkpoint}: {error}") from None
        self._loaded = True
        rank_zero_info(f"sparseft: SPDF {self.phase} phase from {self.checkpoint} ({len(names)} sparse layers): "
                       + ("pruned weights restart from 0 with zero optimizer moments" if self.phase == "dense"
                          else "masks chosen again (the same ones for the same seed)"))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not self.dense and self.dense_from_step is not None and self.dense_from_step >= self.total_steps:
            rank_zero_warn(
                f"SPDF dense_from_step {self.dense_from_step} is not before the run's last optimizer step "
                f"({self.total_steps} steps, 0 to {self.total_steps - 1}): the run never switches to dense and "
                "trains sparse throughout. Lower sparsity.dense_from_step or train longer."
            )
        self._count_flops(trainer, pl_module)

    def _count_flops(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        n_ctx = self.context_length or getattr(datamodule, "block_size", None)
        n_ctx = n_ctx or getattr(datamodule, "max_length", None)
        self.flops = model_training_flops(pl_module.model, n_ctx)
        for logger in trainer.loggers:
            logger.log_metrics(self.flops.as_log(), step=trainer.global_step)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.step = trainer.global_step
        self._trainer, self._running = trainer, (trainer.global_step, batch_tokens(batch) * trainer.world_size)
        if not self.dense and self.dense_from_step is not None and self.step >= self.dense_from_step:
            self._drop_masks(trainer.optimizers)
            refresh_ddp_buffers(trainer)  # DDP wrapped the model with the masks as buffers
            self.switched_at = self.step
            rank_zero_info(f"sparseft: SPDF switches to dense training at step {self.step}")
            self._count_flops(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.tokens += self._running[1] if self._running else batch_tokens(batch) * trainer.world_size
        self._running = None
        if self.flops is not None:
            pl_module.log("flops/reduction", self.flops.reduction)
            pl_module.log("flops/tokens", float(self.tokens))
            pl_module.log("flops/total", self.flops.sparse * self.tokens)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.flops is None:
            return
        flops = self.flops
        rank_zero_info(
            f"sparseft: SPDF {'dense' if self.dense else f'sparse ({self.final_sparsity:.0%})'} training FLOPs per "
            f"token {flops.sparse:.4g} vs dense {flops.dense:.4g}: {flops.reduction:.3f}x fewer "
            f"(3 x forward, 2 per MAC, no embedding lookups); {self.tokens:,} tokens, "
            f"{flops.sparse * self.tokens:.4g} FLOPs at the current masks"
            + (f" (dense from step {self.switched_at})" if self.switched_at is not None else "")
        )

    # ---- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "dense": self.dense, "switched_at": self.switched_at,
                "tokens": self.tokens + self._stepped_uncounted()}

    def _stepped_uncounted(self) -> int:
        """The running batch's tokens when its optimizer step is done but ``on_train_batch_end`` has not run
        yet (a checkpoint written on an interrupt there has the step: without them the count is one batch short)."""
        if self._running is None or self._trainer is None:
            return 0
        steps_before, tokens = self._running
        return tokens if self._trainer.global_step > steps_before else 0

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.switched_at = state_dict.get("switched_at")
        self.tokens = state_dict.get("tokens", 0)
        if state_dict.get("dense") and self.layers:  # a dense state whose weights were loaded elsewhere
            self._drop_masks()
        if not self.dense:
            self.applied_sparsity = self.final_sparsity

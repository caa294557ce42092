"""``SparseFTModule``: a Hugging Face backbone for one task, with metrics and optimizer groups.

The module knows nothing of sparsity methods: strategies (callbacks) attach to
``self.model`` in their ``setup`` and contribute optimizer groups through
``param_groups()``; the module gathers them in ``configure_optimizers``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MetricCollection

from sparseft.backbones.loading import Task, backbone_directory, load_backbone
from sparseft.datamodules.base import class_predictions, classification_metric_inputs
from sparseft.sparse.sharding import has_meta_parameters
from sparseft.strategies.base import CHECKPOINT_KEY, SparsityStrategy
from sparseft.strategies.registry import build_strategy
from sparseft.training.callbacks import PendingValidation, RandomState
from sparseft.training.checkpoint_checks import read_checkpoint, state_mismatch
from sparseft.training.distillation import distillation_loss
from sparseft.training.optim import build_lr_scheduler, build_optimizer, check_options, clips_under_autocast
from sparseft.training.resume import check_checkpoint_strategies
from sparseft.training.run_summary import RUN_KEY, choose_dev_metric, describe_data
from sparseft.training.sharding import (
    data_parallel_mesh,
    load_weights_,
    shard_backbone_,
    sharded_loading_requested,
)
from sparseft.training.tensorboard import TensorBoardSummary

HF_CONFIG_KEY = "sparseft_hf_config"


class SparseFTModule(LightningModule):
    """Fine-tune a Hugging Face model for a task.

    Args:
        backbone: hub id, local directory, or ``pkg:<package>/<subdir>`` of pre-trained weights.
        task: ``sequence-classification`` (``num_labels == 1`` is regression, e.g. STS-B),
            ``question-answering`` or ``causal-lm``. Linked from the datamodule by the CLI.
        num_labels: classes for sequence classification. Linked from the datamodule by the CLI.
        config: instead of ``backbone``, a config dict with ``model_type`` for a random model.
        tokenizer: tokenizer name or path when it differs from ``backbone`` (required with ``config``).
        learning_rate: peak learning rate (the optimizer's ``lr``) for the backbone's parameters and
            for strategy groups that set none.
        weight_decay: weight decay of the backbone's matrices; never applied to biases and LayerNorm weights.
        warmup_ratio: fraction of optimizer steps (in [0, 1)) with linear learning-rate warm-up, followed by
            the ``lr_schedule``; the rate is ``step / warm-up`` (0 at the first step), as
            transformers' ``get_linear_schedule_with_warmup`` and the methods' reference scripts.
        adam_epsilon: AdamW epsilon (None: 1e-8); only with the default optimizer.
        adam_betas: AdamW ``(β₁, β₂)`` (None: (0.9, 0.999)); GPT pre-training recipes (SPDF,
            Cerebras-GPT) use (0.9, 0.95). Only with the default optimizer.
        lr_schedule: after the warm-up: ``linear`` decay to ``min_lr_ratio · learning_rate`` at the
            last step, ``cosine``: ``min + (1 − min)·(1 + cos(π·p))/2`` with ``p`` the post-warm-up
            progress (Cerebras' cosine to 6e-5 from 6e-4 is ``min_lr_ratio: 0.1``), or ``constant``.
            None: ``linear``.
        min_lr_ratio: final learning rate as a fraction of the peak (default 0: decay to zero).
        teacher: a fine-tuned model (name or path) to distil from, with any strategy; None: no
            distillation. The teacher is frozen, in eval mode, and not saved in checkpoints.
        distill_temperature: softening temperature T of the teacher and student logits.
        distill_alpha_ce: weight of the task loss when distilling.
        distill_alpha_kd: weight of the distillation loss ``T² · KL``.
        optimizer: the optimizer class and its arguments (``--optimizer`` on the command line), built
            from :meth:`param_groups` with ``lr=learning_rate``; None: AdamW.
        lr_scheduler: a ``torch.optim.lr_scheduler`` class and its arguments (``--lr_scheduler``),
            stepped every optimizer step, in place of the built-in schedule; None: the built-in one.
    """

    def __init__(
        self,
        backbone: str | None = None,
        task: Task = "sequence-classification",
        num_labels: int = 2,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        adam_epsilon: float | None = None,
        adam_betas: tuple[float, float] | None = None,
        lr_schedule: Literal["linear", "cosine", "constant"] | None = None,
        min_lr_ratio: float = 0.0,
        teacher: str | None = None,
        distill_temperature: float = 2.0,
        distill_alpha_ce: float = 0.1,
        distill_alpha_kd: float = 0.9,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        check_options(optimizer, lr_scheduler, adam_epsilon=adam_epsilon, adam_betas=adam_betas,
                      lr_schedule=lr_schedule, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio,
                      learning_rate=learning_rate)
        self.save_hyperparameters()
        self._optimizer_factory, self._lr_scheduler_factory = optimizer, lr_scheduler
        # inside sparseft.training.sharding.sharded_loading, or Lightning's init_module(empty_init=True): the
        # backbone without its weights, each process reading its own shards in configure_model
        self._weights_to_read = backbone if backbone is not None and sharded_loading_requested() else None
        with torch.device("cpu"):  # also inside a meta-device context: what is built here is real unless empty
            # from_pretrained returns eval mode; Lightning keeps the mode it finds, so train() here
            self.model = load_backbone(task, backbone, config, num_labels,
                                       empty=self._weights_to_read is not None).train()
            # a plain attribute, not a submodule: never trained, checkpointed or handed to DDP
            self.__dict__["teacher"] = load_backbone(task, teacher, None, num_labels).eval() if teacher else None
        self.metric_sets = nn.ModuleDict()
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
        self._metric_inputs: Callable[..., tuple[Any, ...] | None] | None = None
        self._scored: set[str] = set()
        self._forward_keys: set[str] | None = None
        self.warmup_steps = 0  # learning-rate warm-up in optimizer steps, set by configure_optimizers
        #: the last validation's dev metric: ``{"name", "value", "step"}`` (:func:`choose_dev_metric`)
        self.dev_metric: dict[str, Any] | None = None

    # ---- metrics -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        self._name_labels(getattr(datamodule, "label_names", None))
        if datamodule is None or not hasattr(datamodule, "build_metrics") or self.metric_sets:
            return
        names = list(getattr(datamodule, "val_names", ["validation"]))
        self._metric_inputs = getattr(datamodule, "metric_inputs", classification_metric_inputs)
        for name in names:
            prefix = "val/" if len(names) == 1 else f"val/{name}/"
            self.metric_sets[name] = MetricCollection(datamodule.build_metrics()).clone(prefix=prefix)

    def _name_labels(self, names: list[str] | None) -> None:
        """Put the task's class names into the model config (``id2label`` / ``label2id``): checkpoints
        and exports carry them, and a pipeline on the export says ``positive``, not ``LABEL_1``."""
        if names and len(names) == self.model.config.num_labels:
            self.model.config.id2label = dict(enumerate(names))
            self.model.config.label2id = {name: index for index, name in enumerate(names)}

    # ---- steps ---------------------------------------------------------------------------
    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**self.model_inputs(batch))

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch entries the backbone's ``forward`` accepts (datamodules may carry more,
        e.g. SQuAD's ``feature_index`` for post-processing)."""
        if self._forward_keys is None:
            self._forward_keys = set(inspect.signature(self.model.forward).parameters)
        return {key: value for key, value in batch.items() if key in self._forward_keys}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        outputs = self(**batch)
        loss = outputs.loss
        self.log("train/loss", loss, prog_bar=True)
        if self.teacher is not None:
            loss = self._distil(batch, outputs, loss)
        terms = [term for strategy in self.strategies() if (term := strategy.loss_term()) is not None]
        if terms:
            penalty = torch.stack(terms).sum()
            self.log("train/strategy_loss", penalty)
            loss = loss + penalty
        return loss

    def _distil(self, batch: dict[str, torch.Tensor], outputs: Any, task_loss: torch.Tensor) -> torch.Tensor:
        self.teacher.to(self.device)
        with torch.no_grad():
            teacher_outputs = self.teacher(**self.model_inputs(batch))
        soft = distillation_loss(outputs, teacher_outputs, self.hparams.distill_temperature)
        self.log("train/distill_loss", soft)
        return self.hparams.distill_alpha_ce * task_loss + self.hparams.distill_alpha_kd * soft

    def _evaluate(self, batch: dict[str, torch.Tensor], dataloader_idx: int, stage: str) -> None:
        outputs = self(**batch)
        names = list(self.metric_sets)
        suffix = f"/{names[dataloader_idx]}" if len(names) > 1 else ""
        if outputs.loss is not None:
            self.log(f"{stage}/loss{suffix}", outputs.loss, add_dataloader_idx=False, sync_dist=True)
        inputs = self._metric_inputs(outputs, batch, self) if self._metric_inputs else None
        if names and inputs is not None:
            self.metric_sets[names[dataloader_idx]].update(*inputs)
            self._scored.add(names[dataloader_idx])

    def _log_metrics(self, stage: str) -> None:
        logged: dict[str, float] = {}
        for name, metrics in self.metric_sets.items():
            if name in self._scored:
                values = {key.replace("val/", f"{stage}/", 1): value for key, value in metrics.compute().items()}
                self.log_dict(values, prog_bar=True)
                logged.update({key: float(value) for key, value in values.items()})
            metrics.reset()
        self._scored.clear()
        if stage == "val" and logged and not self.trainer.sanity_checking:
            self._record_dev_metric(logged)

    def _record_dev_metric(self, values: dict[str, float]) -> None:
        checkpoint = self.trainer.checkpoint_callback
        datamodule = getattr(self.trainer, "datamodule", None)
        name = choose_dev_metric(values, getattr(checkpoint, "monitor", None), getattr(datamodule, "monitor", None))
        self.dev_metric = {"name": name, "value": values[name], "step": self.trainer.global_step}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> Any:
        """The datamodule's ``predict_batch`` (spans, generations, ...); class ids without one."""
        batch = {key: value for key, value in batch.items() if key != "labels"}
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        return getattr(datamodule, "predict_batch", class_predictions)(self, batch)

    # ---- optimization --------------------------------------------------------------------
    def strategies(self) -> list[SparsityStrategy]:
        """The sparsity strategies among the trainer's callbacks."""
        if not self._trainer:
            return []
        return [callback for callback in self.trainer.callbacks if isinstance(callback, SparsityStrategy)]

    def param_groups(self, strategies: list[SparsityStrategy] | None = None) -> list[dict[str, Any]]:
        """Strategy groups first; every other trainable tensor goes to a decay or no-decay group.

        ``strategies`` defaults to the trainer's (a loop without a trainer passes its own).
        """
        strategies = self.strategies() if strategies is None else strategies
        groups = [  # named for the learning-rate logs (lr/<name>)
            {"name": f"{strategy.strategy_name}_{index}", **group}
            for strategy in strategies for index, group in enumerate(strategy.param_groups())
        ]
        claimed = {id(p) for group in groups for p in group["params"]}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in claimed]
        decay = [p for p in rest if p.ndim >= 2]
        no_decay = [p for p in rest if p.ndim < 2]
        groups += [
            {"params": decay, "weight_decay": self.hparams.weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]
        return [group for group in groups if group["params"]]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> SparseFTModule:
        """As torch's, except that a tensor still on the meta device (a weight sharded loading has not read yet)
        stays there: it has nothing to move, and Lightning's teardown after an error in ``setup`` moves the
        module to the CPU, which would otherwise hide that error behind "Cannot copy out of meta tensor"."""
        return super()._apply(lambda tensor: tensor if tensor.is_meta else fn(tensor), recurse)

    def configure_model(self) -> None:
        """Under ``--trainer.strategy fsdp2`` (a ``ModelParallelStrategy``), shard each transformer block and
        the backbone with FSDP2 (:mod:`sparseft.training.sharding`); under any other strategy, nothing.

        Lightning calls it after the callbacks' ``setup``, so the sparsity strategies' tensors are
        already attached and are sharded with the blocks they belong to. A backbone built without its
        weights (sharded loading) then reads them: each process its own shards, or the whole tensors
        under a strategy that does not shard.
        """
        if self._device_mesh is not None:
            shard_backbone_(self.model, data_parallel_mesh(self._device_mesh),
                            getattr(self.trainer.strategy, "mp_policy", None))
        if self._weights_to_read is not None and has_meta_parameters(self.model):
            new = load_weights_(self.model, backbone_directory(self._weights_to_read))
            if new:
                rank_zero_info(f"sparseft: not in the checkpoint, initialised: {', '.join(new)}")
            self._weights_to_read = None

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer (AdamW or ``optimizer``) over :meth:`param_groups`, stepped every step by the
        built-in schedule or ``lr_scheduler`` (see :mod:`sparseft.training.optim`)."""
        hparams = self.hparams
        optimizer = build_optimizer(self.param_groups(), hparams.learning_rate, self._optimizer_factory,
                                    hparams.get("adam_epsilon"), hparams.get("adam_betas"),
                                    fuse=not clips_under_autocast(self.trainer))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = self.warmup_steps = int(hparams.warmup_ratio * total)
        scheduler = build_lr_scheduler(optimizer, total, warmup, self._lr_scheduler_factory,
                                       hparams.get("lr_schedule"), float(hparams.get("min_lr_ratio", 0.0)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints ---------------------------------------------------------------------
    def configure_callbacks(self) -> list[Callback]:
        """Every run checkpoints its random generators, so a resumed run's dropout is the same, runs after a
        resume the validation due at its checkpoint, and shows its hyperparameters, learning rates and
        sparsity pictures in TensorBoard."""
        return [RandomState(), TensorBoardSummary(), PendingValidation()]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[HF_CONFIG_KEY] = self.model.config.to_dict()
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        checkpoint[RUN_KEY] = {"dev_metric": self.dev_metric, "data": describe_data(datamodule)}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As torch's, but a state that does not fit this model is refused in one line naming the difference."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as error:
            reason = state_mismatch(state_dict, self.state_dict())
            if reason is None:
                raise
            raise reason from error

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, with a fix, a checkpoint whose strategy, or its mask settings, differ from this run's;
        restore the dev metric."""
        self.dev_metric = checkpoint.get(RUN_KEY, {}).get("dev_metric", self.dev_metric)
        check_checkpoint_strategies(checkpoint.get(CHECKPOINT_KEY), self.strategies())

    @classmethod
    def from_sparseft_checkpoint(cls, path: str | Path) -> tuple[SparseFTModule, SparsityStrategy | None]:
        """Rebuild module and strategy from a checkpoint, with no access to the original weights."""
        checkpoint = read_checkpoint(path, ("hyper_parameters", HF_CONFIG_KEY, "state_dict"))
        accepted = inspect.signature(cls.__init__).parameters
        hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted}
        hparams.update(backbone=None, config=checkpoint[HF_CONFIG_KEY], teacher=None, optimizer=None, lr_scheduler=None)
        hparams["tokenizer"] = hparams.get("tokenizer") or checkpoint["hyper_parameters"].get("backbone")
        module = cls(**hparams)
        strategy = build_strategy(checkpoint[CHECKPOINT_KEY]) if CHECKPOINT_KEY in checkpoint else None
        if strategy is not None:
            strategy.attach(module.model)
        module.load_state_dict(checkpoint["state_dict"])
        if strategy is not None:
            strategy.load_state_dict(_callback_state(checkpoint, strategy))
        return module.eval(), strategy


def _callback_state(checkpoint: dict[str, Any], strategy: SparsityStrategy) -> dict[str, Any]:
    for state in checkpoint.get("callbacks", {}).values():
        if isinstance(state, dict) and state.get("strategy") == strategy.strategy_id:
            return state
    raise ValueError(f"checkpoint has no saved state for strategy {strategy.strategy_id!r}")

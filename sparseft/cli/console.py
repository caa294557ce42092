"""A quieter console for the ``sparseft`` command: no advertisements, no noise, a step progress bar.

What is filtered, and why (docs/user_guide.md, "Console"):

* Lightning's "💡 Tip: ..." lines (litlogger, litmodels): advertisements, not about the run.
* The warning that ``isinstance(treespec, LeafSpec)`` is deprecated: Lightning's own use of a
  torch API, raised on every fit; nothing in a run can change it.
* Outside ``fit``: ModelCheckpoint's "The dirpath has changed from ...": ``validate`` / ``test``
  / ``predict`` write to a new run directory, so the checkpoint's best-k bookkeeping is not
  reloaded, which only matters to a fit that resumes.
* Lightning's model summary table (:class:`OneLineModelSummary` instead): its FLOPs column and
  "Total FLOPs: 0" (Lightning counts FLOPs only with an ``example_input_array``, which a Hugging
  Face backbone has not), and rows that repeat what the strategy prints.
* In the progress bar (:class:`StepProgressBar`): the logger's version (``v_num``), and long metric
  names: ``loss``, ``sparsity``, ``val/accuracy``, so that the bar and its metrics fit one line of
  120 columns.

Every other warning is kept. A fit ends with what it made (:class:`FitSummary`): the best and last
checkpoints, the best dev metric and the ``sparseft export`` command to run next.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

from sparseft.sparse.measure import count_parameters

NOISE_WARNINGS = (re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),)
EVALUATION_NOISE_WARNINGS = (re.escape("The dirpath has changed from"),)
TIP_PREFIX = "💡 Tip"
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class DropTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ..." info lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


DROP_TIPS = DropTips()


def quiet_console(subcommand: str | None) -> None:
    """Install the filters above for this process (idempotent)."""
    for name in LIGHTNING_INFO_LOGGERS:
        logging.getLogger(name).addFilter(DROP_TIPS)
    patterns = NOISE_WARNINGS + (EVALUATION_NOISE_WARNINGS if subcommand != "fit" else ())
    for pattern in patterns:
        warnings.filterwarnings("ignore", message=pattern)


def counts_steps(trainer: Trainer) -> bool:
    """Whether the run is bounded by ``max_steps`` alone (``max_epochs`` -1, Lightning's default then)."""
    return trainer.max_steps > 0 and trainer.max_epochs in (None, -1)


#: progress-bar names of logged metrics (the logs keep their full names); others are shown as logged
BAR_NAMES = {"train/loss": "loss", "sparsity/actual": "sparsity"}
BAR_WIDTH = 24  # Rich's default is 40: with the steps, times and speed it leaves too little for the metrics


def bar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The progress bar's metrics: without the logger's version ``v_num``, with short names (:data:`BAR_NAMES`;
    ``val/validation_matched/accuracy`` shown as ``val/matched/accuracy``)."""
    return {BAR_NAMES.get(name, name.replace("/validation_", "/")): value
            for name, value in metrics.items() if name != "v_num"}


if _RICH_AVAILABLE:
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.callbacks.progress.rich_progress import CustomBarColumn

    class StepProgressBar(RichProgressBar):
        """Lightning's Rich progress bar, but a run bounded by ``max_steps`` alone shows one
        "Training" bar of optimizer steps out of ``max_steps`` (Lightning shows "Epoch 0/-2" and
        the batches of one epoch); runs bounded by epochs keep "Epoch e/E"."""

        def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
            return bar_metrics(super().get_metrics(trainer, pl_module))

        def configure_columns(self, trainer: Trainer) -> list:
            return [CustomBarColumn(bar_width=BAR_WIDTH, complete_style=column.complete_style,
                                    finished_style=column.finished_style, pulse_style=column.pulse_style)
                    if isinstance(column, CustomBarColumn) else column for column in super().configure_columns(trainer)]

        @property
        def total_train_batches(self) -> int | float:
            return self.trainer.max_steps if counts_steps(self.trainer) else super().total_train_batches

        def _get_train_description(self, current_epoch: int) -> str:
            if counts_steps(self.trainer):
                return f"{'Training':{len(self.validation_description)}}"
            return super()._get_train_description(current_epoch)

        def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            if counts_steps(trainer) and self.train_progress_bar_id is not None and not self._leave:
                return  # one bar for the whole run, not reset at epoch boundaries
            super().on_train_epoch_start(trainer, pl_module)
            if counts_steps(trainer):
                self._update(self.train_progress_bar_id, trainer.global_step)  # a resumed run starts where it was

        def on_train_batch_end(
            self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            # the bar's position is ``batch_idx + 1``: make it the optimizer steps done
            position = trainer.global_step - 1 if counts_steps(trainer) else batch_idx
            super().on_train_batch_end(trainer, pl_module, outputs, batch, position)

else:  # Lightning's TQDM bar shows "Epoch e" and at most max_steps batches already
    StepProgressBar = None


class OneLineModelSummary(Callback):
    """The model in one line: its class, parameters (trainable) and size in memory, in place of Lightning's
    table (see the module docstring).

    Runs on: ``on_fit_start`` (Lightning's summary does too).
    """

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainable, total = count_parameters(pl_module)
        size = sum(p.numel() * p.element_size() for p in pl_module.parameters()) / 2**20
        model = getattr(pl_module, "model", pl_module)
        rank_zero_info(f"model {type(model).__name__}: {total:,} parameters, {trainable:,} trainable, {size:,.1f} MiB")


class FitSummary(Callback):
    """At the end of a fit, what it made: the best checkpoint with its dev metric, the last one, and the export
    command to run next (of the best checkpoint when there is one; into ``export/`` beside the checkpoints).

    Runs on: ``on_fit_end`` (the last checkpoint is saved), printed at ``teardown`` (after the progress bar,
    added before it, has stopped: lines printed under a live bar interleave with its redraws).
    """

    def __init__(self) -> None:
        self.summary: str | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        if trainer.is_global_zero and checkpoint is not None and checkpoint.last_model_path:
            self.summary = fit_summary(checkpoint, trainer.global_step)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.summary:  # none after an exception: on_fit_end did not run
            print(self.summary)
            self.summary = None


def fit_summary(checkpoint: ModelCheckpoint, steps: int) -> str:
    """The lines :class:`FitSummary` prints for ``checkpoint``'s files after ``steps`` optimizer steps."""
    lines = [f"sparseft: fit done, {steps} optimizer steps"]
    best = checkpoint.best_model_path if checkpoint.monitor else ""
    if best and checkpoint.best_model_score is not None:
        lines.append(f"  best checkpoint  {best}  ({checkpoint.monitor} {float(checkpoint.best_model_score):.4f})")
    lines.append(f"  last checkpoint  {checkpoint.last_model_path}")
    chosen = best or checkpoint.last_model_path
    lines.append(f"  next: sparseft export --ckpt_path {chosen} --output_dir {Path(chosen).parent.parent / 'export'}")
    return "\n".join(lines)


def console_callbacks(subcommand: str | None, config: dict[str, Any], configured: list[Any]) -> list[Callback]:
    """Quiet the console (:func:`quiet_console`) and return the callbacks to add to a trainer with ``config`` and
    ``configured`` callbacks: the one-line model summary in place of Lightning's (unless a summary is configured
    or summaries are off; sets ``config["enable_model_summary"]``), the progress bar (none when one is configured
    or bars are off) and, for ``fit``, the closing summary, last."""
    quiet_console(subcommand)
    added: list[Callback] = []
    if config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in configured):
        config["enable_model_summary"] = False  # Lightning's table: its own callback, when not switched off
        added.append(OneLineModelSummary())
    enabled = config.get("enable_progress_bar") is not False
    if StepProgressBar is not None and enabled and not any(isinstance(c, ProgressBar) for c in configured):
        added.append(StepProgressBar())
    return added + ([FitSummary()] if subcommand == "fit" else [])

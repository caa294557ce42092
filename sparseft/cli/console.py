"""A quieter console for the ``sparseft`` command: no advertisements, no noise, a step progress bar.

What is filtered, and why (docs/user_guide.md, "Console"):

* Lightning's "💡 Tip: ..." lines (litlogger, litmodels): advertisements, not about the run.
* The warning that ``isinstance(treespec, LeafSpec)`` is deprecated: Lightning's own use of a
  torch API, raised on every fit; nothing in a run can change it.
* Outside ``fit``: ModelCheckpoint's "The dirpath has changed from ...": ``validate`` / ``test``
  / ``predict`` write to a new run directory, so the checkpoint's best-k bookkeeping is not
  reloaded, which only matters to a fit that resumes.

Every other warning is kept.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

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


if _RICH_AVAILABLE:
    from lightning.pytorch.callbacks import RichProgressBar

    class StepProgressBar(RichProgressBar):
        """Lightning's Rich progress bar, but a run bounded by ``max_steps`` alone shows one
        "Training" bar of optimizer steps out of ``max_steps`` (Lightning shows "Epoch 0/-2" and
        the batches of one epoch); runs bounded by epochs keep "Epoch e/E"."""

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


def console_callbacks(subcommand: str | None, config: dict[str, Any], configured: list[Any]) -> list[Callback]:
    """Quiet the console (:func:`quiet_console`) and return the progress bar to add to a trainer
    with ``config`` and ``configured`` callbacks: none when one is configured or bars are off."""
    quiet_console(subcommand)
    enabled = config.get("enable_progress_bar") is not False
    if StepProgressBar is None or not enabled or any(isinstance(c, ProgressBar) for c in configured):
        return []
    return [StepProgressBar()]

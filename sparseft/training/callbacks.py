"""Callbacks that are not sparsity strategies."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, Callback

from sparseft.datamodules.base import write_label_tsv


class PredictionWriter(BasePredictionWriter):
    """Write ``sparseft predict`` outputs in the datamodule's format into the run directory.

    The datamodule formats them (``write_predictions``): GLUE a TSV of index and label name,
    SQuAD ``{question id: answer}`` JSON, E2E one output per MR and line; without a datamodule
    that can, a TSV of index and class id. The run directory is the trainer's ``log_dir`` (the
    logger's version folder, else ``default_root_dir``); the path written is printed. With
    several processes each rank writes its own file, ``<stem>-rank<r><suffix>``, with the rows
    it saw (where the format allows it; see ``predictions_per_rank``).

    Args:
        output_file: file name or path; relative paths are under the run directory. None: the
            datamodule's ``prediction_file`` (``predictions.tsv`` without one).
    """

    def __init__(self, output_file: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_file = output_file
        self.path: Path | None = None  # the file written last

    def target(self, trainer: Trainer) -> Path:
        """The file this process writes to."""
        name = self.output_file or getattr(trainer.datamodule, "prediction_file", "predictions.tsv")
        path = Path(trainer.log_dir or trainer.default_root_dir) / name
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}-rank{trainer.global_rank}{path.suffix}")
        return path

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse, before predicting, to overwrite an earlier run's file (a run without a logger writes
        into ``default_root_dir`` itself, so two predicts there would share the file name)."""
        path = self.target(trainer)
        if path.exists():
            raise ValueError(f"predictions file {path} exists: move it, or give --trainer.default_root_dir a new "
                             "directory (or keep the default logger, which writes each run into a new version_N)")

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        datamodule = trainer.datamodule
        path = self.target(trainer)
        indices = [i for batch in (batch_indices[0] if batch_indices else []) for i in batch]
        path.parent.mkdir(parents=True, exist_ok=True)
        if hasattr(datamodule, "write_predictions"):
            datamodule.write_predictions(predictions or [], indices, path)
        else:
            write_label_tsv(predictions or [], indices, path, None)
        self.path = path
        print(f"predictions written to {path}")


class RandomState(Callback):
    """Checkpoint the random generators (torch CPU and CUDA, Python, NumPy), so that dropout after
    a resume draws exactly what the uninterrupted run drew.

    The state is captured when the checkpoint is written and put back when training starts, after
    the sanity check and anything else a restart runs before its first step. With several
    processes the checkpoint holds rank 0's generators and every rank gets them back.
    ``SparseFTModule.configure_callbacks`` adds it to every run.

    Runs on: ``on_train_batch_start`` (a copy, for checkpoints written mid-step by an interrupt),
    ``state_dict`` (checkpoint save), ``load_state_dict`` (restore), ``on_train_start``.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._trainer: Trainer | None = None
        self._batch_start: dict[str, Any] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_start = self.capture()

    @staticmethod
    def capture() -> dict[str, Any]:
        name, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
        numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]
        # plain types and tensors only: checkpoints load with torch.load(weights_only=True)
        state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def state_dict(self) -> dict[str, Any]:
        """The generators now or, for a checkpoint written mid-step (an interrupt), at the step's start:
        a resume runs that step again and must draw what it drew."""
        progress = self._trainer.fit_loop.epoch_loop.batch_progress.current if self._trainer else None
        if progress is not None and progress.started > progress.processed and self._batch_start is not None:
            return self._batch_start
        return self.capture()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state, self._pending = self._pending, None
        if not state:
            return
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        name, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])

"""Callbacks that are not sparsity strategies."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, Callback


class PredictionWriter(BasePredictionWriter):
    """Write ``sparseft predict`` outputs as a TSV: ``index`` and ``prediction`` per example.

    Class ids become label names when the datamodule has ``label_names`` (GLUE's test-set
    submission format); regression values are written as numbers. With several processes each
    rank writes its own file, ``<stem>-rank<r>.tsv``, with the dataset indices it saw.

    Args:
        output_file: where to write; relative paths are under the trainer's ``default_root_dir``.
    """

    def __init__(self, output_file: str = "predictions.tsv") -> None:
        super().__init__(write_interval="epoch")
        self.output_file = output_file

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        path = Path(trainer.default_root_dir) / self.output_file
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}-rank{trainer.global_rank}{path.suffix}")
        names = getattr(trainer.datamodule, "label_names", None)
        rows = ["index\tprediction"]
        indices = [i for batch in (batch_indices[0] if batch_indices else []) for i in batch]
        values = torch.cat([p.flatten() for p in predictions]).tolist() if predictions else []
        for index, value in zip(indices or range(len(values)), values):
            label = names[int(value)] if names and not isinstance(value, float) else value
            rows.append(f"{index}\t{label}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rows) + "\n")


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

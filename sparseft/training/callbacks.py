"""Callbacks that are not sparsity strategies."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.trainer.states import TrainerFn

from sparseft.datamodules.base import write_label_tsv


class PredictionWriter(BasePredictionWriter):
    """Write ``sparseft predict`` outputs in the datamodule's format into the run directory; the files
    written last are in ``paths``.

    The datamodule formats them (``write_predictions``), one file per predicted set
    (``prediction_files``): GLUE the GLUE website's TSVs, SQuAD ``{question id: answer}`` JSON,
    E2E one output per MR and line; without a datamodule that can, a TSV of index and class id.
    The run directory is the trainer's ``log_dir`` (``default_root_dir`` without a logger); the
    paths written are printed. With several processes each rank writes its own files,
    ``<stem>-rank<r><suffix>``, with the rows it saw (where the format allows it; see
    ``predictions_per_rank``).

    Args:
        output_file: file name or path; relative paths are under the run directory. None: the
            datamodule's ``prediction_files`` (``predictions.tsv`` without one). With several
            predicted sets, each file is named ``<stem>-<the datamodule's file stem><suffix>``.
    """

    def __init__(self, output_file: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_file = output_file
        self.paths: list[Path] = []  # the files written last

    def targets(self, trainer: Trainer) -> list[Path]:
        """The files this process writes, one per predicted set."""
        names = getattr(trainer.datamodule, "prediction_files", None) or ["predictions.tsv"]
        if self.output_file:
            given = Path(self.output_file)
            names = [given] if len(names) == 1 else [given.with_stem(f"{given.stem}-{Path(n).stem}") for n in names]
        paths = [Path(trainer.log_dir or trainer.default_root_dir) / name for name in names]
        if trainer.world_size > 1:
            paths = [path.with_name(f"{path.stem}-rank{trainer.global_rank}{path.suffix}") for path in paths]
        return paths

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse, before predicting, to overwrite an earlier run's file."""
        for path in self.targets(trainer):
            if path.exists():
                raise ValueError(f"predictions file {path} exists: move it, or predict into another directory "
                                 "(--output_dir)")

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        datamodule, paths = trainer.datamodule, self.targets(trainer)
        per_set = [predictions] if len(paths) == 1 else predictions  # Lightning nests them only for several sets
        for path, outputs, batches in zip(paths, per_set, batch_indices or [[]] * len(paths)):
            indices = [i for batch in batches for i in batch]
            path.parent.mkdir(parents=True, exist_ok=True)
            if hasattr(datamodule, "write_predictions"):
                datamodule.write_predictions(outputs or [], indices, path)
            else:
                write_label_tsv(outputs or [], indices, path)
            print(f"predictions written to {path}")
        self.paths = paths


class MetricsWriter(Callback):
    """Write what ``sparseft validate`` / ``test`` reports (every logged metric, MNLI's per dev set) to
    ``metrics.json`` in the run directory (the trainer's ``log_dir``), and print its path. An existing
    file is never overwritten: the run is refused before it starts.

    Runs on: ``on_validation_start`` / ``on_test_start`` (the check), ``on_validation_end`` /
    ``on_test_end`` (the file, written by process 0), outside ``fit`` only.
    """

    FILE = "metrics.json"

    def target(self, trainer: Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir) / self.FILE

    def _check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING and self.target(trainer).exists():
            raise ValueError(f"metrics file {self.target(trainer)} exists: move it, or evaluate into another "
                             "directory (--output_dir)")

    def _write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING or trainer.sanity_checking or not trainer.is_global_zero:
            return
        path = self.target(trainer)
        metrics = {key: float(value) for key, value in sorted(trainer.callback_metrics.items())}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=1) + "\n")
        print(f"metrics written to {path}")

    on_validation_start = on_test_start = _check
    on_validation_end = on_test_end = _write


class RandomState(Callback):
    """Checkpoint the random generators (torch CPU and CUDA, Python, NumPy) of every process, so that
    dropout after a resume draws exactly what the uninterrupted run drew, on every process.

    The state is captured when the checkpoint is written and put back when training starts, after
    the sanity check and anything else a restart runs before its first step. With several
    processes (any strategy that initialises ``torch.distributed``) each process's state is gathered
    into the checkpoint, which rank 0 writes, and each process gets its own back (processes draw
    differently, e.g. dropout on batches of different padded lengths); a resume with another number
    of processes is refused. A checkpoint written before states were kept per process holds one
    state, which every process gets. ``SparseFTModule.configure_callbacks`` adds it to every run.

    Runs on: ``on_train_batch_start`` (a copy, for checkpoints written mid-step by an interrupt),
    ``state_dict`` (checkpoint save, on every process: Lightning writes checkpoints collectively),
    ``load_state_dict`` (restore), ``on_train_start``.
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
        """This process's generators, as plain types and tensors (checkpoints load with ``weights_only=True``)."""
        name, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
        numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]
        state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def restore(state: dict[str, Any]) -> None:
        """Put back a state :meth:`capture` took."""
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        name, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])

    def state_dict(self) -> dict[str, Any]:
        """``{"ranks": [state of process 0, 1, ...]}``: each process's generators now or, for a checkpoint
        written mid-step (an interrupt), at the step's start: a resume runs that step again and must
        draw what it drew."""
        progress = self._trainer.fit_loop.epoch_loop.batch_progress.current if self._trainer else None
        mid_step = progress is not None and progress.started > progress.processed and self._batch_start is not None
        local = self._batch_start if mid_step else self.capture()
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return {"ranks": [local]}
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, local)
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's states for ``on_train_start``; when fitting, refuse per-process states of
        another number of processes (``validate``, ``test`` and ``predict`` never restore them)."""
        ranks, trainer = state_dict.get("ranks"), self._trainer
        fitting = trainer is None or trainer.state.fn == TrainerFn.FITTING
        processes = trainer.world_size if trainer is not None else 1
        if fitting and ranks is not None and len(ranks) != processes:
            where = f"--ckpt_path {trainer.ckpt_path}: " if trainer is not None else ""
            raise ValueError(
                f"{where}written by {len(ranks)} process(es), this run has {processes}; a resume gives each "
                f"process its own random generators back, so resume with {len(ranks)} "
                "(--trainer.devices x --trainer.num_nodes)"
            )
        self._pending = state_dict

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state, self._pending = self._pending, None
        if state:
            self.restore(state["ranks"][trainer.global_rank] if "ranks" in state else state)


class PendingValidation(Callback):
    """Runs, after a resume, the validation that was due right after the checkpoint was written.

    A checkpoint written in ``on_train_batch_end`` (every-n-steps saves, an interrupt) precedes the
    validation Lightning runs at the end of that step; resumed from it, Lightning skips that validation
    (it fast-forwards the validation counters), so the run's dev metric stayed the one before
    (``sparseft_run.dev_metric`` at step 14 where the uninterrupted run validated at 21, in ``report``
    and the model card). The checkpoint records whether a validation was due (``PENDING_KEY``); the
    resumed run runs it before its first step, as the uninterrupted run did. ``SparseFTModule.
    configure_callbacks`` adds it to every run.

    Runs on: ``on_save_checkpoint``, ``on_load_checkpoint``, ``on_train_start``.
    """

    PENDING_KEY = "sparseft_validation_pending"

    def __init__(self) -> None:
        self._pending = False

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        loop, dev = trainer.fit_loop, getattr(pl_module, "dev_metric", None)
        validated_here = dev is not None and dev["step"] == trainer.global_step  # e.g. the save at the end
        checkpoint[self.PENDING_KEY] = bool(
            trainer.training and not trainer.sanity_checking and not validated_here
            and loop._data_fetcher is not None and loop.epoch_loop._should_check_val_fx(loop._data_fetcher)
        )

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._pending = bool(checkpoint.get(self.PENDING_KEY, False))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._pending:
            return
        self._pending = False
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        val_loop.restarting = False  # a whole validation, not the rest of the one before the checkpoint
        trainer.validating = True  # as Lightning's epoch loop runs it
        val_loop.run()
        trainer.training = True

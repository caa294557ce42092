"""Where ``sparseft validate|test|predict`` put what they write.

An evaluation is not a training run: left to Lightning, each one opened a new ``version_N`` in the
training run's logger folder (a TensorBoard run with an ``hp_metric`` of -1 and nothing else), so the
run list mixed training and evaluation and the next fit's ``version_N`` moved. Here an evaluation
uses no logger and writes into its own directory (:func:`evaluation_dir`): ``--output_dir`` if given,
else ``<run>/<command>`` beside the checkpoint's ``checkpoints/`` folder (``<command>-2``, ... when
taken), or under ``trainer.default_root_dir`` without a checkpoint file. It holds the run's
``config.yaml``, ``predict``'s predictions (:class:`~sparseft.training.callbacks.PredictionWriter`)
and ``validate`` / ``test``'s ``metrics.json`` (:class:`~sparseft.training.callbacks.MetricsWriter`);
each path is printed when written. Nothing is created before the run starts.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.utilities import rank_zero_info

from sparseft.training.callbacks import MetricsWriter, PredictionWriter
from sparseft.training.checkpoint_checks import is_checkpoint_path

OUTPUT_DIR_HELP = (
    "directory for this evaluation's outputs (predictions, metrics.json, config.yaml); default: <command> beside the "
    "checkpoint's checkpoints/ folder (<command>-2, ... when taken), or under --trainer.default_root_dir"
)


def run_directory(ckpt_path: str) -> Path:
    """The training run a checkpoint belongs to: the folder holding its ``checkpoints/`` folder, else
    the checkpoint's own folder."""
    folder = Path(ckpt_path).resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def evaluation_dir(command: str, ckpt_path: str | None, output_dir: str | None, root: str | None) -> Path:
    """The directory ``command`` writes into (see the module docstring); not created here."""
    if output_dir:
        return Path(output_dir)
    base = run_directory(ckpt_path) if ckpt_path and is_checkpoint_path(ckpt_path) else Path(root or ".")
    names = (command if number == 1 else f"{command}-{number}" for number in itertools.count(1))
    return next(base / name for name in names if not (base / name).exists())


def evaluation_trainer(command: str, config: dict[str, Any], configured: list[Any], ckpt_path: str | None,
                       output_dir: str | None) -> list[Callback]:
    """Point an evaluation's trainer options (``config``, edited) at its own directory with no logger, and
    return the callbacks that write its outputs (a writer configured in ``configured`` is kept instead)."""
    logger = config.get("logger")
    if logger not in (None, True, False):
        names = ", ".join(type(each).__name__ for each in (logger if isinstance(logger, list) else [logger]))
        rank_zero_info(f"sparseft {command}: the configured logger ({names}) is for fit runs; this evaluation "
                       "writes its results as files instead")
    config["logger"] = False
    config["default_root_dir"] = str(evaluation_dir(command, ckpt_path, output_dir, config.get("default_root_dir")))
    if command == "predict":
        return [] if any(isinstance(c, BasePredictionWriter) for c in configured) else [PredictionWriter()]
    return [MetricsWriter()]

"""What a run was, in a few plain values: its dev metric, its data, its length.

``SparseFTModule`` records the dev metric after every validation (:func:`choose_dev_metric`) and
writes it with a description of the data into each checkpoint (:data:`RUN_KEY`), so that
TensorBoard's ``hp_metric``, ``sparseft export``'s report.json and model card, and ``sparseft
report`` all name the same metric and value. :func:`read_training_summary` reads it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparseft.training.checkpoint_checks import load_checkpoint

RUN_KEY = "sparseft_run"


def choose_dev_metric(values: dict[str, float], *preferred: str | None) -> str | None:
    """The run's dev metric among the validation ``values`` (``val/...`` keys, in the datamodule's order).

    The first of ``preferred`` that is among them — the metric a checkpoint callback monitors, then
    the datamodule's ``monitor`` (the task's official metric on its first dev set: GLUE's Matthews
    correlation for CoLA, F1 for MRPC and QQP, Pearson for STS-B, accuracy elsewhere; SQuAD's F1;
    E2E's BLEU) — otherwise the first value.
    """
    return next((name for name in preferred if name and name in values), next(iter(values), None))


def describe_data(datamodule: Any) -> dict[str, Any]:
    """Datamodule class, task name and data directory, as plain values (for checkpoints and model cards)."""
    if datamodule is None:
        return {}
    cls = type(datamodule)
    task = getattr(datamodule, "task", None)
    return {
        "datamodule": f"{cls.__module__}.{cls.__qualname__}",
        "task": getattr(task, "name", task if isinstance(task, str) else None),
        "data_dir": getattr(datamodule, "data_dir", None),
    }


def read_training_summary(checkpoint_path: str | Path) -> dict[str, Any]:
    """Backbone, task type, data, optimizer steps and dev metric of the run that wrote a checkpoint.

    The checkpoint's tensors are not read (a file is memory-mapped, a sharded directory's ``meta.pt`` read).
    """
    checkpoint = load_checkpoint(checkpoint_path, tensors=False)
    hparams = checkpoint.get("hyper_parameters", {})
    run = checkpoint.get(RUN_KEY, {})
    return {
        "backbone": hparams.get("backbone"),
        "task_type": hparams.get("task"),
        "data": run.get("data", {}),
        "training_steps": checkpoint.get("global_step"),
        "dev_metric": run.get("dev_metric"),
    }

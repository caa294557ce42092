"""Command-line options of ``sparseft fit`` that LightningCLI's defaults would get wrong.

* ``--optimizer`` / ``--lr_scheduler``: LightningCLI builds its optimizer from
  ``model.parameters()`` when the model is created, before any strategy attaches its tensors (a
  PST run's optimizer would hold none of its factors). Here they are handed to the module
  (``SparseFTModule(optimizer=..., lr_scheduler=...)``), which builds them in
  ``configure_optimizers`` from the strategies' parameter groups. ``lr`` and ``weight_decay`` are
  not optimizer options: they are ``--model.learning_rate`` / ``--model.weight_decay`` (and the
  strategies' own), which every group uses.
* ``--sparsity NAME`` after a configuration that chose another strategy: jsonargparse would carry
  every setting the new class also accepts over from the old one (Magnitude's cubic schedule
  into DSEE, whose default is one shot). A strategy switched on the command line starts from its
  own defaults; the user is told what was not carried over.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.cli import LightningArgumentParser
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from sparseft.strategies import available_strategies

OPTIMIZER_HELP = (
    "optimizer class (any torch.optim.Optimizer, e.g. torch.optim.SGD, transformers.Adafactor) and its "
    "arguments; built from the strategy's parameter groups; lr and weight_decay are --model.learning_rate "
    "and --model.weight_decay. Default: AdamW (--model.adam_betas, --model.adam_epsilon)"
)
LR_SCHEDULER_HELP = (
    "a torch.optim.lr_scheduler class and its arguments, stepped every optimizer step in place of the "
    "built-in schedule (--model.lr_schedule linear|cosine|constant, --model.warmup_ratio, --model.min_lr_ratio)"
)


def add_optimizer_arguments(parser: LightningArgumentParser) -> None:
    """``--optimizer`` and ``--lr_scheduler``, linked to the module's ``optimizer`` / ``lr_scheduler``."""
    common: dict[str, Any] = {"instantiate": False, "fail_untyped": False, "required": False}
    parser.add_subclass_arguments(
        Optimizer, "optimizer", skip={"params", "lr", "weight_decay"}, help=OPTIMIZER_HELP, **common
    )
    parser.add_subclass_arguments(LRScheduler, "lr_scheduler", skip={"optimizer"}, help=LR_SCHEDULER_HELP, **common)
    parser.link_arguments("optimizer", "model.optimizer")
    parser.link_arguments("lr_scheduler", "model.lr_scheduler")


def _class_path(value: Any) -> str | None:
    """The full class path a ``--sparsity`` value or a config's ``sparsity`` entry names, if any."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        value = yaml.safe_load(value)
    if isinstance(value, dict):
        value = value.get("class_path")
    if not isinstance(value, str) or not value or value.lower() in ("null", "none"):
        return None
    if "." in value:
        return value
    for name, cls in available_strategies().items():  # a registry name, or a class name as jsonargparse allows
        if value in (name, cls.__name__):
            return f"{cls.__module__}.{cls.__qualname__}"
    return value


def _configured_strategy(path: str) -> str | None:
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return _class_path(config.get("sparsity")) if isinstance(config, dict) else None


def start_switched_strategies_fresh(argv: list[str]) -> list[str]:
    """Insert ``--sparsity=null`` before a ``--sparsity X`` that replaces another strategy, and warn.

    The strategy chosen so far is the last one named by a ``--config`` file or a ``--sparsity``
    option before it; naming the same class again keeps its settings (it is not a switch).
    """
    result: list[str] = []
    current: str | None = None
    index = 0
    while index < len(argv):
        arg = argv[index]
        option, equals, value = arg.partition("=")
        takes_next = not equals and index + 1 < len(argv)
        if not equals and takes_next:
            value = argv[index + 1]
        if option == "--config" and (equals or takes_next):
            current = _configured_strategy(value) or current
        elif option in ("--sparsity", "--sparsity.class_path") and (equals or takes_next):
            chosen = _class_path(value)
            if current and chosen and chosen != current:
                warnings.warn(
                    f"--sparsity {chosen.rsplit('.', 1)[-1]} replaces {current.rsplit('.', 1)[-1]}: it starts from "
                    "its own defaults, none of the earlier sparsity settings are carried over", stacklevel=2,
                )
                result.append("--sparsity=null")
            current = chosen
        result.append(arg)
        index += 1
    return result

"""Checks of a parsed ``sparseft`` command that refuse, before any data or model is loaded, a run
that would otherwise do something else than the user meant.

* :func:`check_evaluated_weights`: ``validate`` / ``test`` / ``predict`` without ``--ckpt_path``
  would evaluate the backbone as loaded: not fine-tuned, not sparsified, a task head that is
  often freshly initialised (every prediction "negative"). They need ``--ckpt_path``, or
  ``--backbone_weights true`` when ``model.backbone`` is itself a fine-tuned model (a
  ``sparseft export`` directory, a hub model fine-tuned for the task) or a deliberate zero-shot
  baseline. A model built from ``model.config`` has random weights and always needs a checkpoint.
* :func:`check_trainer_strategy`: the trainer strategies a sparsity strategy cannot run under
  (FSDP1, DeepSpeed), with the reason; docs/user_guide.md "Several processes" says what each one
  supports. FSDP2 (``fsdp2``) is supported; settings of a strategy that cannot shard are refused by
  :meth:`~sparseft.strategies.base.SparsityStrategy.check_trainer`.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning.pytorch.strategies import (
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    Strategy,
    StrategyRegistry,
)

EVALUATION_COMMANDS = ("validate", "test", "predict")
BACKBONE_WEIGHTS_HELP = (
    "validate / test / predict model.backbone's own weights, with no --ckpt_path: for a backbone that is already "
    "fine-tuned for the task (e.g. a sparseft export) or a deliberate zero-shot baseline"
)


def check_evaluated_weights(subcommand: str, config: Any) -> None:
    """Refuse an evaluation whose weights would be the untrained backbone's, unless asked for."""
    if subcommand not in EVALUATION_COMMANDS:
        return
    from_backbone, ckpt_path = config.get("backbone_weights"), config.get("ckpt_path")
    if from_backbone and ckpt_path:
        raise ValueError(f"--backbone_weights true and --ckpt_path {ckpt_path} name two sets of weights: give one")
    if from_backbone and config.get("model.backbone") is None:
        raise ValueError("--backbone_weights true: model.config builds a model with random weights; give --ckpt_path")
    if from_backbone and config.get("sparsity") is not None:
        raise ValueError(
            "--backbone_weights true evaluates a backbone as it is; a sparsity strategy would attach fresh masks "
            "and updates to it: drop --sparsity (an exported model needs none), or give --ckpt_path"
        )
    if not from_backbone and not ckpt_path:
        raise ValueError(
            f"sparseft {subcommand} without --ckpt_path would use the untrained backbone (no fine-tuning, no "
            "sparsity): pass --ckpt_path <checkpoint of sparseft fit>, or --backbone_weights true if model.backbone "
            "is itself fine-tuned for this task (e.g. a sparseft export)"
        )


#: Trainer strategies that sparsity strategies cannot run under, and why (FSDP2 is ``fsdp2``).
UNSUPPORTED_WITH_SPARSITY: dict[type, str] = {
    FSDPStrategy: "FSDP1 (FullyShardedDataParallel) flattens each block's weights into one sharded vector, "
    "which parametrized layers and whole-matrix masks cannot address, and Lightning and torch do not run it "
    "on CPUs; use --trainer.strategy fsdp2 (FSDP2, fully_shard), or ddp",
    DeepSpeedStrategy: "DeepSpeed owns the optimizer and partitions its state and gradients (ZeRO-3 also the "
    "weights), which masks, gradient masking and DSEE's optimizer restart need whole; use --trainer.strategy "
    "fsdp2 or ddp",
}


def _strategy_class(value: Any) -> type | None:
    """The class a ``trainer.strategy`` value names (a registry name or ``class_path``), if known."""
    if isinstance(value, str) and value in StrategyRegistry:
        return StrategyRegistry[value]["strategy"]
    class_path = value if isinstance(value, str) else value.get("class_path") if hasattr(value, "get") else None
    if isinstance(class_path, str) and "." in class_path:
        module, _, name = class_path.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name, None)
        except ImportError:
            return None  # Lightning names what it cannot import
    return type(value) if isinstance(value, Strategy) else None


def whole_backbone_reason(trainer_strategy: Any, sparsity: Any) -> str | None:
    """Under ``fsdp2`` (any ``ModelParallelStrategy``), why every process must still load the whole backbone
    (None: the module may be built without weights and read shard by shard, see
    :mod:`sparseft.training.sharding`); outside it, "not sharded"."""
    cls = _strategy_class(trainer_strategy)
    if not (isinstance(cls, type) and issubclass(cls, ModelParallelStrategy)):
        return "not sharded"
    class_path = sparsity.get("class_path") if hasattr(sparsity, "get") else None
    if class_path is None:
        return None
    strategy = _strategy_class(class_path)
    init_args = sparsity.get("init_args") or {}
    if hasattr(strategy, "attaches_to_empty") and strategy.attaches_to_empty(dict(init_args)):
        return None
    name = getattr(strategy, "__name__", class_path)
    return f"sparsity strategy {name} reads the backbone's weights when it attaches"


def check_trainer_strategy(trainer_strategy: Any, sparsity: Any) -> None:
    """Refuse a sparsity strategy under FSDP1 or DeepSpeed, naming the reason."""
    if sparsity is None:
        return
    cls = _strategy_class(trainer_strategy)
    for unsupported, reason in UNSUPPORTED_WITH_SPARSITY.items():
        if isinstance(cls, type) and issubclass(cls, unsupported):
            raise ValueError(
                f"--trainer.strategy {unsupported.__name__} is not supported with a sparsity strategy: {reason} "
                "(docs/user_guide.md, Several processes)"
            )

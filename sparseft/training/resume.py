"""What a checkpoint may and may not change when a run starts from it (``--ckpt_path``).

* :func:`merge_model_options`: LightningCLI parses a checkpoint's hyper-parameters *over* the
  user's ``model.*`` options, silently: a tiny-BERT config resumed from a GPT-2 checkpoint trains
  GPT-2, ``--model.learning_rate`` is ignored and ``config.yaml`` records the checkpoint's values.
  sparseft refuses a checkpoint of another model (``backbone``, ``config`` or ``tokenizer`` set by
  the user and different), keeps every other option the user set (a new learning rate for the
  rest of a run is legitimate), takes the checkpoint's value for options the user left at their
  default (so ``sparseft validate --ckpt_path CKPT`` needs no model options), and says in one
  line which options differ from the checkpoint and whose value the run uses.
* :func:`check_strategy_settings`: a checkpoint's masks belong to its strategy's settings;
  resuming with another ``sparsity`` (or targets, schedule, pattern, ranks, ...) would keep the
  old masks and then revive pruned weights chosen by position. Refused, naming both values.
* :func:`strategy_for_evaluation`: ``validate`` / ``test`` / ``predict`` take the strategy and its
  settings from the checkpoint where the user gave none, as they take model options; a strategy or
  setting the user gave that differs is refused, saying to drop it.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from sparseft.strategies.base import CHECKPOINT_KEY, SparsityStrategy
from sparseft.strategies.registry import build_strategy, strategy_class
from sparseft.training.checkpoint_checks import is_checkpoint_path, load_checkpoint

#: The options that say which model a checkpoint holds: a different one is another model.
MODEL_IDENTITY = ("backbone", "config", "tokenizer")
#: Linked from the datamodule or the top-level ``--optimizer`` / ``--lr_scheduler``: never taken
#: from a checkpoint (a different task shows up as a refused state_dict).
LINKED = ("task", "num_labels", "optimizer", "lr_scheduler")


def _same_model_name(first: Any, second: Any) -> bool:
    """Equal, or two spellings of one local directory."""
    if first == second:
        return True
    if isinstance(first, str) and isinstance(second, str) and Path(first).exists() and Path(second).exists():
        return Path(first).resolve() == Path(second).resolve()
    return False


def merge_model_options(
    user: dict[str, Any], saved: dict[str, Any], defaults: dict[str, Any], ckpt_path: str
) -> tuple[dict[str, Any], list[str]]:
    """The ``model.*`` options a run from ``ckpt_path`` uses, and one note per option that differs.

    Args:
        user: the options as the user's configuration sets them (defaults included).
        saved: the checkpoint's ``hyper_parameters``.
        defaults: the module's constructor defaults: an option still at its default is "not set".
        ckpt_path: named in the messages.

    Raises:
        ValueError: the user set ``backbone``, ``config`` or ``tokenizer`` to another model.
    """
    merged, notes = dict(user), []
    for key, saved_value in saved.items():
        if key.startswith("_") or key in LINKED or key not in user or _same_model_name(user[key], saved_value):
            continue
        user_set = user[key] != defaults.get(key)
        if key in MODEL_IDENTITY and user_set:
            raise ValueError(
                f"--ckpt_path {ckpt_path} holds a model with model.{key}={saved_value!r}, but this run sets "
                f"model.{key}={user[key]!r}: drop --model.{key} to use the checkpoint's, or start a new fit "
                "without --ckpt_path"
            )
        if user_set:
            notes.append(f"model.{key}={user[key]!r} (this run's; the checkpoint's was {saved_value!r})")
        else:
            merged[key] = saved_value
            notes.append(f"model.{key}={saved_value!r} (the checkpoint's; default {user[key]!r})")
    return merged, notes


def model_options_from_checkpoint(ckpt_path: str | None, user: dict[str, Any], module_class: type) -> dict[str, Any]:
    """The ``model.*`` options of ``module_class`` that a run from ``ckpt_path`` takes from the checkpoint
    (see :func:`merge_model_options`); logs one line naming every option that differs from the checkpoint."""
    if not ckpt_path or not is_checkpoint_path(ckpt_path):
        return {}
    checkpoint = load_checkpoint(ckpt_path, tensors=False)
    defaults = {name: parameter.default for name, parameter in inspect.signature(module_class).parameters.items()}
    merged, notes = merge_model_options(user, checkpoint.get("hyper_parameters") or {}, defaults, ckpt_path)
    if notes:
        rank_zero_info(f"sparseft: model options that differ from --ckpt_path {ckpt_path}: " + "; ".join(notes))
    return {key: value for key, value in merged.items() if value != user.get(key)}


#: Strategy settings a resumed run may change: they move no mask (logging, learning rates).
CHANGEABLE_ON_RESUME = frozenset({"log_layers", "learning_rate", "retune_learning_rate", "score_lr", "weight_decay"})


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"schedule": {"kind": ...}}`` as ``{"schedule.kind": ...}``: one entry per command-line option."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _effective_settings(strategy: SparsityStrategy) -> dict[str, Any]:
    """Constructor arguments, with the schedule the strategy runs (a default one is written as None)."""
    settings = strategy.describe()["init_args"]
    if is_dataclass(getattr(strategy, "schedule", None)):
        settings["schedule"] = asdict(strategy.schedule)
    return _flat(settings)


def _cli_value(value: Any) -> str:
    return json.dumps(value) if value is None or isinstance(value, (list, tuple, bool)) else str(value)


def _settings_given(entry: dict[str, Any]) -> dict[str, Any]:
    """The settings of a ``sparsity`` entry (class path and constructor arguments) that differ from its
    class's defaults: what the user gave."""
    cls = strategy_class(entry)
    init_args = entry.get("init_args") or {}
    required = {name: init_args[name] for name, parameter in inspect.signature(cls).parameters.items()
                if parameter.default is inspect.Parameter.empty and name in init_args}
    defaults = _effective_settings(build_strategy({**entry, "init_args": required}))
    return {key: value for key, value in _effective_settings(build_strategy(entry)).items()
            if value != defaults.get(key)}


def strategy_for_evaluation(saved: dict[str, Any] | None, user: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``sparsity`` entry (``class_path`` and ``init_args``) that ``validate`` / ``test`` / ``predict``
    run with from a checkpoint: the checkpoint's strategy (``saved``, its :meth:`~SparsityStrategy.describe`
    entry, or None), with any setting the user's entry (``user``) changes that may change
    (:data:`CHANGEABLE_ON_RESUME`). The user's settings left at their defaults are not "given".

    Raises:
        ValueError: the user gave a strategy the checkpoint does not have, or a mask setting other than
            the checkpoint's; the message says what to drop.
    """
    if user is None:
        return None if saved is None else {"class_path": saved["class_path"], "init_args": saved["init_args"]}
    cls = strategy_class(user)
    name = cls.strategy_name or cls.__name__
    if saved is None or strategy_class(saved) is not cls:
        held = f"sparsity strategy {saved.get('name') or saved['class_path']!r}" if saved else "no sparsity strategy"
        raise ValueError(f"this checkpoint has {held}, but this run sets --sparsity {name}: drop --sparsity (and its "
                         "settings) to evaluate the checkpoint as it was trained")
    given, saved_settings = _settings_given(user), _effective_settings(build_strategy(saved))
    differ = [key for key, value in given.items()
              if key not in CHANGEABLE_ON_RESUME and value != saved_settings.get(key)]
    if differ:
        changes = ", ".join(f"--sparsity.{key}={_cli_value(given[key])} (checkpoint: "
                            f"{_cli_value(saved_settings.get(key))})" for key in differ)
        raise ValueError(f"this run's {name} settings differ from the checkpoint's: {changes}; its masks were made "
                         "with the checkpoint's settings, which are used when not given: drop "
                         f"{', '.join(f'--sparsity.{key}' for key in differ)}")
    kept = {key: value for key, value in given.items() if key in CHANGEABLE_ON_RESUME}
    return {"class_path": saved["class_path"], "init_args": {**saved["init_args"], **kept}}


def strategy_options_from_checkpoint(ckpt_path: str | None, user: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``sparsity`` entry an evaluation from ``ckpt_path`` runs with (:func:`strategy_for_evaluation`;
    ``user`` where ``ckpt_path`` is no checkpoint file or directory); logs it when taken from the checkpoint."""
    if not ckpt_path or not is_checkpoint_path(ckpt_path):
        return user
    entry = strategy_for_evaluation(load_checkpoint(ckpt_path, tensors=False).get(CHECKPOINT_KEY), user)
    if entry is not None and entry != user:
        settings = ", ".join(f"{key}={value!r}" for key, value in _settings_given(entry).items())
        name = strategy_class(entry).strategy_name or entry["class_path"]
        rank_zero_info(f"sparseft: sparsity from --ckpt_path {ckpt_path}: {name}({settings})")
    return entry


def check_checkpoint_strategies(saved: dict[str, Any] | None, strategies: list[SparsityStrategy]) -> None:
    """Refuse, with a fix, a checkpoint whose sparsity strategy (``saved``, its
    :meth:`~SparsityStrategy.describe` entry, or None) or its mask settings differ from this run's
    ``strategies``. The command checks it before the run starts, the module again when it loads."""
    entry = saved or {}
    name = entry.get("name") or entry.get("class_path")
    current = [strategy.strategy_id for strategy in strategies]
    if name and name not in current:
        raise ValueError(
            f"this checkpoint was trained with sparsity strategy {name!r}, but this run uses "
            f"{current or 'none'}: run with --sparsity {name} (and the same targets), or export it"
        )
    if not name and current:
        raise ValueError(
            f"this checkpoint has no sparsity strategy, but this run uses {current}: resume it without "
            "--sparsity, or start a new run from its weights"
        )
    for strategy in strategies:
        if strategy.strategy_id == name:
            check_strategy_settings(entry, strategy)


def check_strategy_settings(saved: dict[str, Any], strategy: SparsityStrategy) -> None:
    """Refuse to resume ``strategy`` from a checkpoint whose strategy had other mask settings.

    Args:
        saved: the checkpoint's strategy description (:meth:`SparsityStrategy.describe`).
        strategy: this run's strategy, of the same registered name.
    """
    saved_args, current_args = _effective_settings(build_strategy(saved)), _effective_settings(strategy)
    differ = [
        key for key in sorted(set(saved_args) | set(current_args))
        if key not in CHANGEABLE_ON_RESUME and saved_args.get(key) != current_args.get(key)
    ]
    if not differ:
        return
    changes = ", ".join(f"{key} {current_args.get(key)!r} (checkpoint: {saved_args.get(key)!r})" for key in differ)
    fix = " ".join(f"--sparsity.{key}={_cli_value(saved_args.get(key))}" for key in differ)
    raise ValueError(
        f"this run's {strategy.strategy_name} settings differ from the checkpoint's: {changes}; its masks were made "
        f"with the checkpoint's settings, so resume with them ({fix}), or export the checkpoint and start a new "
        "fit from it"
    )

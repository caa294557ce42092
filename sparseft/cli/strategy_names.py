"""Strategy names wherever the ``sparseft`` command takes a strategy, configuration files included.

jsonargparse resolves a ``class_path`` without dots to the imported subclass whose class name is
exactly that (``Magnitude``). sparseft promises more: its registry names (``magnitude``, the names
``sparseft strategies`` lists, entry-point strategies included) and class names in any case
(``MAGNITUDE``), in a configuration file as on the command line.

Configuration files are read by the loader of a parser mode of sparseft's own (registered with
jsonargparse's :func:`~jsonargparse.set_loader`, its mechanism for custom loaders): the YAML is
loaded as usual, then a ``sparsity`` entry's name becomes the full class path, before jsonargparse
checks the value. Everything after that (checks, ``--print_config``, the run's saved config.yaml)
sees an ordinary class path. An unknown name is refused with the list of the known ones.
"""

from __future__ import annotations

from typing import Any

from jsonargparse import get_loader, set_loader

from sparseft.strategies import SparsityStrategy, get_strategy
from sparseft.strategies.registry import available_strategies

PARSER_MODE = "sparseft"
STRATEGY_KEY = "sparsity"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
_NO_STRATEGY = ("", "null", "none")


def strategy_class_path(name: str) -> str:
    """The full class path of a strategy given by registry name or class name (any case).

    A dotted path, and the exact class name of an imported strategy that is not registered, are
    returned as given (jsonargparse resolves them); an unknown name raises ``ValueError`` listing the
    registered ones.
    """
    if "." in name:
        return name
    try:
        cls = get_strategy(name)
    except ValueError:
        if name in _imported_strategy_names(SparsityStrategy):
            return name  # imported but never registered: jsonargparse resolves its class name
        raise
    return f"{cls.__module__}.{cls.__qualname__}"


def _imported_strategy_names(cls: type) -> set[str]:
    """Class names of every imported subclass of ``cls``, the names jsonargparse resolves itself."""
    return {sub.__name__ for sub in cls.__subclasses__()} | {
        name for sub in cls.__subclasses__() for name in _imported_strategy_names(sub)
    }


def names_a_strategy(value: str) -> bool:
    """Whether a command-line value is a strategy's short name (not a class path, a dict or null)."""
    return "." not in value and not value.startswith(("{", "-")) and value.lower() not in _NO_STRATEGY


def _resolve_entry(entry: Any) -> Any:
    """A ``sparsity`` entry (a class path, or a dict with ``class_path``) with its name resolved."""
    if isinstance(entry, str) and names_a_strategy(entry):
        return strategy_class_path(entry)
    if isinstance(entry, dict) and isinstance(entry.get("class_path"), str):
        return {**entry, "class_path": strategy_class_path(entry["class_path"])}
    return entry


def _is_strategy_spec(value: Any) -> bool:
    """A bare ``{class_path: <registered name>, ...}``, as ``--sparsity FILE`` or a JSON value gives."""
    if not (isinstance(value, dict) and isinstance(value.get("class_path"), str)):
        return False
    name = value["class_path"].lower()
    return "." not in name and any(name in (key, cls.__name__.lower()) for key, cls in available_strategies().items())


def resolve_strategy_names(config: Any) -> Any:
    """``config`` with every strategy name in it replaced by the strategy's full class path: the
    top-level ``sparsity`` entry, the one under each subcommand, or a bare strategy spec."""
    if not isinstance(config, dict):
        return config
    if _is_strategy_spec(config):
        return _resolve_entry(config)
    resolved = dict(config)
    if STRATEGY_KEY in resolved:
        resolved[STRATEGY_KEY] = _resolve_entry(resolved[STRATEGY_KEY])
    for subcommand in SUBCOMMANDS:
        if isinstance(resolved.get(subcommand), dict):
            resolved[subcommand] = resolve_strategy_names(resolved[subcommand])
    return resolved


def _load(text: str) -> Any:
    return resolve_strategy_names(get_loader("yaml")(text))


def register_parser_mode() -> str:
    """Register the loader for :data:`PARSER_MODE` (idempotent) and return the mode's name."""
    import yaml

    set_loader(PARSER_MODE, _load, exceptions=(yaml.YAMLError,))
    return PARSER_MODE

"""The strategy registry: by name in code, and by the entry-point group ``sparseft.strategies``.

A third-party package adds a strategy with no change to sparseft, in its ``pyproject.toml``::

    [project.entry-points."sparseft.strategies"]
    my_method = "my_package.strategy:MyMethod"
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

from sparseft.sparse.schedules import SparsitySchedule
from sparseft.strategies.base import SparsityStrategy

ENTRY_POINT_GROUP = "sparseft.strategies"
_REGISTRY: dict[str, type[SparsityStrategy]] = {}
_entry_points_loaded = False

StrategyClass = TypeVar("StrategyClass", bound="type[SparsityStrategy]")


def register_strategy(name: str) -> Callable[[StrategyClass], StrategyClass]:
    """Class decorator: make a strategy available as ``name`` (``sparseft strategies`` lists it)."""

    def decorator(cls: StrategyClass) -> StrategyClass:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            taken = _REGISTRY[key]
            raise ValueError(f"strategy name {name!r} is taken by {taken.__module__}.{taken.__qualname__}")
        cls.strategy_name = key
        _REGISTRY[key] = cls
        return cls

    return decorator


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        cls = entry.load()
        if not (isinstance(cls, type) and issubclass(cls, SparsityStrategy)):
            raise TypeError(f"entry point {entry.name!r} = {entry.value!r} is not a SparsityStrategy subclass")
        if entry.name.lower() not in _REGISTRY:
            register_strategy(entry.name)(cls)


def available_strategies() -> dict[str, type[SparsityStrategy]]:
    """All registered strategies by name, built-in and from installed packages, sorted."""
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_strategy(name: str) -> type[SparsityStrategy]:
    """The strategy class registered as ``name`` (case-insensitive; class names work too)."""
    strategies = available_strategies()
    key = name.lower()
    if key in strategies:
        return strategies[key]
    for cls in strategies.values():
        if cls.__name__.lower() == key:
            return cls
    raise ValueError(f"unknown sparsity strategy {name!r}; available: {', '.join(strategies)}")


def sparseft_strategies() -> dict[str, type[SparsityStrategy]]:
    """The strategies sparseft itself ships, by name, sorted: not those of other installed packages
    (whose entry points are not even loaded), so that installing one changes nothing here."""
    import sparseft.strategies  # noqa: F401  (registers the built-in strategies)

    return {name: cls for name, cls in sorted(_REGISTRY.items()) if cls.__module__.partition(".")[0] == "sparseft"}


def strategy_class(description: dict[str, Any]) -> type[SparsityStrategy]:
    """The class a :meth:`SparsityStrategy.describe` names: the registered one by its name, else (a
    strategy never registered, e.g. used by class path only) the class its ``class_path`` imports."""
    name, class_path = description.get("name") or "", description.get("class_path")
    if name in available_strategies() or not class_path:
        return get_strategy(name)
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(
            f"cannot import the strategy {class_path!r} this checkpoint was trained with ({error}): install or "
            "put on the Python path the package that defines it"
        ) from error
    if not (isinstance(cls, type) and issubclass(cls, SparsityStrategy)):
        raise ValueError(f"{class_path!r} is not a SparsityStrategy subclass")
    return cls


def build_strategy(description: dict[str, Any]) -> SparsityStrategy:
    """Rebuild a strategy from :meth:`SparsityStrategy.describe` (e.g. a checkpoint's entry)."""
    kwargs = dict(description.get("init_args", {}))
    if isinstance(kwargs.get("schedule"), dict):
        kwargs["schedule"] = SparsitySchedule(**kwargs["schedule"])
    return strategy_class(description)(**kwargs)

"""Select the layers a strategy sparsifies: one matching rule, for a string and a list alike.

``targets`` is a string or a list of strings; a string means a list of one. Each item is

* a role name (``q``, ``k``, ``v``, ``qkv``, ``o``, ``ffn_in``, ``ffn_out``) from the
  architecture presets in :mod:`sparseft.sparse.layers`, or ``all`` for every role; or
* otherwise a regular expression that must match a module's *whole* dotted name
  (``re.fullmatch``), e.g. ``.*attention\\.self\\.(query|value)``.

The default (``None``) is ``all``: every linear inside the transformer blocks, never the
embeddings, pooler or task head. Only ``nn.Linear`` / ``Conv1D`` layers are candidates. An
item that matches nothing is an error naming it, so a typo never silently prunes nothing.
"""

from __future__ import annotations

import re

from torch import nn

from sparseft.sparse.layers import ROLE_PRESETS, ROLES, LinearLayer, find_linear_layers, model_type_of

ALL_ROLES = "all"
TargetSpec = str | list[str] | None


def _as_items(targets: TargetSpec) -> list[str]:
    if targets is None:
        return [ALL_ROLES]
    items = [targets] if isinstance(targets, str) else list(targets)
    if not items:
        raise ValueError("targets is an empty list: name at least one role or pattern, or leave it unset")
    for item in items:
        if item not in ROLES and item != ALL_ROLES:
            try:
                re.compile(item)
            except re.error as error:
                raise ValueError(f"target pattern {item!r} is not a valid regular expression: {error}") from None
    return items


def _matches(item: str, layer: LinearLayer) -> bool:
    if item == ALL_ROLES:
        return layer.role is not None
    if item in ROLES:
        return layer.role == item
    return re.fullmatch(item, layer.name) is not None


def _no_match_error(item: str, model: nn.Module, candidates: list[LinearLayer]) -> ValueError:
    model_type = model_type_of(model)
    names = [layer.name for layer in candidates]
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    if item in ROLES or item == ALL_ROLES:
        roles = sorted(ROLE_PRESETS.get(model_type or "", {}))
        hint = (
            f"model type {model_type!r} has roles {roles}" if roles
            else f"there is no role preset for model type {model_type!r}; give regular expressions instead"
        )
        return ValueError(f"target role {item!r} matched no layer: {hint}. Linear layers: {shown}")
    return ValueError(
        f"target pattern {item!r} matched no linear layer (patterns must match the whole module name, "
        f"e.g. '.*attention\\.self\\.query'). Linear layers: {shown}"
    )


def select_targets(model: nn.Module, targets: TargetSpec = None) -> list[LinearLayer]:
    """The linear layers of ``model`` selected by ``targets``, in module order.

    Raises:
        ValueError: an item matches no layer (the message names it and lists layers).
    """
    candidates = find_linear_layers(model)
    selected: dict[str, LinearLayer] = {}
    for item in _as_items(targets):
        hits = [layer for layer in candidates if _matches(item, layer)]
        if not hits:
            raise _no_match_error(item, model, candidates)
        selected.update((layer.name, layer) for layer in hits)
    return [layer for layer in candidates if layer.name in selected]


def update_targets(model: nn.Module, targets: TargetSpec = None) -> list[LinearLayer]:
    """The layers that get a low-rank update: ``targets``, or by default the query and value
    projections (GPT-2: its fused ``qkv``), the LoRA paper's choice and PEFT's default."""
    if targets is not None:
        return select_targets(model, targets)
    roles = {layer.role for layer in find_linear_layers(model)}
    return select_targets(model, ["q", "v"] if {"q", "v"} <= roles else "qkv")


def describe_targets(layers: list[LinearLayer]) -> str:
    """A table of selected layers (name, role, shape, parameters) for logs and dry runs."""
    width = max((len(layer.name) for layer in layers), default=4)
    rows = [f"{'layer':<{width}}  {'role':<8}  {'[out, in]':>12}  {'weights':>10}"]
    for layer in layers:
        out_features, in_features = layer.shape
        rows.append(
            f"{layer.name:<{width}}  {layer.role or '-':<8}  {f'[{out_features}, {in_features}]':>12}  "
            f"{out_features * in_features:>10,}"
        )
    total = sum(layer.shape[0] * layer.shape[1] for layer in layers)
    rows.append(f"{len(layers)} target layers, {total:,} weights")
    return "\n".join(rows)

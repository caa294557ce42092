"""Make pruning permanent and save a plain Hugging Face model directory.

The saved directory loads with ``AutoModel*.from_pretrained`` and needs no sparseft import:
every ``M ⊙ (W0 + ΔW)`` is merged into an ordinary weight (exact zeros where pruned), and
``report.json`` beside it records the measured sparsity, parameters and FLOPs (with their
``units``) and whatever the caller adds (``sparseft export``: strategy, backbone, data, steps,
dev metric); ``README.md`` is the model card written from it (:mod:`sparseft.sparse.model_card`).
Every file is readable as the user's umask allows (some writers stage files with mode 0600).

With ``shrink=True`` (what ``sparseft export`` passes for a strategy that prunes whole heads or
FFN channels), units whose weights are all zero after merging are then removed physically
(:func:`sparseft.sparse.shrink.shrink_`): the saved model is smaller. When the config cannot
express the new shapes (heads of BERT, RoBERTa, GPT-2), the directory also holds
``modeling_sparseft.py`` and loads with ``from_pretrained(path, trust_remote_code=True)``.
S²FT's slice layers (:mod:`sparseft.sparse.slices`) are merged too and become their original
``nn.Linear`` / ``Conv1D`` again, index-aligned with the base model. Unstructured exports never
shrink, even where a channel happens to be all zeros, so they always load with a plain
``from_pretrained``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from sparseft.sparse.model_card import model_card
from sparseft.sparse.parametrize import merge_, sparse_layers
from sparseft.sparse.report import build_report, count_parameters, linear_flops_per_token
from sparseft.sparse.shrink import add_remote_code_, shrink_
from sparseft.sparse.slices import restore_linear_

REPORT_FILE = "report.json"
MODEL_CARD_FILE = "README.md"
STRUCTURED_UNITS = ("counts: heads removed per block (their indices), FFN channels removed per block; "
                    "total_parameters and linear_flops_per_token of the shrunk model, in the units above")


def export_pretrained(
    model: nn.Module, output_dir: str | Path, tokenizer: Any = None, extra: dict[str, Any] | None = None,
    shrink: bool = False,
) -> dict[str, Any]:
    """Merge ``model`` in place, save it (and the tokenizer) to ``output_dir``, write the report.

    Args:
        model: a Hugging Face ``PreTrainedModel``, sparsified or not.
        output_dir: created if missing.
        tokenizer: saved beside the model when given.
        extra: more fields for ``report.json`` (strategy name and settings, for example; ``backbone``,
            ``task_type``, ``data``, ``training_steps`` and ``dev_metric`` also go into the model card).
        shrink: physically remove all-zero heads and FFN channels (in place); for structured
            pruning (see ``SparsityStrategy.structured``).

    Returns:
        The report that was written; ``structured`` describes what shrinking removed, and
        ``trainable_parameters`` what fine-tuning trained (counted before merging).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trained, _ = count_parameters(model)  # merging folds the trained factors into frozen weights
    target_names = [layer.name for layer in sparse_layers(model)]
    target_names += restore_linear_(model)  # S²FT slice layers: merged, original module types back
    merge_(model)
    report = {**(extra or {}), **build_report(model, target_names, trained)}
    if shrink:
        report["structured"] = _shrink_for_export_(model, output_dir)
        report["units"] = {**report["units"], "structured": STRUCTURED_UNITS}
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    (output_dir / MODEL_CARD_FILE).write_text(model_card(report, str(output_dir), class_names(model)))
    make_readable_(output_dir)
    return report


def class_names(model: nn.Module) -> list[str] | None:
    """The classes' names in id order from the config's ``id2label``; None when they are only
    transformers' placeholders (``LABEL_0``, ...) or the model is not a classifier."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = [id2label[index] for index in sorted(id2label, key=int)]
    return None if all(re.fullmatch(r"LABEL_\d+", str(name)) for name in names) else names


def make_readable_(directory: Path) -> None:
    """Add the read permissions (and, on folders, traversal) that the user's umask grants to
    ``directory`` and everything under it, removing none: transformers writes the weights through a
    temporary file of mode 0600, which other users (a serving account) could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        readable = 0o555 if path.is_dir() else 0o444
        path.chmod((path.stat().st_mode & 0o7777) | (readable & ~umask))


def _shrink_for_export_(model: nn.Module, output_dir: Path) -> dict[str, Any]:
    """Shrink in place; add the remote code when the config cannot describe the result."""
    removed = shrink_(model)
    resized = removed.pop("resized")
    if resized:
        add_remote_code_(model, output_dir, resized)
    dense_flops, _ = linear_flops_per_token(model)
    return {
        **removed,
        "total_parameters": count_parameters(model)[1],
        "linear_flops_per_token": dense_flops,
        "load_with": "from_pretrained(path, trust_remote_code=True)" if resized else "from_pretrained(path)",
    }

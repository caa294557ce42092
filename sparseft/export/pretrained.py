"""Make pruning permanent and save a plain Hugging Face model directory.

The saved directory loads with ``AutoModel*.from_pretrained`` and needs no sparseft import:
every ``M ⊙ (W0 + ΔW)`` is merged into an ordinary weight (exact zeros where pruned), and
``report.json`` beside it records the measured sparsity, parameters and FLOPs (with their
``units``) and whatever the caller adds (``sparseft export``: strategy, backbone, data, steps,
dev metric); ``README.md`` is the model card written from it (:mod:`sparseft.export.model_card`).
Every file is readable as the user's umask allows (some writers stage files with mode 0600).

With ``shrink=True`` (what ``sparseft export`` passes for a strategy that prunes whole heads or
FFN channels), units whose weights are all zero after merging are then removed physically
(:func:`sparseft.export.shrink.shrink_`): the saved model is smaller. When the config cannot
express the new shapes (heads of BERT, RoBERTa, GPT-2), the directory also holds
``modeling_sparseft.py`` and loads with ``from_pretrained(path, trust_remote_code=True)``.
S²FT's slice layers (:mod:`sparseft.sparse.slices`) are merged too and become their original
``nn.Linear`` / ``Conv1D`` again, index-aligned with the base model. Unstructured exports never
shrink, even where a channel happens to be all zeros, so they always load with a plain
``from_pretrained`` (unless stored compressed).

With ``weight_format="compressed"`` the weights are stored as a bitmask and the non-zero values
per sparse tensor (:mod:`sparseft.export.compressed`); the directory then loads with
``from_pretrained(path, trust_remote_code=True)`` or ``sparseft.load_compressed(path)``.

The directory is written whole or not at all: into a fresh ``.<name>.partial-*`` directory
beside it, renamed into place at the end (:func:`staged_directory`); a failure midway removes
the partial directory and leaves the target as it was. A non-empty target is refused unless
``overwrite`` (then the old one is moved aside, replaced, and deleted), and so are an empty name
(it would mean the current directory) and a target that is or holds the current directory or a
path to keep (the checkpoint being exported).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from sparseft.export.compressed import (
    add_compressed_code_,
    check_compressible,
    check_weight_format,
    compress_saved_weights_,
)
from sparseft.export.model_card import model_card
from sparseft.export.report import build_report
from sparseft.export.shrink import add_remote_code_, shrink_
from sparseft.sparse.measure import count_parameters, linear_flops_per_token
from sparseft.sparse.parametrize import merge_, sparse_layers
from sparseft.sparse.slices import restore_linear_

REPORT_FILE = "report.json"
MODEL_CARD_FILE = "README.md"
STRUCTURED_UNITS = ("counts: heads removed per block (their indices), FFN channels removed per block; "
                    "total_parameters and linear_flops_per_token of the shrunk model, in the units above")


def export_pretrained(
    model: nn.Module, output_dir: str | Path, tokenizer: Any = None, extra: dict[str, Any] | None = None,
    shrink: bool = False, weight_format: str = "dense", overwrite: bool = False,
) -> dict[str, Any]:
    """Merge ``model`` in place, save it (and the tokenizer) to ``output_dir``, write the report.

    Args:
        model: a Hugging Face ``PreTrainedModel``, sparsified or not.
        output_dir: a new or empty directory (created, whole or not at all).
        tokenizer: saved beside the model when given.
        extra: more fields for ``report.json`` (strategy name and settings, for example; ``backbone``,
            ``task_type``, ``data``, ``training_steps`` and ``dev_metric`` also go into the model card).
        shrink: physically remove all-zero heads and FFN channels (in place); for structured
            pruning (see ``SparsityStrategy.structured``).
        weight_format: ``dense`` (a plain ``model.safetensors``) or ``compressed`` (bitmask and
            non-zero values per sparse tensor; not with ``shrink``).
        overwrite: replace a non-empty ``output_dir``.

    Returns:
        The report that was written; ``structured`` describes what shrinking removed, and
        ``trainable_parameters`` what fine-tuning trained (counted before merging), and
        ``weights`` the compressed file's size next to the dense one's.
    """
    check_weight_format(weight_format, shrink)
    target = check_export_target(output_dir, overwrite)
    trained, _ = count_parameters(model)  # merging folds the trained factors into frozen weights
    target_names = [layer.name for layer in sparse_layers(model)]
    target_names += restore_linear_(model)  # S²FT slice layers: merged, original module types back
    merge_(model)
    if weight_format == "compressed":
        check_compressible(model, target_names)
    report = {**(extra or {}), **build_report(model, target_names, trained)}
    with staged_directory(target) as staging:
        if shrink:
            report["structured"] = _shrink_for_export_(model, staging)
            report["units"] = {**report["units"], "structured": STRUCTURED_UNITS}
        if weight_format == "compressed":
            add_compressed_code_(model, staging)
        model.save_pretrained(staging)
        if weight_format == "compressed":
            report["weights"] = compress_saved_weights_(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2))
        (staging / MODEL_CARD_FILE).write_text(model_card(report, str(output_dir), class_names(model)))
        make_readable_(staging)
    return report


def check_export_target(output_dir: str | Path, overwrite: bool = False, keep: Iterable[str | Path] = (),
                        option: str = "output_dir") -> Path:
    """The resolved directory to export to, after refusing targets that would lose or mix data.

    Args:
        output_dir: the directory as the user named it.
        overwrite: whether a non-empty directory may be replaced.
        keep: paths that must survive (the checkpoint being exported): refused inside a replaced target.
        option: the option that named it, for the messages (``output_dir``, ``adapter_path``).
    """
    if not str(output_dir).strip():
        raise ValueError(f"{option} is empty (it would be the current directory): name the directory to export to")
    target = Path(output_dir).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{option} {output_dir} is a file: name a directory to export to")
    for path in (Path.cwd(), *keep):
        if Path(path).resolve().is_relative_to(target):
            raise ValueError(f"{option} {output_dir} holds {path}, which the export would replace: name a new "
                             "directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{option} {output_dir} is not empty: choose a new directory, or pass --overwrite "
                              "to replace it")
    return target


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A new directory beside ``target`` to write into, renamed to ``target`` when the block ends.

    On an exception it is removed and ``target`` is untouched. A non-empty ``target`` is moved
    aside first and deleted once the new one is in place.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = target.with_name(f".{target.name}.partial-{tag}")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replaced = target.with_name(f".{target.name}.replaced-{tag}") if target.exists() else None
    if replaced is not None:
        target.rename(replaced)
    staging.rename(target)
    if replaced is not None:
        shutil.rmtree(replaced)


def class_names(model: nn.Module) -> list[str] | None:
    """The classes' names in id order from the config's ``id2label``; None when they are only
    transformers' placeholders (``LABEL_0``, ...) or the model is not a classifier."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = [id2label[index] for index in sorted(id2label, key=int)]
    return None if all(re.fullmatch(r"LABEL_\d+", str(name)) for name in names) else names


def make_readable_(target: Path) -> None:
    """Add the read permissions (and, on folders, traversal) that the user's umask grants to
    ``target``, a file or a folder and everything under it, removing none: transformers writes the
    weights, and safetensors' ``save_file`` any file, through a temporary file of mode 0600, which
    other users (a serving account) could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [target, *(target.rglob("*") if target.is_dir() else ())]:
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

"""Make pruning permanent and save a plain Hugging Face model directory.

The saved directory loads with ``AutoModel*.from_pretrained`` and needs no sparseft import:
every ``M ⊙ (W0 + ΔW)`` is merged into an ordinary weight (exact zeros where pruned), and
``report.json`` beside it records the measured sparsity, parameters and FLOPs.

With ``shrink=True`` (what ``sparseft export`` passes for a strategy that prunes whole heads or
FFN channels), units whose weights are all zero after merging are then removed physically
(:func:`sparseft.sparse.shrink.shrink_`): the saved model is smaller. When the config cannot
express the new shapes (heads of BERT, RoBERTa, GPT-2), the directory also holds
``modeling_sparseft.py`` and loads with ``from_pretrained(path, trust_remote_code=True)``.
S²FT's slice layers (:mod:`sparseft.sparse.slices`) are merged too and become their original
``nn.Linear`` / ``Conv1D`` again, index-aligned with the base model. Unstructured exports never
shrink, even where a channel happens to be all zeros, so they always load with a plain
``from_pretrained`` (unless stored compressed).

With ``weight_format="compressed"`` the weights are stored as a bitmask and the non-zero values
per sparse tensor (:mod:`sparseft.sparse.compressed`); the directory then loads with
``from_pretrained(path, trust_remote_code=True)`` or ``sparseft.load_compressed(path)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from sparseft.sparse.compressed import add_compressed_code_, check_weight_format, compress_saved_weights_
from sparseft.sparse.parametrize import merge_, sparse_layers
from sparseft.sparse.report import build_report, count_parameters, linear_flops_per_token
from sparseft.sparse.shrink import add_remote_code_, shrink_
from sparseft.sparse.slices import restore_linear_

REPORT_FILE = "report.json"


def export_pretrained(
    model: nn.Module, output_dir: str | Path, tokenizer: Any = None, extra: dict[str, Any] | None = None,
    shrink: bool = False, weight_format: str = "dense",
) -> dict[str, Any]:
    """Merge ``model`` in place, save it (and the tokenizer) to ``output_dir``, write the report.

    Args:
        model: a Hugging Face ``PreTrainedModel``, sparsified or not.
        output_dir: created if missing.
        tokenizer: saved beside the model when given.
        extra: more fields for ``report.json`` (strategy name and settings, for example).
        shrink: physically remove all-zero heads and FFN channels (in place); for structured
            pruning (see ``SparsityStrategy.structured``).
        weight_format: ``dense`` (a plain ``model.safetensors``) or ``compressed`` (bitmask and
            non-zero values per sparse tensor; not with ``shrink``).

    Returns:
        The report that was written; ``structured`` describes what shrinking removed, and
        ``trainable_parameters`` what fine-tuning trained (counted before merging), and
        ``weights`` the compressed file's size next to the dense one's.
    """
    check_weight_format(weight_format, shrink)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trained, _ = count_parameters(model)  # merging folds the trained factors into frozen weights
    target_names = [layer.name for layer in sparse_layers(model)]
    target_names += restore_linear_(model)  # S²FT slice layers: merged, original module types back
    merge_(model)
    report = {**(extra or {}), **build_report(model, target_names, trained)}
    if shrink:
        report["structured"] = _shrink_for_export_(model, output_dir)
    if weight_format == "compressed":
        add_compressed_code_(model, output_dir)
    model.save_pretrained(output_dir)
    if weight_format == "compressed":
        report["weights"] = compress_saved_weights_(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


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

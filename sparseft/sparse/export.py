"""Make pruning permanent and save a plain Hugging Face model directory.

The saved directory loads with ``AutoModel*.from_pretrained`` and needs no sparseft import:
every ``M ⊙ (W0 + ΔW)`` is merged into an ordinary weight (exact zeros where pruned), and
``report.json`` beside it records the measured sparsity, parameters and FLOPs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from sparseft.sparse.parametrize import merge_, sparse_layers
from sparseft.sparse.report import build_report

REPORT_FILE = "report.json"


def export_pretrained(
    model: nn.Module, output_dir: str | Path, tokenizer: Any = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Merge ``model`` in place, save it (and the tokenizer) to ``output_dir``, write the report.

    Args:
        model: a Hugging Face ``PreTrainedModel``, sparsified or not.
        output_dir: created if missing.
        tokenizer: saved beside the model when given.
        extra: more fields for ``report.json`` (strategy name and settings, for example).

    Returns:
        The report that was written.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target_names = [layer.name for layer in sparse_layers(model)]
    merge_(model)
    report = {**(extra or {}), **build_report(model, target_names)}
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report

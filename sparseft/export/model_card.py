"""The model card (README.md) of an exported model, written from its report.json.

It says what a reader of a model hub page asks first: what the model was fine-tuned from and on,
how (the strategy and its settings), how sparse it measured, how long it trained, how well it
scored on the dev set, and how to load it.
"""

from __future__ import annotations

import json
from typing import Any

#: ``transformers`` class and pipeline task for each sparseft task type
LOADERS = {
    "sequence-classification": ("AutoModelForSequenceClassification", "text-classification"),
    "question-answering": ("AutoModelForQuestionAnswering", "question-answering"),
    "causal-lm": ("AutoModelForCausalLM", "text-generation"),
}


def _facts(report: dict[str, Any], labels: list[str]) -> list[tuple[str, str]]:
    """``(what, value)`` rows for the card's table; what the report does not know is left out."""
    rows = []
    if report.get("backbone"):
        rows.append(("fine-tuned from", f"`{report['backbone']}`"))
    data = report.get("data") or {}
    if data:
        rows.append(("data", ", ".join(f"{key} `{value}`" for key, value in data.items() if value is not None)))
    strategy = report.get("strategy")
    if strategy:
        rows.append(("sparsity strategy", f"{strategy['name']} (`{strategy['class_path']}`)"))
        settings = ", ".join(f"{key}={json.dumps(value)}" for key, value in strategy.get("init_args", {}).items())
        rows.append(("strategy settings", f"`{settings}`" if settings else "defaults"))
    else:
        rows.append(("sparsity strategy", "none (dense fine-tuning)"))
    rows.append(("measured sparsity of the targets",
                 f"{report['target_sparsity']:.2%} of {report['target_weights']:,} weights are zero"))
    rows.append(("parameters", f"{report['total_parameters']:,} ({report['trainable_parameters']:,} trained)"))
    flops = report["linear_flops_per_token"]
    rows.append(("linear-layer FLOPs per token", f"{flops['sparse']:,} with zeros skipped, {flops['dense']:,} dense"))
    if labels:
        rows.append(("labels", ", ".join(f"{index} `{label}`" for index, label in enumerate(labels))))
    if report.get("training_steps") is not None:
        rows.append(("training", f"{report['training_steps']:,} optimizer steps"))
    dev = report.get("dev_metric")
    if dev:
        rows.append(("dev metric", f"{dev['name']} = {dev['value']:.4f} (measured after step {dev['step']:,})"))
    elif "dev_metric" in report:
        rows.append(("dev metric", "not measured: no validation ran before this checkpoint"))
    return rows


def _load_example(report: dict[str, Any], location: str) -> str:
    """Python that loads the export: with ``trust_remote_code=True`` where its weights need sparseft's
    remote code (a shrunk model transformers' config cannot describe, or compressed weights)."""
    model_class, pipeline_task = LOADERS.get(report.get("task_type") or "", ("AutoModel", None))
    remote = any("trust_remote_code=True" in (report.get(key) or {}).get("load_with", "")
                 for key in ("structured", "weights"))
    options = ", trust_remote_code=True" if remote else ""
    lines = [
        f"from transformers import AutoTokenizer, {model_class}" + (", pipeline" if pipeline_task else ""),
        "",
        f'model = {model_class}.from_pretrained("{location}"{options})',
        f'tokenizer = AutoTokenizer.from_pretrained("{location}")',
    ]
    if pipeline_task:
        lines.append(f'predict = pipeline("{pipeline_task}", model=model, tokenizer=tokenizer)')
    return "\n".join(lines)


def model_card(report: dict[str, Any], location: str, labels: list[str] | None = None) -> str:
    """Markdown for the README.md of an export at ``location`` described by ``report``, whose classes
    are called ``labels`` (in id order; None: not a classifier, or unnamed)."""
    name = (report.get("strategy") or {}).get("name", "dense")
    title = f"{report.get('backbone') or 'model'}, fine-tuned with {name} sparsity (sparseft)"
    table = "\n".join(f"| {what} | {value} |" for what, value in _facts(report, labels or []))
    sections = [
        f"# {title}",
        "Exported by `sparseft export`: every sparse weight is merged into a plain weight (exact zeros where "
        "pruned), so the model needs no sparseft to load. `report.json` beside this file has the measured "
        "sparsity of every layer, with units.",
        f"| | |\n|---|---|\n{table}",
        f"## Load it\n\n```python\n{_load_example(report, location)}\n```",
    ]
    return "\n\n".join(sections) + "\n"

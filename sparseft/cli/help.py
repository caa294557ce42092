"""What ``sparseft``, ``sparseft --help`` and ``sparseft --version`` print: every command, one line each.

LightningCLI's own help knows only its four trainer commands; the others (``export``,
``strategies``, ``targets``, ``report``) are dispatched by :func:`sparseft.cli.main` before it.
"""

from __future__ import annotations

COMMANDS = {
    "fit": "train a model with a sparsity strategy (LightningCLI: --config, --model, --data, --sparsity, --trainer)",
    "validate": "score a checkpoint on the dev set (--ckpt_path); metrics.json beside its checkpoints/",
    "test": "score a checkpoint on the test split (GLUE: the dev sets, its test labels are hidden)",
    "predict": "write a checkpoint's predictions in the task's submission format, beside its checkpoints/",
    "export": "merge a checkpoint into a plain Hugging Face model directory with report.json",
    "strategies": "list the registered sparsity strategies",
    "targets": "dry run: list the layers a config's strategy would sparsify",
    "report": "per-layer sparsity table and plots of a checkpoint or an exported directory",
}

HELP_FLAGS = ("-h", "--help")
VERSION_FLAGS = ("-V", "--version")


def usage() -> str:
    """The top-level help: the commands, one line each, and where each one's options are."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, summary in COMMANDS.items()]
    return "\n".join([
        "usage: sparseft <command> [options]",
        "",
        "Sparse fine-tuning of pre-trained language models with PyTorch Lightning.",
        "",
        "commands:",
        *lines,
        "",
        "sparseft <command> --help shows a command's options; sparseft --version its version.",
    ])

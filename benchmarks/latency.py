"""CPU inference latency of exported model directories, side by side, and their dev accuracy.

Each directory is what ``sparseft export`` (or ``compare.py --export_dir``) wrote; it is
loaded with ``AutoModelForSequenceClassification.from_pretrained`` (with
``trust_remote_code=True`` when its config maps auto classes to remote code: heads removed
from a BERT-style model, or weights stored ``--format compressed``). All models run in this
one process on the same batches;
timing rounds visit the models in a new random order each round, and the median round is
reported, with the ratio to the first directory (give the dense model first)::

    python benchmarks/latency.py --task sst2 --data_dir ../shared/data/glue/SST-2 --threads 1 \\
        exports/dense exports/dsee_heads ...
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification


def load_exported(path: Path) -> torch.nn.Module:
    remote = bool(getattr(AutoConfig.from_pretrained(path), "auto_map", None))  # shrunk or compressed exports
    return AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=remote).eval()


def dev_batches(args: argparse.Namespace, tokenizer_dir: Path) -> list[dict[str, torch.Tensor]]:
    from sparseft.datamodules import GLUEDataModule

    data = GLUEDataModule(task=args.task, tokenizer=str(tokenizer_dir), data_dir=args.data_dir,
                          max_length=args.max_length, eval_batch_size=args.batch_size)
    data.setup("validate")
    loader = data.val_dataloader()
    return list(loader[0] if isinstance(loader, list) else loader)


@torch.inference_mode()
def accuracy(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    correct = total = 0
    for batch in batches:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        predictions = model(**inputs).logits.argmax(-1)
        correct += int((predictions == batch["labels"]).sum())
        total += batch["labels"].numel()
    return correct / total


@torch.inference_mode()
def time_once(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    start = time.perf_counter()
    for batch in batches:
        model(**{key: value for key, value in batch.items() if key != "labels"})
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    paths = [Path(p) for p in args.dirs]
    models = {path: load_exported(path) for path in paths}
    batches = dev_batches(args, paths[0])
    timed = batches[: args.timed_batches]
    results = {path: {"dir": str(path), "dev_accuracy": accuracy(model, batches), "seconds": []}
               for path, model in models.items()}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(paths)
        rng.shuffle(order)
        for path in order:
            results[path]["seconds"].append(time_once(models[path], timed))
    for path, result in results.items():
        report = json.loads((path / "report.json").read_text()) if (path / "report.json").exists() else {}
        structured = report.get("structured", {})
        result.update(
            parameters=sum(p.numel() for p in models[path].parameters()),
            linear_flops_per_token=structured.get("linear_flops_per_token"),
            sparse_linear_flops_per_token=report.get("linear_flops_per_token", {}).get("sparse"),
            median_s=statistics.median(result["seconds"]),
            examples=sum(batch["labels"].numel() for batch in timed),
        )
    first = results[paths[0]]["median_s"]
    for result in results.values():
        result["latency_vs_first"] = result["median_s"] / first
    return list(results.values())


def format_table(results: list[dict[str, Any]]) -> str:
    header = ["model dir", "dev acc", "parameters", "linear MFLOPs/token (dense kernel)",
              "linear MFLOPs/token (zeros skipped)", "median s", "ms/example", "latency/first"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        flops = r["linear_flops_per_token"]
        sparse = r["sparse_linear_flops_per_token"]
        rows.append("| " + " | ".join([
            f"`{Path(r['dir']).name}`", f"{r['dev_accuracy']:.4f}", f"{r['parameters']:,}",
            f"{flops / 1e6:.2f}" if flops else "-", f"{sparse / 1e6:.2f}" if sparse else "-",
            f"{r['median_s']:.3f}", f"{1000 * r['median_s'] / r['examples']:.2f}", f"{r['latency_vs_first']:.2f}",
        ]) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="exported model directories; the first is the reference")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--timed_batches", type=int, default=4, help="dev batches per timing round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = measure(args)
    print(format_table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=2))


if __name__ == "__main__":
    main()

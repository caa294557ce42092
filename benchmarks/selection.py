"""Exact per-matrix top-k: the reference's argsort against the selections sparseft could use.

Every method must give the same keep-mask as sparseft's ``keep_highest`` (checked before
timing); times are medians over ``--rounds`` calls on one score matrix of each shape, all on
the CPU with ``--threads`` threads. Example (the numbers in RESULTS.md come from it)::

    python benchmarks/selection.py --threads 2 --rounds 30
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from sparseft.sparse.masks import keep_highest, pruned_count

# (name, [out, in]) of the target matrices of all-MiniLM-L6-v2 and BERT-base
SHAPES = {"MiniLM attention": (384, 384), "MiniLM FFN": (1536, 384), "BERT-base attention": (768, 768),
          "BERT-base FFN": (3072, 768)}


def by_argsort(scores: torch.Tensor, pruned: int) -> torch.Tensor:
    """The reference implementations' way: argsort the flattened scores, drop the first ``pruned``."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.argsort(scores.flatten(), stable=True)[:pruned]] = False
    return keep.view_as(scores)


def by_kthvalue(scores: torch.Tensor, pruned: int) -> torch.Tensor:
    """``torch.kthvalue`` on the whole matrix, then one comparison (no ties in these scores)."""
    return scores > scores.flatten().kthvalue(pruned).values


def by_topk(scores: torch.Tensor, pruned: int) -> torch.Tensor:
    """``torch.topk`` of the kept entries, scattered into a mask."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[torch.topk(scores.flatten(), scores.numel() - pruned, sorted=False).indices] = True
    return keep.view_as(scores)


METHODS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "argsort (reference)": by_argsort, "torch.kthvalue": by_kthvalue, "torch.topk": by_topk,
    "sparseft keep_highest": keep_highest,
}


def median_ms(function: Callable[[], object], rounds: int) -> float:
    function()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    print("| matrix | " + " | ".join(f"{name} ms" for name in METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    for label, shape in SHAPES.items():
        # a PST-like score: |W| of a pre-trained-like weight plus a small low-rank term
        weight = torch.randn(shape, generator=generator) * 0.05
        scores = weight.abs() + 1e-3 * torch.randn(shape[0], 8, generator=generator) @ torch.randn(
            8, shape[1], generator=generator)
        pruned = pruned_count(scores.numel(), args.sparsity)
        expected = keep_highest(scores, pruned)
        cells = []
        for name, method in METHODS.items():
            if not torch.equal(method(scores, pruned), expected):
                raise AssertionError(f"{name} gives a different mask on {label}")
            call = functools.partial(method, scores, pruned)
            cells.append(f"{median_ms(call, args.rounds):.2f}")
        print(f"| {label} {shape[0]}×{shape[1]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

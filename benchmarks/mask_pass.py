"""The in-place masking pass (``g ← where(keep, g, 0)``, run on every gradient before every optimizer step
while masks are held in the weights) on one CPU thread: the ways to compute it, in ns per entry.

Every variant runs in every round (interleaved: a noisy machine's drift lands on all of them), on
MiniLM-L6's matrix shapes at each sparsity, an unstructured random mask; the median over rounds. A
variant marked ``*`` does not give ``where``'s result bit for bit (checked on values with NaN, ±inf,
±0.0: ``g * keep`` gives -0.0 for a negative entry and NaN for inf). Then the whole pass over the 36
target matrices of MiniLM-L6 (6 layers of 4 × 384×384 and 384×1536, 1536×384), out of cache, in ms.
Example::

    python benchmarks/mask_pass.py --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from sparseft.sparse.inplace import zero_pruned_

Pass = Callable[[torch.Tensor], object]
SHAPES = [(384, 384), (1536, 384)]


def sample(shape: tuple[int, int], sparsity: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A normal gradient and a keep-mask with exactly ``round(sparsity × entries)`` pruned at random."""
    generator = torch.Generator().manual_seed(seed)
    entries = shape[0] * shape[1]
    keep = torch.ones(entries, dtype=torch.bool)
    keep[torch.randperm(entries, generator=generator)[: round(sparsity * entries)]] = False
    return torch.randn(shape, generator=generator), keep.view(shape)


def scatter_kept_back_(grad: torch.Tensor, kept: torch.Tensor) -> None:
    flat = grad.view(-1)
    values = flat.index_select(0, kept)
    flat.zero_()
    flat.index_copy_(0, kept, values)


def variants(keep: torch.Tensor) -> dict[str, tuple[str, Pass]]:
    """Name → (extra bytes cached per weight, the pass on a gradient in place)."""
    flat, pruned = keep.view(-1), ~keep
    kept64, pruned64 = flat.nonzero().view(-1), pruned.view(-1).nonzero().view(-1)
    kept32, zero = kept64.int(), torch.zeros(())
    all_ones = keep.to(torch.int32).neg_()
    kept_share = kept64.numel() / flat.numel()
    return {
        "where(keep, g, new_zeros(())) (main)": ("0", lambda g: torch.where(keep, g, g.new_zeros(()), out=g)),
        "where(keep, g, cached 0-d zero)": ("0", lambda g: torch.where(keep, g, zero, out=g)),
        "masked_fill_(cached ~keep, 0)": ("1", lambda g: g.masked_fill_(pruned, 0.0)),
        "g.mul_(keep)": ("0", lambda g: g.mul_(keep)),
        "g.view(int32).mul_(keep) = zero_pruned_": ("0", lambda g: zero_pruned_(g, keep)),
        "g.view(int32).bitwise_and_(cached 0/-1 int32)": ("4", lambda g: g.view(torch.int32).bitwise_and_(all_ones)),
        "kept int64: index_select, zero_, index_copy_": (f"{8 * kept_share:.1f}",
                                                         lambda g: scatter_kept_back_(g, kept64)),
        "kept int32: g[i], zero_, index_put_": (f"{4 * kept_share:.1f}",
                                                lambda g: g.view(-1).index_put_((kept32,), _zeroed(g, kept32))),
        "pruned int64: index_fill_": (f"{8 * (1 - kept_share):.1f}",
                                      lambda g: g.view(-1).index_fill_(0, pruned64, 0.0)),
    }


def _zeroed(grad: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    values = grad.view(-1)[kept]
    grad.zero_()
    return values


def bitwise_as_where(shape: tuple[int, int], sparsity: float) -> dict[str, bool]:
    grad, keep = sample(shape, sparsity, seed=1)
    grad.view(-1)[:50] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0] * 10)
    expected = torch.where(keep, grad, torch.zeros(()))
    same = {}
    for name, (_, run) in variants(keep).items():
        result = grad.clone()
        run(result)
        same[name] = torch.equal(result.view(torch.int32), expected.view(torch.int32))
    return same


def ns_per_entry(shape: tuple[int, int], sparsity: float, rounds: int, calls: int) -> dict[str, float]:
    grad, keep = sample(shape, sparsity)
    passes = variants(keep)
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(rounds):
        for name, (_, run) in passes.items():
            target = grad.clone()
            run(target)
            start = time.perf_counter()
            for _ in range(calls):
                run(target)
            times[name].append((time.perf_counter() - start) / calls / grad.numel() * 1e9)
    return {name: statistics.median(values) for name, values in times.items()}


def whole_pass_ms(sparsity: float, rounds: int) -> dict[str, float]:
    shapes = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]
    pairs = [sample(shape, sparsity, seed=i) for i, shape in enumerate(shapes * 6)]
    runs = {"where (main)": lambda g, k: torch.where(k, g, g.new_zeros(()), out=g), "zero_pruned_": zero_pruned_}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for grad, keep in pairs:
                run(grad, keep)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=40, help="calls timed together in each round")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.9])
    args = parser.parse_args()
    torch.set_num_threads(1)
    columns = [(shape, sparsity) for shape in SHAPES for sparsity in args.sparsities]
    same = {column: bitwise_as_where(*column) for column in columns}
    timed = {column: ns_per_entry(*column, args.rounds, args.calls) for column in columns}
    cached = [variants(sample(SHAPES[0], sparsity)[1]) for sparsity in args.sparsities]
    memory = {name: "/".join(dict.fromkeys(each[name][0] for each in cached)) for name in cached[0]}
    print(f"ns per entry, 1 thread, median of {args.rounds} interleaved rounds of {args.calls} calls; * not bitwise "
          f"where's; B/weight: bytes cached per weight (at each sparsity where they differ)")
    print(f"{'variant':48s}{'B/weight':>10s}" + "".join(f"{f'{r}x{c} @{s}':>15s}" for (r, c), s in columns))
    for name in timed[columns[0]]:
        cells = "".join(f"{timed[c][name]:>14.3f}{' ' if same[c][name] else '*'}" for c in columns)
        print(f"{name:48s}{memory[name]:>10s}{cells}")
    for sparsity in args.sparsities:
        ms = whole_pass_ms(sparsity, args.rounds)
        print(f"MiniLM-L6's 36 matrices at sparsity {sparsity}: " + ", ".join(f"{n} {v:.2f} ms" for n, v in ms.items()))


if __name__ == "__main__":
    main()

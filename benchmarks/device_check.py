"""Everything only a GPU can measure, in one run of at most 8 minutes on one H100 (issue 21, item 5).

Four parts, each in a process of its own with a time budget (a part that fails or runs out of
time records its error, and the run goes on):

* ``smollm2``: S²FT / LoRA (the ``lora`` strategy) / full fine-tuning (and HF PEFT's LoRA when
  ``peft`` is installed) on SmolLM2-135M in bfloat16 at sequence 1024: peak memory
  (``torch.cuda.max_memory_allocated``) and interleaved median step time, measured by
  ``s2ft_memory.py``'s own functions. The weights are the real ones when the GGUF package's
  converted directory is cached already; otherwise random ones of the same ``LlamaConfig``
  (the same memory and time: nothing here depends on the values);
* ``two_four``: dense vs ``to_sparse_semi_structured`` matmuls at BERT-base and LLaMA-7B linear
  shapes, and ``semi_structured_latency.py``'s model table on a random BERT-base pruned to 2:4;
* ``bert``: step time and peak memory of PST, movement, magnitude and DSEE vs dense fine-tuning
  on a random BERT-base (batch 32 x 128, bf16 autocast), steps interleaved as in
  ``interleaved_steps.py`` (its ``build`` and ``timed_step``). The models share the GPU, so a
  method's peak is its own state (weights, buffers, optimizer state) plus the most its step
  allocated above what was resident before it;
* ``fsdp2``: a Lightning ``Trainer`` with ``strategy="fsdp2", devices=1`` fits a tiny BERT with
  magnitude pruning for a few steps (bf16-mixed): its exit code and wall time.

Writes ``device_check.json`` and ``device_check.md`` to ``--out``::

    python benchmarks/device_check.py --out $OUT

``--dry_run`` runs every part on the CPU at toy sizes in under a minute (what needs CUDA, the
semi-structured kernels, is recorded as skipped); ``tests/test_benchmarks.py`` runs it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

#: seconds per part on the GPU (8 minutes in all, process start-ups included) and in the dry run
BUDGETS = {"smollm2": 170, "two_four": 100, "bert": 120, "fsdp2": 60}
DRY_RUN_BUDGET = 120  # all parts in one process; they take about 30 s on 2 busy cores
SMOLLM2 = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
               max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2, pad_token_id=2)
BERT_BASE = dict(model_type="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, vocab_size=30522, max_position_embeddings=512)
#: (out, in) of the linears: BERT-base's attention, FFN in, FFN out; LLaMA-7B's attention, FFN in, FFN out
MATMUL_SHAPES = [(768, 768), (3072, 768), (768, 3072), (4096, 4096), (11008, 4096), (4096, 11008)]
STRATEGY_SPARSITY = {"pst": 0.9, "movement": 0.9, "magnitude": 0.9, "dsee": 0.5}
MB = 2**20


def smollm2_dir(work: Path, dry_run: bool) -> tuple[Path, str]:
    """The model directory part ``smollm2`` trains, and what its weights are."""
    from sparseft.backbones.loading import load_backbone
    from sparseft.testing import make_tiny_model_dir

    if dry_run:
        return make_tiny_model_dir(work / "llama", "llama", task="causal-lm"), "random tiny LLaMA (dry run)"
    try:  # the real weights only if converted already: converting the GGUF would take minutes
        from s2ft_memory import BACKBONE

        from sparseft.backbones.gguf import cache_path
        from sparseft.backbones.loading import locate_gguf

        cached = cache_path(locate_gguf(BACKBONE))
        if (cached / "config.json").is_file():
            return cached, f"SmolLM2-135M-Instruct ({cached.name})"
    except (ImportError, ValueError, FileNotFoundError):
        pass
    load_backbone("causal-lm", config=SMOLLM2).save_pretrained(work / "smollm2")
    return work / "smollm2", "random, SmolLM2-135M's LlamaConfig (no converted GGUF cached)"


def part_smollm2(args: argparse.Namespace, work: Path, deadline: float) -> dict[str, Any]:
    """S²FT / LoRA / full (/ PEFT) memory one method at a time, then their interleaved step times."""
    import importlib.util

    import s2ft_memory

    directory, weights = smollm2_dir(work, args.dry_run)
    size = ["--batch_size", "2", "--seq_len", "8", "--steps", "2", "--warmup", "1", "--lora_rank", "2",
            "--head_ratio", "0.25", "--channel_ratio", "0.1"] if args.dry_run else [
            "--batch_size", str(args.batch_size), "--seq_len", "1024", "--steps", "10", "--warmup", "2"]
    options = s2ft_memory.parse_args(["--backbone", str(directory), "--dtype", "bfloat16", "--device", args.device,
                                      *size])
    if importlib.util.find_spec("peft") is None:
        options.methods = [method for method in options.methods if method != "peft"]
    memory = []
    for method in options.methods:
        memory.append(s2ft_memory.memory_run(method, options))
        release()
    timed = args.dry_run or time.monotonic() < deadline
    timing = s2ft_memory.timing_run(options) if timed else {}
    return {"weights": weights, "timing_note": None if timed else "skipped: the memory runs used the part's time",
            "batch_size": options.batch_size, "seq_len": options.seq_len, "dtype": "bfloat16",
            "memory": memory, "timing": timing, "table": s2ft_memory.format_table(memory, timing)}


def release() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def part_two_four(args: argparse.Namespace, work: Path, deadline: float) -> dict[str, Any]:
    """The matmul table (CUDA only) and the model table (on the CPU: the dense fallback, no speed-up)."""
    import semi_structured_latency

    from sparseft.backbones.loading import load_backbone
    from sparseft.testing import tiny_config

    result: dict[str, Any] = {}
    if args.dry_run:
        result["matmuls"] = "skipped: needs CUDA"
    else:
        result["matmuls"] = [semi_structured_latency.time_matmul(out, inp, 32 * 128, deadline=deadline)
                             for out, inp in MATMUL_SHAPES]
    config = tiny_config("bert") if args.dry_run else BERT_BASE
    load_backbone("sequence-classification", config=config, num_labels=2).save_pretrained(work / "bert")
    flags = ["--batch_sizes", "1", "2", "--seq_len", "8", "--rounds", "2", "--dense_fallback"] if args.dry_run else []
    model = semi_structured_latency.main([str(work / "bert"), "--prune", *flags])
    result["model"] = {"model": "random BERT" + ("" if args.dry_run else "-base"), **model}
    matmuls = result["matmuls"]
    matmuls = semi_structured_latency.matmul_table(matmuls) if isinstance(matmuls, list) else f"matmuls: {matmuls}"
    tables = [matmuls, semi_structured_latency.format_table(model)]
    return {**result, "table": "\n\n".join(tables)}


def part_bert(args: argparse.Namespace, work: Path, deadline: float) -> dict[str, Any]:
    """Dense and each strategy on one random BERT, one step of each in turn, rotating the order."""
    from interleaved_steps import build, timed_step

    from sparseft.testing import tiny_config

    config = tiny_config("bert") if args.dry_run else BERT_BASE
    batch_size, seq_len, steps = (4, 8, 2) if args.dry_run else (32, 128, 20)
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, config["vocab_size"], (batch_size, seq_len), generator=generator),
             "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
             "labels": torch.randint(0, 2, (batch_size,), generator=generator)}
    batch = {key: value.to(args.device) for key, value in batch.items()}
    torch.manual_seed(0)
    runs = {"dense": (build(None, 0.0, 2, 1e-4, config, args.device), 0.0)}
    for name, sparsity in STRATEGY_SPARSITY.items():
        runs[name] = (build(name, sparsity, 2, 1e-4, config, args.device), sparsity)
    cuda = args.device.startswith("cuda")
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=cuda)
    times: dict[str, list[float]] = {name: [] for name in runs}
    above: dict[str, int] = dict.fromkeys(runs, 0)
    names = list(runs)
    for round_ in range(steps + 2):  # two warm-up rounds: the Adam state, the kernels
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            resident = step_memory_start(cuda)
            with autocast:
                seconds = timed_step(*runs[name][0], batch, runs[name][1])
            if round_ >= 2:
                times[name].append(seconds)
                above[name] = max(above[name], torch.cuda.max_memory_allocated() - resident if cuda else 0)
        if round_ >= 3 and time.monotonic() > deadline:
            break
    rows = [bert_row(name, runs[name][0], times[name], times["dense"], above[name] if cuda else None)
            for name in runs]
    return {"config": {k: config[k] for k in ("hidden_size", "num_hidden_layers")}, "batch": [batch_size, seq_len],
            "precision": "bf16 autocast" if cuda else "float32", "rows": rows, "table": bert_table(rows)}


def step_memory_start(cuda: bool) -> int:
    if not cuda:
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def bert_row(name: str, run: tuple[Any, Any, Any], times: list[float], dense: list[float], above: int | None
             ) -> dict[str, Any]:
    module, strategy, optimizer = run
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    own = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers(), *state])
    return {"method": name, "median_step_s": statistics.median(times),
            "step_vs_dense": statistics.median(t / d for t, d in zip(times, dense)),
            "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "state_mb": own / MB, "peak_mb": None if above is None else (own + above) / MB}


def bert_table(rows: list[dict[str, Any]]) -> str:
    dense = rows[0]
    lines = ["| method | trainable | step ms | step/dense | state MB | peak MB | peak/dense |", "|---" * 7 + "|"]
    for r in rows:
        peak = "–" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        ratio = "–" if r["peak_mb"] is None else f"{r['peak_mb'] / dense['peak_mb']:.2f}"
        lines.append(f"| {r['method']} | {r['trainable']:,} | {1000 * r['median_step_s']:.1f} | "
                     f"{r['step_vs_dense']:.2f} | {r['state_mb']:.1f} | {peak} | {ratio} |")
    return "\n".join(lines)


def part_fsdp2(args: argparse.Namespace, work: Path, deadline: float) -> dict[str, Any]:
    """A few FSDP2 steps on one device; raises (a non-zero exit) when they fail."""
    from lightning.pytorch import Trainer

    from sparseft.strategies import Magnitude
    from sparseft.testing import SyntheticClassificationData, tiny_config
    from sparseft.training.module import SparseFTModule

    cuda = args.device.startswith("cuda")
    torch.manual_seed(0)
    module = SparseFTModule(config=tiny_config("bert"), num_labels=2, learning_rate=1e-3)
    trainer = Trainer(strategy="fsdp2", accelerator="cuda" if cuda else "cpu", devices=1, max_steps=4,
                      precision="bf16-mixed" if cuda else "32-true", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, default_root_dir=work / "fsdp2",
                      callbacks=[Magnitude(sparsity=0.5, log_layers=False)])
    trainer.fit(module, SyntheticClassificationData(size=32))
    return {"global_step": trainer.global_step, "strategy": type(trainer.strategy).__name__,
            "table": f"FSDP2 on 1 {'GPU' if cuda else 'CPU process'}: {trainer.global_step} steps"}


PARTS = {"smollm2": part_smollm2, "two_four": part_two_four, "bert": part_bert, "fsdp2": part_fsdp2}


def run_parts(names: list[str], args: argparse.Namespace, work: Path, budget: float) -> dict[str, Any]:
    """Run parts ``names`` in one process of their own, killed after ``budget`` seconds; each one's result
    or error (a part that raises is recorded by that process, one that crashes or hangs it here)."""
    command = [sys.executable, __file__, "--part", *names, "--work", str(work), "--budget", str(budget),
               "--device", args.device, "--batch_size", str(args.batch_size), *(["--dry_run"] * args.dry_run)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=budget)
        failure, exit_code = done.stderr[-3000:], done.returncode
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr.decode(errors="replace") if isinstance(expired.stderr, bytes) else expired.stderr
        failure, exit_code = f"timed out after {budget:.0f} s\n{(stderr or '')[-2000:]}", None
    results = {}
    for name in names:
        path = work / f"{name}.json"
        found = json.loads(path.read_text()) if path.is_file() else {"status": "error", "error": failure}
        results[name] = {"exit_code": exit_code, "budget_s": budget, **found}
    return results


def run_here(name: str, args: argparse.Namespace, work: Path, deadline: float) -> dict[str, Any]:
    """Part ``name`` in this process: its result, or the error it raised, with its wall time."""
    start = time.monotonic()
    (work / name).mkdir(parents=True, exist_ok=True)
    try:
        result = {"status": "ok", **PARTS[name](args, work / name, deadline)}
    except Exception:  # noqa: BLE001 - whatever a part raises is what the report must say
        result = {"status": "error", "error": traceback.format_exc()[-3000:]}
    release()
    return {**result, "wall_s": time.monotonic() - start}


def report(results: dict[str, Any]) -> str:
    lines = [f"# device check: {results['device']}, torch {results['torch']}, {results['total_s']:.0f} s"]
    for name, part in results["parts"].items():
        lines += ["", f"## {name} ({part['status']}, {part.get('wall_s', 0):.0f} s)", ""]
        lines.append(part.get("table") or f"```\n{part.get('error', '')[-1500:]}\n```")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("device_check"))
    parser.add_argument("--dry_run", action="store_true", help="every part on the CPU at toy sizes (< 60 s)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--batch_size", type=int, default=4, help="SmolLM2's batch (x 1024 tokens)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--part", nargs="+", choices=list(PARTS), help=argparse.SUPPRESS)  # internal: run one part here
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.part:  # a child: its parts one after the other, each one's JSON in the work directory
        torch.set_num_threads(2 if args.dry_run else 8)
        end = time.monotonic() + 0.8 * args.budget
        for index, name in enumerate(args.part):  # a part may use the time of the parts before it not used
            deadline = time.monotonic() + (end - time.monotonic()) / (len(args.part) - index)
            (args.work / f"{name}.json").write_text(json.dumps(run_here(name, args, args.work, deadline)))
        return
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("device_check: no CUDA device here; --dry_run checks the script on the CPU")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="device_check-") as work:
        if args.dry_run:  # one process for all: each would spend most of its time importing
            parts = run_parts(args.parts, args, Path(work), DRY_RUN_BUDGET)
        else:
            parts = {name: run_parts([name], args, Path(work), BUDGETS[name])[name] for name in args.parts}
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "cpu",
               "torch": torch.__version__, "dry_run": args.dry_run, "total_s": time.monotonic() - start,
               "parts": parts}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_check.json").write_text(json.dumps(results, indent=2))
    (args.out / "device_check.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()

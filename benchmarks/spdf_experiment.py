"""SPDF at CPU scale: a small GPT-2 pre-trained from random weights on real English text from
../shared/data (``--corpus squad``: SQuAD contexts; ``--corpus mixed``: SQuAD contexts + E2E
training references + SST-2 sentences) dense, 50% and 75% static-sparse for the same tokens, then
each fine-tuned densely on E2E NLG (plus the 75% "sparse fine-tuning" ablation, mask kept, and with
``--scratch`` the same fine-tuning from random weights). The runs recorded in benchmarks/RESULTS.md:

    python benchmarks/spdf_experiment.py --pretrain_steps 200 --finetune_steps 300 --e2e_eval 64 \\
        --scratch --root /tmp/spdfexp --out benchmarks/results/spdf_experiment_cpu.json
    python benchmarks/spdf_experiment.py --corpus mixed --pretrain_steps 200 --finetune_steps 300 \\
        --e2e_eval 64 --scratch --root /tmp/spdfmix --out benchmarks/results/spdf_experiment_mixed_cpu.json

Reports per run: training FLOPs per token and in total (sparseft.sparse.flops' convention),
held-out perplexity after pre-training, and E2E dev BLEU / ROUGE-L after fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sparseft.datamodules import E2EDataModule, RawTextDataModule
from sparseft.datamodules.e2e import read_e2e_csv
from sparseft.strategies import SPDF
from sparseft.training.module import SparseFTModule

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
EOS = "<|endoftext|>"


def pretraining_documents(corpus: str) -> list[str]:
    """The pre-training documents: ``squad`` is the SQuAD dev contexts (one paragraph a document);
    ``mixed`` adds, as one document each, a seeded sample of E2E *training* references and one of
    SST-2 training sentences, each about as many characters as the SQuAD contexts (1.6M), shuffled
    together so packed blocks mix the three. E2E dev and test text is never used."""
    squad = json.loads((SHARED / "squad" / "dev-v1.1.json").read_text())
    contexts = [p["context"] for article in squad["data"] for p in article["paragraphs"]]
    if corpus == "squad":
        return contexts
    rng, budget = random.Random(0), sum(map(len, contexts))
    references = read_e2e_csv(SHARED / "e2e" / "trainset.csv")["ref"]
    sst2 = [line.split("\t")[0].strip() for line in
            (SHARED / "glue" / "SST-2" / "train.tsv").read_text().splitlines()[1:]]
    documents = contexts + sample_characters(references, budget, rng) + sample_characters(sst2, budget, rng)
    rng.shuffle(documents)
    return documents


def sample_characters(texts: list[str], budget: int, rng: random.Random) -> list[str]:
    """Texts drawn at random without replacement until they hold ``budget`` characters."""
    chosen, total = [], 0
    for text in rng.sample(texts, len(texts)):
        if total >= budget:
            break
        chosen.append(text)
        total += len(text)
    return chosen


def build_corpus_and_tokenizer(root: Path, corpus: str, vocab: int) -> tuple[Path, Path]:
    """The pre-training JSONL (see :func:`pretraining_documents`), and a byte-level BPE trained on
    those documents plus the E2E *training* MRs and references.

    The tokenizer sees the downstream training set so that MR keys and restaurant names are a few
    tokens each rather than single bytes (a SQuAD-only BPE of 2,048 spends ~55 tokens on an MR and
    ~40 on a reference); no E2E dev or test text is used for either.
    """
    documents = pretraining_documents(corpus)
    path = root / f"{corpus}_corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    e2e_train = read_e2e_csv(SHARED / "e2e" / "trainset.csv")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(documents + e2e_train["mr"] + e2e_train["ref"], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory = root / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                            pad_token=EOS).save_pretrained(directory)
    return path, directory


def model_config(args: argparse.Namespace) -> dict:
    return dict(model_type="gpt2", n_embd=args.d_model, n_layer=args.layers, n_head=args.heads,
                n_positions=args.block, vocab_size=args.vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                bos_token_id=0, eos_token_id=0)


def trainer(steps: int, strategy: SPDF) -> Trainer:
    return Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                   limit_val_batches=0, num_sanity_val_steps=0, callbacks=[strategy])


def pretrain(args, sparsity: float, corpus: Path, tokenizer: Path, root: Path) -> dict:
    seed_everything(args.seed)
    data = RawTextDataModule(train_files=[str(corpus)], block_size=args.block, batch_size=args.batch,
                             tokenizer=str(tokenizer), cache_dir=str(root / "cache"))
    module = SparseFTModule(config=model_config(args), tokenizer=str(tokenizer), task="causal-lm",
                            learning_rate=args.lr, weight_decay=0.1, adam_betas=(0.9, 0.95), warmup_ratio=0.1,
                            lr_schedule="cosine", min_lr_ratio=0.1)
    strategy = SPDF(sparsity=sparsity, seed=args.seed)
    run, start = trainer(args.pretrain_steps, strategy), time.perf_counter()
    run.fit(module, data)
    seconds = time.perf_counter() - start
    run.limit_val_batches = 1.0
    held_out = run.validate(module, data, verbose=False)[0]
    ckpt = root / f"pretrain-{sparsity}.ckpt"
    run.save_checkpoint(ckpt)
    return {"sparsity": sparsity, "tokens": strategy.tokens, "train_flops_per_token": strategy.flops.sparse,
            "flop_reduction": strategy.flops.reduction, "pretrain_flops": strategy.flops.sparse * strategy.tokens,
            "held_out_loss": held_out["val/loss"], "held_out_perplexity": held_out["val/perplexity"],
            "pretrain_seconds": round(seconds, 1), "checkpoint": str(ckpt)}


def finetune(args, ckpt: str | None, tokenizer: Path, phase: str, sparsity: float) -> dict:
    """Fine-tune on E2E from a pre-training checkpoint (None: from random weights), then score
    greedy (or ``--beams``) outputs for the first ``--e2e_eval`` distinct dev MRs."""
    seed_everything(42 + args.seed)
    data = E2EDataModule(data_dir=str(SHARED / "e2e"), tokenizer=str(tokenizer), max_length=args.block,
                         batch_size=args.batch, max_train_samples=args.e2e_train, max_eval_samples=args.e2e_eval,
                         num_beams=args.beams, max_new_tokens=args.max_new_tokens, with_meteor=False)
    module = SparseFTModule(config=model_config(args), tokenizer=str(tokenizer), task="causal-lm",
                            learning_rate=args.ft_lr, weight_decay=0.01, warmup_ratio=0.05, lr_schedule="cosine")
    strategy = SPDF(sparsity=sparsity, phase=phase, checkpoint=ckpt)
    run, start = trainer(args.finetune_steps, strategy), time.perf_counter()
    run.fit(module, data)
    seconds = time.perf_counter() - start
    run.limit_val_batches, start = 1.0, time.perf_counter()
    scores = run.validate(module, data, verbose=False)[0]
    return {"phase": phase, "bleu": scores["val/bleu"], "rouge_l": scores["val/rouge_l"], "nist": scores["val/nist"],
            "cider": scores["val/cider"], "finetune_seconds": round(seconds, 1),
            "eval_seconds": round(time.perf_counter() - start, 1), "samples": sample_outputs(module, data)}


def sample_outputs(module: SparseFTModule, data: E2EDataModule, count: int = 3) -> list[dict]:
    """The first few dev MRs with the fine-tuned model's output and one reference (a sanity check)."""
    batch = next(iter(data.val_dataloader()))
    module.model.eval()
    with torch.no_grad():
        outputs = data.generate(module.model, {key: value[:count] for key, value in batch.items()})
    mrs = data.tokenizer.batch_decode(batch["input_ids"][:count], skip_special_tokens=True)
    return [{"mr": mr.strip(), "output": output, "reference": references[0]}
            for mr, output, references in zip(mrs, outputs, batch["references"])]


def save(args: argparse.Namespace, rows: list[dict]) -> None:
    """Rewrite the result file with every row so far, so a later arm's failure loses nothing."""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in [("d_model", 128), ("layers", 4), ("heads", 4), ("block", 128), ("vocab", 2048),
                          ("batch", 16), ("pretrain_steps", 300), ("finetune_steps", 300), ("e2e_train", 4800),
                          ("e2e_eval", 64), ("beams", 1), ("max_new_tokens", 64), ("threads", 1)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--seed", type=int, default=0, help="seed of the model initialisation and the sparse "
                        "masks (fine-tuning uses 42 + seed); data splits and batch order do not change")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ft_lr", type=float, default=1e-3)
    parser.add_argument("--corpus", choices=["squad", "mixed"], default="squad",
                        help="pre-training text: SQuAD contexts, or SQuAD + E2E training references + SST-2")
    parser.add_argument("--scratch", action="store_true", help="also fine-tune a randomly initialised model")
    parser.add_argument("--root", default="runs/spdf_experiment")
    parser.add_argument("--out", default="benchmarks/results/spdf_experiment.json")
    args = parser.parse_args()
    # One thread: on a shared, oversubscribed CPU two OpenMP threads spin at every barrier and a
    # training step of this model took ~10x longer than with one (measured 10.7 s vs 1.1 s).
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer = build_corpus_and_tokenizer(root, args.corpus, args.vocab)
    rows: list[dict] = []
    for sparsity in [0.0, 0.5, 0.75] + ([None] if args.scratch else []):
        if sparsity is None:
            row, phases = {"sparsity": None, "pretrain": "none (random weights)"}, ["dense"]
        else:
            row = pretrain(args, sparsity, corpus, tokenizer, root)
            phases = ["dense", "sparse"] if sparsity == 0.75 else ["dense"]
            rows.append({**row, "phase": None})
            save(args, rows)
            print(json.dumps(rows[-1]), flush=True)
        for phase in phases:
            rows.append({**row, **finetune(args, row.get("checkpoint"), tokenizer, phase, sparsity or 0.0)})
            save(args, rows)
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()

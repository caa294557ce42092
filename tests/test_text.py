"""RawTextDataModule: reading, packing, held-out split, cache, errors, hub path, perplexity; a tiny
GPT-2 pre-trained from a config with SPDF on real English text from ../shared/data."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from sparseft.datamodules import text as text_module
from sparseft.datamodules.text import Perplexity, RawTextDataModule, pack_blocks, read_documents
from sparseft.strategies import SPDF
from sparseft.testing import make_tiny_tokenizer, tiny_config
from sparseft.training.module import SparseFTModule
from tests.conftest import shared_data


def with_tokenizer(data: RawTextDataModule) -> RawTextDataModule:
    data.tokenizer = make_tiny_tokenizer("bpe")
    return data


def test_pack_blocks_appends_eos_and_drops_the_remainder():
    blocks = pack_blocks([[1, 2, 3], [4], [5, 6]], eos_id=0, block_size=4)
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 0, 5, 6]]  # the last EOS is dropped
    with pytest.raises(ValueError, match="no block of 16"):
        pack_blocks([[1, 2]], 0, 16)


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "fine"}\n{"text": broken}\n', r"bad\.jsonl: line 2: not valid JSON"),
    ("field.jsonl", '{"text": "fine"}\n\n{"body": "x"}\n', r"field\.jsonl: line 3: no string field 'text'"),
    ("list.jsonl", '["a"]\n', r"list\.jsonl: line 1: no string field 'text' \(found list\)"),
    ("empty.txt", "\n  \n", r"empty\.txt: no text"),
    ("ragged.tsv", "text\tlabel\na\t1\nb\n", r"ragged\.tsv: line 3: 1 fields, expected 2"),
    ("header.csv", "sentence\nhello\n", r"header\.csv: line 1: no column 'text'"),
    ("doc.pdf", "x", r"unknown file type '\.pdf'"),
])
def test_malformed_files_name_the_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        read_documents(tmp_path / name)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file .*absent.txt"):
        read_documents(tmp_path / "absent.txt")
    data = with_tokenizer(RawTextDataModule(train_files=["*.jsonl"], data_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"'\*\.jsonl' matches no file"):
        data.setup("fit")


def write_corpus(path, documents: int = 60):
    lines = [json.dumps({"text": f"the restaurant number {i} serves cheap italian food near the city centre"})
             for i in range(documents)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_held_out_documents_cached_blocks_and_collation(tmp_path, monkeypatch):
    write_corpus(tmp_path / "corpus.jsonl")
    make = lambda: with_tokenizer(RawTextDataModule(  # noqa: E731
        train_files="corpus.jsonl", data_dir=str(tmp_path), block_size=16, validation_fraction=0.1,
        cache_dir=str(tmp_path / "cache")))
    data = make()
    train, held = list(data.load_split("train")["text"]), list(data.load_split("validation")["text"])
    assert len(held) == 6 and len(train) == 54 and not set(held) & set(train)
    data.setup("fit")
    blocks = data.datasets["train"].blocks
    assert blocks.shape[1] == 16 and len(list((tmp_path / "cache").glob("*.pt"))) == 2
    tokens = data.tokenizer(train, add_special_tokens=False)["input_ids"]
    assert blocks.flatten().tolist() == [t for ids in tokens for t in (*ids, data.tokenizer.eos_token_id)][
        : blocks.numel()]
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].dtype == torch.long and torch.equal(batch["labels"], batch["input_ids"])
    assert batch["attention_mask"].all()
    monkeypatch.setattr(RawTextDataModule, "load_split", lambda self, name: pytest.fail("cache not used"))
    again = make()
    again.setup("fit")
    assert torch.equal(again.datasets["train"].blocks, blocks)


def test_hub_dataset_path_uses_load_dataset_and_holds_out_without_a_validation_split(monkeypatch, tmp_path):
    import datasets

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": [f"document {i} about food" for i in range(40)] + [""]})

    monkeypatch.setattr(text_module.datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(text_module.datasets, "get_dataset_split_names", lambda name, config: ["train"])
    data = with_tokenizer(RawTextDataModule(dataset="some/corpus", dataset_config="raw", block_size=8,
                                            cache_dir=str(tmp_path)))
    held = list(data.load_split("validation")["text"])
    assert calls == [("some/corpus", "raw", "train")] and len(held) == 2 and "" not in held


def test_perplexity_is_exp_of_the_token_weighted_mean_loss():
    metric = Perplexity()
    metric.update(torch.tensor(2.0), torch.tensor(30))
    metric.update(torch.tensor(1.0), torch.tensor(10))
    assert metric.compute().item() == pytest.approx(math.exp((2.0 * 30 + 1.0 * 10) / 40))


@pytest.mark.integration
def test_pretraining_a_tiny_gpt2_from_a_config_with_spdf_on_squad_contexts(tmp_path):
    squad = json.loads(shared_data("squad", "dev-v1.1.json").read_text())
    contexts = [p["context"] for article in squad["data"] for p in article["paragraphs"]][:300]
    corpus = tmp_path / "squad_contexts.jsonl"
    corpus.write_text("".join(json.dumps({"text": context}) + "\n" for context in contexts))
    tokenizer_dir = tmp_path / "tokenizer"
    make_tiny_tokenizer("bpe").save_pretrained(tokenizer_dir)
    data = RawTextDataModule(train_files=[str(corpus)], block_size=64, batch_size=8, cache_dir=str(tmp_path / "c"),
                             tokenizer=str(tokenizer_dir))
    torch.manual_seed(0)
    module = SparseFTModule(config=tiny_config("gpt2", n_positions=64), tokenizer=str(tokenizer_dir),
                            task="causal-lm", learning_rate=3e-3, weight_decay=0.1, adam_betas=(0.9, 0.95),
                            warmup_ratio=0.1, lr_schedule="cosine", min_lr_ratio=0.1)
    strategy = SPDF(sparsity=0.5)
    trainer = Trainer(max_steps=30, accelerator="cpu", logger=CSVLogger(tmp_path, name="logs"), val_check_interval=15,
                      enable_progress_bar=False, enable_checkpointing=False, callbacks=[strategy], log_every_n_steps=5)
    first = trainer.validate(module, data, verbose=False)[0]
    trainer.fit(module, data)
    last = trainer.validate(module, data, verbose=False)[0]
    assert last["val/perplexity"] == pytest.approx(math.exp(last["val/loss"]), rel=1e-4)  # equal-size blocks
    assert last["val/perplexity"] < 0.5 * first["val/perplexity"]  # it learns
    blocks = 2 * 2 * 12 * 32 * 32  # 2 layers of 12·d² projection weights, 2 FLOPs each
    rest = 2 * 32 * 400 + 2 * (4 * 64 * 32 + 3 * 4 * 64)  # LM head, attention products and softmax at n_ctx 64
    assert strategy.flops.reduction == pytest.approx((blocks + rest) / (0.5 * blocks + rest), rel=1e-12)
    assert strategy.tokens == 30 * 8 * 64

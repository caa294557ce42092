"""Training rows are tokenized when a batch needs them: a short run tokenizes only what it trains
on, and the batches are those that tokenizing the whole split first gives (resume stays exact)."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest
import torch

from sparseft.datamodules import E2EDataModule, GLUEDataModule
from sparseft.datamodules.order import EpochShuffleSampler
from sparseft.testing import make_tiny_tokenizer

ROWS = [(f"{word} film number {i}", i % 2) for i, word in enumerate(["good", "bad", "fine", "dull"] * 10)]


def glue(tiny_bert_dir: Path, folder: Path) -> GLUEDataModule:
    body = "".join(f"{text}\t{label}\n" for text, label in ROWS)
    for split in ("train", "dev"):
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + body)
    return GLUEDataModule(task="sst2", tokenizer=str(tiny_bert_dir), data_dir=str(folder), batch_size=4, seed=3)


def e2e(tiny_bert_dir: Path, folder: Path) -> E2EDataModule:
    body = "".join(f'"name[{text}], eatType[pub]","It is {text}."\n' for text, _ in ROWS)
    for name in ("trainset.csv", "devset.csv"):
        (folder / name).write_text("mr,ref\n" + body)
    make_tiny_tokenizer("bpe").save_pretrained(folder / "bpe")
    return E2EDataModule(tokenizer=str(folder / "bpe"), data_dir=str(folder), batch_size=4, seed=3)


@pytest.mark.parametrize("make", [glue, e2e], ids=["glue", "e2e"])
def test_a_short_run_tokenizes_only_its_batches_and_they_are_unchanged(make, tiny_bert_dir, tmp_path):
    data = make(tiny_bert_dir, tmp_path)
    data.setup("fit")
    train = data.datasets["train"]
    tokenized = []
    encode = train.encode
    train.encode = lambda rows: tokenized.append(len(next(iter(rows.values())))) or encode(rows)
    batches = list(islice(iter(data.train_dataloader()), 2))
    assert sum(tokenized) == 2 * 4 < len(ROWS)

    raw = data.load_split("train")
    eager = raw.map(data.encode, batched=True, remove_columns=raw.column_names).with_format("torch")
    order = EpochShuffleSampler(len(raw), seed=3).order(0)
    for number, batch in enumerate(batches):
        expected = data.collate([eager[i] for i in order[number * 4 : (number + 1) * 4]])
        assert batch.keys() == expected.keys()
        assert all(torch.equal(batch[key], expected[key]) for key in batch)

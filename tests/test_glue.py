"""GLUE: the original TSVs read exactly, malformed files named, official metrics by hand."""

from __future__ import annotations

import pytest
import torch

from sparseft.datamodules import GLUEDataModule
from sparseft.datamodules.glue_tasks import TASKS, get_task, read_tsv
from tests.conftest import shared_data

# rows of the real files, header excluded (../shared/data/README.md)
ROW_COUNTS = {
    ("SST-2", "train.tsv"): 67_349, ("SST-2", "dev.tsv"): 872, ("CoLA", "train.tsv"): 8_551,
    ("CoLA", "dev.tsv"): 1_043, ("MRPC", "train.tsv"): 3_668, ("MRPC", "dev.tsv"): 408,
    ("RTE", "train.tsv"): 2_490, ("RTE", "dev.tsv"): 277, ("STS-B", "train.tsv"): 5_749,
    ("STS-B", "dev.tsv"): 1_500, ("QNLI", "dev.tsv"): 5_463,
}
TEST_COUNTS = {"SST-2": 1_821, "CoLA": 1_063, "MRPC": 1_725, "RTE": 3_000, "STS-B": 1_379, "QNLI": 5_463}


@pytest.mark.integration
@pytest.mark.parametrize("folder, file", sorted(ROW_COUNTS))
def test_real_files_read_every_row(folder, file):
    columns = read_tsv(shared_data("glue", folder, file), get_task(folder))
    labels = columns["label"]
    assert len(labels) == ROW_COUNTS[folder, file]
    if folder == "STS-B":
        assert min(labels) == 0.0 and max(labels) == 5.0
    else:
        assert set(labels) == {0, 1}
    assert all(text for column in get_task(folder).text_columns for text in columns[column])


@pytest.mark.integration
@pytest.mark.parametrize("folder", sorted(TEST_COUNTS))
def test_real_test_files_read_unlabelled(folder):
    columns = read_tsv(shared_data("glue", folder, "test.tsv"), get_task(folder), labelled=False)
    assert "label" not in columns
    assert len(columns[get_task(folder).text_columns[0]]) == TEST_COUNTS[folder]


@pytest.mark.integration
def test_mrpc_bom_and_first_row():
    columns = read_tsv(shared_data("glue", "MRPC", "dev.tsv"), get_task("mrpc"))
    assert columns["label"][0] == 1
    assert columns["sentence1"][0].startswith("He said the foodservice pie business")
    # quoting off: the unbalanced quote at the start of this sentence stays, the row is not merged
    assert columns["sentence2"][0].startswith('"The foodservice pie business')


def test_malformed_row_names_file_and_line(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly two fields\n")
    with pytest.raises(ValueError, match=rf"{path}:3: expected 4 tab-separated fields, found 2"):
        read_tsv(path, get_task("rte"))


def test_unknown_label_names_file_and_line(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=rf"{path}:2: cannot read label 'maybe' for task rte"):
        read_tsv(path, get_task("rte"))


def test_missing_file_and_column_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GLUE qnli: no file .*train\.tsv"):
        read_tsv(tmp_path / "train.tsv", get_task("qnli"))
    path = tmp_path / "dev.tsv"
    path.write_text("id\ttext\tlabel\n0\ta\t1\n")
    with pytest.raises(ValueError, match="header has no column 'sentence'"):
        read_tsv(path, get_task("sst2"))


def test_task_names_and_labels():
    assert len(TASKS) == 9
    assert get_task("SST-2").name == "sst2" and get_task("STS-B").num_labels == 1
    assert get_task("mnli").labels == ("entailment", "neutral", "contradiction")
    with pytest.raises(ValueError, match="unknown GLUE task 'squad'; choose one of cola, sst2"):
        get_task("squad")


def test_official_metrics_by_hand():
    preds, target = torch.tensor([1, 1, 0, 0, 1]), torch.tensor([1, 0, 0, 1, 1])
    # tp=2 fp=1 fn=1 tn=1: F1 = 2/3, accuracy 3/5, MCC = (2*1 - 1*1)/sqrt(3*3*2*2) = 1/6
    mrpc = GLUEDataModule(task="mrpc").build_metrics()
    mrpc.update(preds, target)
    values = mrpc.compute()
    assert values["f1"] == pytest.approx(2 / 3) and values["accuracy"] == pytest.approx(0.6)
    cola = GLUEDataModule(task="cola").build_metrics()
    cola.update(preds, target)
    assert cola.compute()["matthews_correlation"] == pytest.approx(1 / 6)
    stsb = GLUEDataModule(task="stsb").build_metrics()
    stsb.update(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 4.0]))
    values = stsb.compute()
    assert values["pearson"] == pytest.approx(0.8) and values["spearmanr"] == pytest.approx(0.8)


@pytest.mark.integration
def test_dataloader_batches_and_deterministic_subsample(tiny_bert_dir):
    def first_ids(seed: int) -> torch.Tensor:
        data = GLUEDataModule(
            task="rte", tokenizer=str(tiny_bert_dir), data_dir=str(shared_data("glue", "RTE")),
            batch_size=4, max_length=32, max_train_samples=16, max_eval_samples=8, seed=seed,
        )
        data.setup("fit")
        assert len(data.datasets["train"]) == 16 and len(data.datasets["validation"]) == 8
        batch = next(iter(data.val_dataloader()))
        assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 32
        assert batch["labels"].dtype == torch.int64 and "token_type_ids" in batch
        return data.datasets["train"]["input_ids"][0]

    assert torch.equal(first_ids(1), first_ids(1))
    assert not torch.equal(first_ids(1), first_ids(2))


@pytest.mark.integration
def test_stsb_regression_labels_are_float32(tiny_bert_dir):
    data = GLUEDataModule(
        task="stsb", tokenizer=str(tiny_bert_dir), data_dir=str(shared_data("glue", "STS-B")), max_eval_samples=4
    )
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    assert batch["labels"].dtype == torch.float32 and data.num_labels == 1


def test_validate_needs_only_the_dev_file(tiny_bert_dir, tmp_path):
    (tmp_path / "dev.tsv").write_text("index\tquestion\tsentence\tlabel\n0\twho ?\tthe author .\tentailment\n")
    data = GLUEDataModule(task="qnli", tokenizer=str(tiny_bert_dir), data_dir=str(tmp_path))
    data.setup("validate")
    assert len(data.datasets["validation"]) == 1
    with pytest.raises(FileNotFoundError, match="train.tsv"):
        data.setup("fit")


def test_missing_tokenizer_is_explained():
    with pytest.raises(ValueError, match="has no tokenizer: set data.tokenizer"):
        _ = GLUEDataModule(task="sst2").tokenizer

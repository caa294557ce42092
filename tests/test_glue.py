"""GLUE: the original TSVs read exactly, malformed files named, official metrics by hand."""

from __future__ import annotations

import itertools
import re
import warnings
from pathlib import Path

import datasets
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


RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"
STSB_HEADER = "index\tsentence1\tsentence2\tscore\n0\ta\tb\t1.5\n"


@pytest.mark.parametrize("task, text, error", [
    ("rte", RTE_HEADER + "0\ta\tb\tentailment\n1\tonly two fields\n", ":3: expected 4 tab-separated fields, found 2"),
    ("rte", RTE_HEADER + "0\ta\tb\tmaybe\n", ":2: cannot read label 'maybe' for task rte"),
    # header-less CoLA: a tab inside the sentence would silently cut it short
    ("cola", "gj04\t1\t\tfine .\ngj04\t0\t\tbroken\tsentence .\n", ":2: expected 4 tab-separated fields, found 5"),
    ("stsb", STSB_HEADER + "1\ta\tb\tnan\n", ":3: cannot read label 'nan' for task stsb"),
    ("stsb", STSB_HEADER + "1\ta\tb\thigh\n", ":3: cannot read label 'high' for task stsb"),
    ("rte", "", ": empty file"),
], ids=["short-row", "unknown-label", "cola-stray-tab", "stsb-nan", "stsb-text", "empty"])
def test_malformed_file_names_file_and_line(tmp_path, task, text, error):
    path = tmp_path / "dev.tsv"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}{error}")):
        read_tsv(path, get_task(task))


def test_missing_file_and_column_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GLUE qnli: no file .*train\.tsv"):
        read_tsv(tmp_path / "train.tsv", get_task("qnli"))
    path = tmp_path / "dev.tsv"
    path.write_text("id\ttext\tlabel\n0\ta\t1\n")
    with pytest.raises(ValueError, match="header has no column 'sentence'"):
        read_tsv(path, get_task("sst2"))


def test_task_names_and_labels():
    assert len(TASKS) == 10  # the nine tasks and the diagnostic set
    assert get_task("diagnostic").name == "ax" and get_task("ax").labels == get_task("mnli").labels
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


# (preds, target, MCC by sklearn's formula: 0 when a marginal of the confusion matrix is constant)
MCC_CASES = {
    # tp=2 tn=1 fp=1 fn=0: (2*1 - 1*0) / sqrt(3*2*1*2) = 2/sqrt(12)
    "mixed": ([1, 1, 0, 1], [1, 1, 0, 0], 2 / 12**0.5),
    "all-right": ([1, 0, 1, 0], [1, 0, 1, 0], 1.0),
    "all-wrong": ([0, 1], [1, 0], -1.0),
    # a constant predictor: the predicted marginal is constant, so 0 (torchmetrics gave 0.2760)
    "constant-70/30": ([1] * 10, [1] * 7 + [0] * 3, 0.0),
    "constant-zero": ([0] * 10, [1] * 7 + [0] * 3, 0.0),
    # one target class: 0 whatever the predictions (torchmetrics gave 1.0, -1.0 and 0.4082)
    "one-class-right": ([1, 1, 1], [1, 1, 1], 0.0),
    "one-class-wrong": ([0, 0, 0], [1, 1, 1], 0.0),
    "one-class-mixed": ([0, 1, 1], [1, 1, 1], 0.0),
    "single": ([0], [0], 0.0),
}


@pytest.mark.parametrize("preds, target, expected", MCC_CASES.values(), ids=MCC_CASES.keys())
def test_cola_matthews_correlation_is_sklearns(preds, target, expected):
    metric = GLUEDataModule(task="cola").build_metrics()["matthews_correlation"]
    metric.update(torch.tensor(preds), torch.tensor(target))
    assert metric.compute().item() == pytest.approx(expected, abs=1e-7)


def test_matthews_correlation_against_sklearn_on_every_small_case():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    from sparseft.datamodules.glue_metrics import matthews_corrcoef

    for n in range(1, 6):
        for bits in itertools.product([0, 1], repeat=2 * n):
            preds, target = bits[:n], bits[n:]
            confmat = [[sum(t == i and p == j for p, t in zip(preds, target)) for j in (0, 1)] for i in (0, 1)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # sklearn warns about a single label
                expected = sklearn_metrics.matthews_corrcoef(target, preds)
            assert matthews_corrcoef(confmat) == pytest.approx(expected, abs=1e-12), (preds, target)


def test_matthews_correlation_states_add_across_batches_and_processes():
    metric = GLUEDataModule(task="cola").build_metrics()["matthews_correlation"]
    metric.update(torch.tensor([1, 1]), torch.tensor([1, 0]))
    metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    other = metric.clone()
    other.reset()
    other.update(torch.tensor([1, 1, 1]), torch.tensor([1, 1, 0]))
    metric.merge_state(other)  # what the DDP sync does: confusion counts summed
    assert metric.confmat.tolist() == [[1, 2], [0, 4]]
    # tp=4 tn=1 fp=2 fn=0: (4 - 0) / sqrt(6*4*3*1)
    assert metric.compute().item() == pytest.approx(4 / 72**0.5)


@pytest.mark.parametrize("preds, target", [([0.2, 0.9], [0, 1]), ([0, 2], [0, 1]), ([0, 1], [-1, 1])])
def test_matthews_correlation_takes_class_ids_only(preds, target):
    metric = GLUEDataModule(task="cola").build_metrics()["matthews_correlation"]
    with pytest.raises(ValueError, match="class ids"):
        metric.update(torch.tensor(preds), torch.tensor(target))


@pytest.mark.integration
def test_cola_dev_constant_predictors_score_exactly_zero():
    target = torch.tensor(read_tsv(shared_data("glue", "CoLA", "dev.tsv"), get_task("cola"))["label"])
    assert int(target.sum()) == 721  # of 1,043
    for constant in (0, 1):  # torchmetrics' BinaryMatthewsCorrCoef gave -0.0256 and +0.0256
        metric = GLUEDataModule(task="cola").build_metrics()
        metric.update(torch.full_like(target, constant), target)
        assert metric.compute()["matthews_correlation"].item() == 0.0
    metric.reset()
    metric.update(target, target)
    assert metric.compute()["matthews_correlation"].item() == 1.0


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
        return data.datasets["train"][0]["input_ids"]

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


# ---- offline: synthetic files in the original formats ------------------------------------------
METRICS = {
    "cola": {"matthews_correlation"}, "sst2": {"accuracy"}, "mrpc": {"f1", "accuracy"}, "qqp": {"f1", "accuracy"},
    "stsb": {"pearson", "spearmanr"}, "mnli": {"accuracy"}, "qnli": {"accuracy"}, "rte": {"accuracy"},
    "wnli": {"accuracy"},
}


@pytest.fixture(scope="module")
def sst2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SST-2-format folder of 40 short rows (train, dev) and an unlabelled test file."""
    path = tmp_path_factory.mktemp("sst2")
    rows = "".join(f"film {i} is {'good' if i % 2 else 'bad'} \t{i % 2}\n" for i in range(40))
    for split in ("train", "dev"):
        (path / f"{split}.tsv").write_text("sentence\tlabel\n" + rows)
    (path / "test.tsv").write_text("index\tsentence\n0\ta film\n1\tanother film\n")
    return path


def sst2_data(tokenizer_dir: Path, data_dir: Path, **kwargs) -> GLUEDataModule:
    return GLUEDataModule(task="sst2", tokenizer=str(tokenizer_dir), data_dir=str(data_dir), **kwargs)


@pytest.mark.parametrize("task", sorted(METRICS))
def test_every_task_has_its_official_metrics(task):
    data = GLUEDataModule(task=task)
    assert set(data.build_metrics().keys()) == METRICS[task]
    assert data.num_labels == {"stsb": 1, "mnli": 3}.get(task, 2)
    assert data.task_type == "sequence-classification"
    mnli = ["validation_matched", "validation_mismatched"]
    assert data.val_names == (mnli if task == "mnli" else ["validation"])


def test_mnli_accuracy_over_three_classes():
    metrics = GLUEDataModule(task="mnli").build_metrics()
    metrics.update(torch.tensor([0, 1, 2, 2, 1, 0]), torch.tensor([0, 1, 1, 2, 0, 2]))
    assert metrics.compute()["accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize("name, task", [("SST-2", "sst2"), ("Sst2", "sst2"), ("STS-B", "stsb"), ("CoLA", "cola"),
                                        ("MNLI", "mnli"), ("QQP", "qqp"), ("WNLI", "wnli")])
def test_task_names_are_case_insensitive(name, task):
    assert GLUEDataModule(task=name).task.name == task


def test_unknown_task_in_the_datamodule():
    with pytest.raises(ValueError, match="unknown GLUE task 'sst3'; choose one of .*wnli"):
        GLUEDataModule(task="sst3")


def test_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\ta\tb\n", encoding="utf-8")
    assert read_tsv(path, get_task("mrpc")) == {"sentence1": ["a"], "sentence2": ["b"], "label": [0]}


def test_qqp_and_wnli_columns_and_labels(tmp_path):
    qqp = tmp_path / "qqp.tsv"
    qqp.write_text("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n7\t1\t2\twhy ?\thow ?\t1\n")
    assert read_tsv(qqp, get_task("qqp")) == {"question1": ["why ?"], "question2": ["how ?"], "label": [1]}
    wnli = tmp_path / "wnli.tsv"
    wnli.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\t1\n1\tc\td\t0\n")
    assert read_tsv(wnli, get_task("wnli"))["label"] == [1, 0]
    assert GLUEDataModule(task="wnli").label_names == ["not_entailment", "entailment"]  # the hub's order


def test_mnli_local_matched_and_mismatched(tiny_bert_dir, tmp_path):
    header = "index\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    rows = "0\tfiction\ta\tb\tneutral\tentailment\n1\tfiction\tc\td\tneutral\tneutral\n2\tgov\te\tf\tx\tcontradiction\n"
    for name in ("dev_matched.tsv", "dev_mismatched.tsv"):
        (tmp_path / name).write_text(header + rows)
    data = GLUEDataModule(task="mnli", tokenizer=str(tiny_bert_dir), data_dir=str(tmp_path), eval_batch_size=8)
    data.setup("validate")
    data.setup("test")
    for loaders in (data.val_dataloader(), data.test_dataloader()):
        assert len(loaders) == 2
        assert [next(iter(loader))["labels"].tolist() for loader in loaders] == [[0, 1, 2], [0, 1, 2]]


def test_hub_splits(monkeypatch, tiny_bert_dir):
    calls = []

    def load_dataset(path: str, name: str, split: str) -> datasets.Dataset:
        calls.append((path, name, split))
        label = -1 if split.startswith("test") else 2  # the hub's test labels are -1
        return datasets.Dataset.from_dict({"premise": ["a"], "hypothesis": ["b"], "label": [label], "idx": [0]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = GLUEDataModule(task="mnli", tokenizer=str(tiny_bert_dir))
    data.setup("validate")
    data.setup("predict")
    splits = ["validation_matched", "validation_mismatched", "test_matched", "test_mismatched"]
    assert calls == [("nyu-mll/glue", "mnli", split) for split in splits]
    assert int(data.datasets["validation_matched"][0]["labels"]) == 2
    assert all("labels" not in next(iter(loader)) for loader in data.predict_dataloader())


def test_batches_from_the_dataloaders(tiny_bert_dir, sst2_dir):
    data = sst2_data(tiny_bert_dir, sst2_dir, batch_size=4, eval_batch_size=16, max_length=8)
    data.setup("fit")
    data.setup("predict")
    train, val = next(iter(data.train_dataloader())), next(iter(data.val_dataloader()))
    assert set(train) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert train["input_ids"].shape[0] == 4 and val["input_ids"].shape[0] == 16
    assert train["input_ids"].dtype == train["labels"].dtype == torch.int64 and val["input_ids"].shape[1] <= 8
    assert torch.equal(val["labels"], torch.arange(16) % 2)  # evaluation keeps the file order
    predict = next(iter(data.predict_dataloader()))
    assert "labels" not in predict and predict["input_ids"].shape[0] == 2


def test_training_subset_and_order_depend_on_the_seed_only(tiny_bert_dir, sst2_dir):
    def first_batch(seed: int, global_seed: int) -> tuple[list[int], torch.Tensor]:
        data = sst2_data(tiny_bert_dir, sst2_dir, batch_size=8, max_train_samples=24, seed=seed)
        data.setup("fit")
        torch.manual_seed(global_seed)  # as if model and strategy setup drew random numbers
        return data.datasets["train"][0]["input_ids"].tolist(), next(iter(data.train_dataloader()))["input_ids"]

    (subset, batch), (same_subset, same_batch) = first_batch(1, 0), first_batch(1, 123)
    assert subset == same_subset and torch.equal(batch, same_batch)
    other_subset, other_batch = first_batch(2, 0)
    assert other_subset != subset and not torch.equal(other_batch, batch)


def test_tokenizer_can_be_set_after_construction(tiny_bert_dir, sst2_dir):
    data = GLUEDataModule(task="sst2", data_dir=str(sst2_dir), max_eval_samples=3)
    data.tokenizer = str(tiny_bert_dir)  # what the CLI's link amounts to
    data.setup("validate")
    assert len(data.datasets["validation"]) == 3 and data.tokenizer_name == str(tiny_bert_dir)


# ---- predictions as the GLUE website reads them -------------------------------------------------
# nyu-mll/jiant's write_glue_preds ("compatible with GLUE website") and its GLUE tasks' get_glue_preds:
# label ids for CoLA, SST-2, MRPC, QQP and WNLI, label names for MNLI, AX, QNLI and RTE, STS-B's score
# clipped to [0, 5] with three decimals; one file per test set, named as the website expects
SUBMISSIONS = {
    "cola": (["CoLA.tsv"], ["0", "1", "1"]), "sst2": (["SST-2.tsv"], ["0", "1", "1"]),
    "mrpc": (["MRPC.tsv"], ["0", "1", "1"]), "qqp": (["QQP.tsv"], ["0", "1", "1"]),
    "wnli": (["WNLI.tsv"], ["0", "1", "1"]),
    "mnli": (["MNLI-m.tsv", "MNLI-mm.tsv"], ["entailment", "neutral", "contradiction"]),
    "ax": (["AX.tsv"], ["entailment", "neutral", "contradiction"]),
    "qnli": (["QNLI.tsv"], ["entailment", "not_entailment", "not_entailment"]),
    "rte": (["RTE.tsv"], ["entailment", "not_entailment", "not_entailment"]),
    "stsb": (["STS-B.tsv"], ["0.000", "2.346", "5.000"]),
}


@pytest.mark.parametrize("task", sorted(SUBMISSIONS))
def test_predictions_are_written_in_the_glue_websites_format(task, tmp_path):
    assert set(SUBMISSIONS) == set(TASKS), "every GLUE task has its expected submission format"
    files, expected = SUBMISSIONS[task]
    data = GLUEDataModule(task=task)
    assert data.prediction_files == files
    batches = [torch.tensor([-0.2, 2.34567]), torch.tensor([5.7])] if task == "stsb" else \
        [torch.tensor([0, 1]), torch.tensor([2 if task in ("mnli", "ax") else 1])]
    data.write_predictions(batches, [0, 1, 2], tmp_path / files[0])
    assert (tmp_path / files[0]).read_text() == "index\tprediction\n" + "".join(
        f"{index}\t{value}\n" for index, value in enumerate(expected))


def test_mnli_predicts_both_test_sets_and_ax_is_predicted_only(tiny_bert_dir, tmp_path):
    header = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t" \
             "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\n"
    for name, rows in (("test_matched.tsv", 2), ("test_mismatched.tsv", 3)):
        (tmp_path / name).write_text(header + "".join(f"{i}\t1\t1\tg\t-\t-\t-\t-\ta {i}\tb\n" for i in range(rows)))
    mnli = GLUEDataModule(task="mnli", tokenizer=str(tiny_bert_dir), data_dir=str(tmp_path))
    mnli.setup("predict")
    assert [len(loader.dataset) for loader in mnli.predict_dataloader()] == [2, 3]
    (tmp_path / "diagnostic.tsv").write_text("index\tsentence1\tsentence2\n0\ta\tb\n1\tc\td\n")
    ax = GLUEDataModule(task="diagnostic", tokenizer=str(tiny_bert_dir), data_dir=str(tmp_path))
    ax.setup("predict")
    assert len(ax.predict_dataloader().dataset) == 2 and ax.num_labels == 3
    for stage in ("fit", "validate"):
        with pytest.raises(ValueError, match="GLUE ax is an unlabelled test set only: .*--data.task ax --ckpt_path"):
            ax.setup(stage)
    with pytest.raises(ValueError, match="has no dev set to predict"):
        GLUEDataModule(task="ax", tokenizer=str(tiny_bert_dir), predict_split="dev").setup("predict")

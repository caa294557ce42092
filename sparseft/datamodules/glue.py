"""GLUE: all nine tasks and the diagnostic set, from the hub or from the original TSVs, with their
official metrics and the GLUE website's submission files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import Accuracy, BinaryF1Score
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from sparseft.datamodules.base import TextDataModule
from sparseft.datamodules.glue_metrics import MatthewsCorrCoef
from sparseft.datamodules.glue_tasks import GlueTask, get_task, read_tsv

HUB_DATASET = "nyu-mll/glue"


def build_metric(name: str, num_labels: int) -> Metric:
    """One of GLUE's official metrics, by the name the GLUE benchmark gives it."""
    if name == "accuracy":
        return Accuracy(task="multiclass", num_classes=num_labels)
    if name == "f1":
        return BinaryF1Score()
    if name == "matthews_correlation":
        return MatthewsCorrCoef()  # sklearn's value, 0 for a constant predictor
    if name == "pearson":
        return PearsonCorrCoef()
    if name == "spearmanr":
        return SpearmanCorrCoef()
    raise ValueError(f"unknown GLUE metric {name!r}")


class GLUEDataModule(TextDataModule):
    """A GLUE task: CoLA, SST-2, MRPC, QQP, STS-B, MNLI, QNLI, RTE or WNLI; or AX, the diagnostic set.

    With ``data_dir`` unset the data comes from the Hugging Face hub (``nyu-mll/glue``).
    With ``data_dir`` set it is the task's folder of original GLUE TSVs (``train.tsv``,
    ``dev.tsv`` or MNLI's ``dev_matched.tsv`` / ``dev_mismatched.tsv``, ``test.tsv`` or MNLI's
    ``test_matched.tsv`` / ``test_mismatched.tsv``, AX's ``diagnostic.tsv``); each file is read only
    when its stage needs it, so ``validate`` works with ``dev.tsv`` alone.

    ``test`` evaluates on the dev sets, since GLUE's test labels are hidden. ``predict`` runs on the
    unlabelled test files, or with ``predict_split: dev`` on the dev sets, and writes each set's
    predictions as the GLUE website reads them (the benchmark's baseline code, nyu-mll/jiant's
    ``write_glue_preds``): the website's file name (``SST-2.tsv``, MNLI's ``MNLI-m.tsv`` and
    ``MNLI-mm.tsv``, ``AX.tsv``, ...), a header ``index	prediction``, then per example its row and
    the label id (CoLA, SST-2, MRPC, QQP, WNLI), the label name (MNLI, AX, QNLI, RTE) or the score
    clipped to 0-5 with three decimals (STS-B) (:meth:`GlueTask.submission_value`). AX has MNLI's
    labels and only a test set: predict it with an MNLI checkpoint (``--data.task ax``).
    MNLI validates and tests on the matched and mismatched dev sets, as two dataloaders
    named by :attr:`val_names`.

    Labels are ids in the hub's ClassLabel order (``label_names``), so a model trained on
    the local files reads hub data the same way; STS-B's score is a float regression target.

    Metrics: CoLA Matthews correlation (sklearn's, as GLUE scores it: 0 when every prediction
    or every label is one class); STS-B Pearson and Spearman (regression,
    ``num_labels`` 1); MRPC and QQP F1 and accuracy; the others accuracy.

    Args:
        task: task name, case-insensitive; folder spellings such as ``SST-2`` work too.
        **kwargs: the :class:`TextDataModule` arguments (``data_dir`` is the folder with the
            task's original TSVs; sentence pairs are truncated jointly to ``max_length``).
    """

    local_data = "--data.data_dir, the task's folder of original GLUE TSVs (train.tsv, dev.tsv, test.tsv)"

    def __init__(self, task: str = "sst2", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.task: GlueTask = get_task(task)

    @property
    def num_labels(self) -> int:
        return self.task.num_labels

    @property
    def val_names(self) -> list[str]:
        return list(self.task.validation)

    @property
    def test_names(self) -> tuple[str, ...]:
        """The unlabelled test sets, by their hub split names (MNLI: matched and mismatched)."""
        return self.task.tests

    @property
    def prediction_files(self) -> list[str]:
        """The GLUE website's file name for each predicted set (the dev sets' predictions too)."""
        return list(self.task.submission_files)

    def format_prediction(self, value: float) -> str:
        return self.task.submission_value(value)

    def setup(self, stage: str) -> None:
        """Refuse to train or evaluate on AX, a test set only, before reading anything."""
        if not self.task.trainable and stage != "predict":
            raise ValueError(f"GLUE {self.task.name} is an unlabelled test set only: sparseft predict it with a "
                             "model trained on MNLI (--data.task ax --ckpt_path <MNLI checkpoint>)")
        super().setup(stage)

    @property
    def dev_metric(self) -> str:
        """The task's first official metric (MRPC / QQP: F1, STS-B: Pearson, CoLA: Matthews)."""
        return self.task.metrics[0]

    @property
    def label_names(self) -> list[str] | None:
        """Class names in label-id order (None for STS-B): the exported model's ``id2label``."""
        return list(self.task.labels) if self.task.labels else None

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({name: build_metric(name, self.num_labels) for name in self.task.metrics})

    def load_split(self, name: str) -> datasets.Dataset:
        """``train``, a validation set or an unlabelled test set, by its hub split name."""
        if self.data_dir is None:
            with self.hub_dataset(HUB_DATASET):
                return datasets.load_dataset(HUB_DATASET, self.task.name, split=name)
        return datasets.Dataset.from_dict(self._read_local(name))

    def _read_local(self, name: str) -> dict[str, list]:
        folder = Path(self.data_dir)
        if name == "train":
            return read_tsv(folder / "train.tsv", self.task)
        if name in self.task.tests:
            return read_tsv(folder / self.task.test_files[self.task.tests.index(name)], self.task, labelled=False)
        if name in self.task.validation:
            return read_tsv(folder / self.task.dev_files[self.task.validation.index(name)], self.task)
        raise ValueError(f"GLUE {self.task.name} has no split {name!r}")

    def encode(self, examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        texts = [examples[column] for column in self.task.text_columns]
        features = self.tokenizer(*texts, truncation=True, max_length=self.max_length)
        if "label" in examples and all(label is not None and label != -1 for label in examples["label"]):
            features["labels"] = examples["label"]
        return dict(features)

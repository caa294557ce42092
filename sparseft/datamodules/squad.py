"""SQuAD v1.1 / v2.0 extractive question answering: doc-stride features, span post-processing, EM/F1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import torch
from lightning.pytorch import LightningModule
from torchmetrics import MetricCollection

from sparseft.datamodules.base import TextDataModule
from sparseft.datamodules.squad_metrics import FeatureSpan, SquadMetric

HUB_DATASETS = {False: "rajpurkar/squad", True: "rajpurkar/squad_v2"}
FILES = {False: ("train-v1.1.json", "dev-v1.1.json"), True: ("train-v2.0.json", "dev-v2.0.json")}


def read_squad_json(path: Path, articles: slice = slice(None)) -> dict[str, list]:
    """Flatten an official SQuAD JSON file (its ``articles``, by default all) into one row per question
    (hub column names).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is not SQuAD JSON, or a record lacks a field or has an answer that
            is not in its context (the message names the file and the record).
    """
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD: no file {path}")
    try:
        chosen = json.loads(path.read_text(encoding="utf-8"))["data"][articles]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a SQuAD JSON file with a top-level 'data' list ({error})") from None
    rows: dict[str, list] = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    for a, article in enumerate(chosen, start=articles.start or 0):  # a: the index in the file, for messages
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            for q, qa in enumerate(paragraph.get("qas", [])):
                where = f"{path}: data[{a}].paragraphs[{p}].qas[{q}] (id {qa.get('id', '?')!r})"
                try:
                    context = paragraph["context"]
                    answers = _answers(qa, context, where)
                    rows["id"].append(qa["id"])
                    rows["question"].append(qa["question"])
                except KeyError as error:
                    raise ValueError(f"{where}: missing field {error}") from None
                rows["title"].append(article.get("title", ""))
                rows["context"].append(context)
                rows["answers"].append(answers)
    return rows


def _answers(qa: dict[str, Any], context: str, where: str) -> dict[str, list]:
    texts = [answer["text"] for answer in qa["answers"]]
    starts = [int(answer["answer_start"]) for answer in qa["answers"]]
    for text, start in zip(texts, starts):
        if context[start : start + len(text)] != text:
            raise ValueError(f"{where}: answer {text!r} is not at character {start} of its context")
    return {"text": texts, "answer_start": starts}


def _model_features(windows: Any) -> dict[str, list]:
    """Tokenizer outputs the model takes (without offsets and the window-to-example map)."""
    return {k: v for k, v in windows.items() if k not in ("offset_mapping", "overflow_to_sample_mapping")}


class SquadDataModule(TextDataModule):
    """SQuAD v1.1 or v2.0 for extractive question answering.

    Contexts longer than ``max_length`` are split into overlapping windows (``doc_stride``
    tokens of overlap); each window is one feature. Training labels are the answer's first and
    last token in a window, or the CLS token when the window does not contain it (v2.0: also
    for unanswerable questions). Evaluation gathers all windows of a question, takes the best
    valid span (``n_best`` starts × ends, at most ``max_answer_length`` tokens), for v2.0
    answers "" when the no-answer score wins by more than ``null_threshold``, and scores EM/F1
    exactly as the official scripts.

    ``predict`` runs on the evaluation file and writes ``predictions.json``, ``{question id:
    answer text}``, the input of the official ``evaluate-v1.1.py`` / ``evaluate-v2.0.py``
    (v2.0: "" for no answer), with the same post-processing as validation.

    ``data_dir`` holds the official files (``train-v1.1.json``, ``dev-v1.1.json`` or the v2.0
    names); ``train_file`` / ``eval_file`` name other files in the same format. Without either,
    the data comes from the hub (``rajpurkar/squad`` / ``rajpurkar/squad_v2``). Where only the dev
    file is at hand (an offline copy: the training file is 30 MB), ``train_on_dev_articles`` splits
    it by article, so that no question is trained on and evaluated both.

    Args:
        version_2: SQuAD v2.0 (with unanswerable questions) instead of v1.1.
        train_file: training JSON, overriding ``data_dir``'s.
        eval_file: evaluation JSON, overriding ``data_dir``'s.
        train_on_dev_articles: train on the dev file's first this many articles and evaluate on the
            others; no training file is read. None: the training file (or split) trains.
        doc_stride: overlap, in tokens, between consecutive windows of a long context.
        n_best: start and end candidates per window in post-processing.
        max_answer_length: longest answer, in tokens.
        null_threshold: v2.0: answer "" when the no-answer score exceeds the best span's by this.
        **kwargs: the :class:`TextDataModule` arguments (``max_length`` default 384 here).
    """

    task_type = "question-answering"
    test_names = ()  # SQuAD's test sets are hidden: predict runs on the dev file
    prediction_file = "predictions.json"
    predictions_per_rank = False  # a question's windows may land on different processes
    dev_metric = "f1"
    local_data = "--data.data_dir, a folder of the official JSON files (train-v1.1.json, dev-v1.1.json)"

    def __init__(
        self,
        version_2: bool = False,
        train_file: str | None = None,
        eval_file: str | None = None,
        train_on_dev_articles: int | None = None,
        doc_stride: int = 128,
        n_best: int = 20,
        max_answer_length: int = 30,
        null_threshold: float = 0.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("max_length", 384)
        super().__init__(**kwargs)
        self.version_2, self.doc_stride = version_2, doc_stride
        if train_on_dev_articles is not None and train_on_dev_articles < 1:
            raise ValueError(f"data.train_on_dev_articles {train_on_dev_articles}: give at least 1 article, or null")
        self.train_file, self.eval_file = train_file, eval_file
        self.train_on_dev_articles = train_on_dev_articles
        self.n_best, self.max_answer_length, self.null_threshold = n_best, max_answer_length, null_threshold
        self.eval_examples: dict[str, list] = {}
        self.eval_features: list[FeatureSpan] = []

    @property
    def num_labels(self) -> int:
        return 2  # start and end logits; the QA head ignores it

    def _file(self, name: str) -> Path | None:
        explicit = self.train_file if name == "train" else self.eval_file
        if explicit:
            return Path(explicit)
        if self.data_dir:
            return Path(self.data_dir) / FILES[self.version_2][0 if name == "train" else 1]
        return None

    def load_split(self, name: str) -> datasets.Dataset:
        if self.train_on_dev_articles is not None:
            return datasets.Dataset.from_dict(self._dev_articles(name))
        path = self._file(name)
        if path is not None:
            if name == "train" and not path.is_file() and not self.train_file:  # data_dir without the training file
                raise FileNotFoundError(f"SQuAD: no training file {path}; to train on part of the dev file instead, "
                                        "set --data.train_on_dev_articles (e.g. 40 of the 48 of dev-v1.1.json)")
            return datasets.Dataset.from_dict(read_squad_json(path))
        with self.hub_dataset(HUB_DATASETS[self.version_2]):
            return datasets.load_dataset(HUB_DATASETS[self.version_2],
                                         split="train" if name == "train" else "validation")

    def _dev_articles(self, name: str) -> dict[str, list]:
        """The rows of the dev file's first ``train_on_dev_articles`` articles (``train``) or of the others."""
        path = self._file("validation")
        if path is None:
            raise ValueError("SQuAD: data.train_on_dev_articles splits the dev file: give --data.data_dir or "
                             "--data.eval_file")
        first = self.train_on_dev_articles
        rows = read_squad_json(path, slice(None, first) if name == "train" else slice(first, None))
        if not rows["id"]:
            raise ValueError(f"SQuAD: data.train_on_dev_articles {first} leaves no article of {path} to evaluate on")
        return rows

    def _prepare(self, name: str, split: str) -> datasets.Dataset:
        raw = self._subsample(self.load_split(name), split)
        if split == "train":
            encoded = raw.map(self.encode, batched=True, remove_columns=raw.column_names, desc="SQuAD features")
            return encoded.with_format("torch")
        self.eval_examples = raw.to_dict()
        encoded = self.encode_eval(self.eval_examples)
        self.eval_features = encoded.pop("spans")
        return datasets.Dataset.from_dict(encoded).with_format("torch")

    def _windows(self, examples: dict[str, list]) -> Any:
        questions = [question.lstrip() for question in examples["question"]]
        try:
            return self.tokenizer(
                questions, examples["context"], truncation="only_second", max_length=self.max_length,
                stride=self.doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
            )
        except BaseException as error:  # the Rust tokenizer panics (a BaseException) on a too-long stride
            if "stride" not in str(error):
                raise
            raise ValueError(
                f"SQuAD: doc_stride {self.doc_stride} leaves no room for context in a window of max_length "
                f"{self.max_length} after the question: lower data.doc_stride or raise data.max_length"
            ) from None

    def encode(self, examples: dict[str, list]) -> dict[str, list]:
        """Training features with ``start_positions`` / ``end_positions`` (CLS = 0 when absent)."""
        windows = self._windows(examples)
        starts, ends = [], []
        for i, offsets in enumerate(windows["offset_mapping"]):
            answers = examples["answers"][windows["overflow_to_sample_mapping"][i]]
            start, end = self._label(windows.sequence_ids(i), offsets, answers)
            starts.append(start)
            ends.append(end)
        return {**_model_features(windows), "start_positions": starts, "end_positions": ends}

    @staticmethod
    def _label(sequence_ids: list[int | None], offsets: list[tuple[int, int]], answers: dict) -> tuple[int, int]:
        if not answers["text"]:
            return 0, 0
        first_char = answers["answer_start"][0]
        last_char = first_char + len(answers["text"][0])
        context = [i for i, sequence in enumerate(sequence_ids) if sequence == 1]
        if not context or offsets[context[0]][0] > first_char or offsets[context[-1]][1] < last_char:
            return 0, 0  # the answer is not (entirely) in this window
        start = next(i for i in context if offsets[i][1] > first_char)
        end = next(i for i in reversed(context) if offsets[i][0] < last_char)
        return start, end

    def encode_eval(self, examples: dict[str, list]) -> dict[str, list]:
        """Evaluation features; their context offsets go to a side table, indexed by ``feature_index``."""
        windows = self._windows(examples)
        spans = []
        for i, offsets in enumerate(windows["offset_mapping"]):
            sequence_ids = windows.sequence_ids(i)
            context_offsets = [tuple(o) if s == 1 else None for o, s in zip(offsets, sequence_ids)]
            spans.append(FeatureSpan(windows["overflow_to_sample_mapping"][i], context_offsets))
        return {**_model_features(windows), "feature_index": list(range(len(spans))), "spans": spans}

    def _metric(self) -> SquadMetric:
        return SquadMetric(
            self.eval_features, self.eval_examples, self.version_2, self.n_best, self.max_answer_length,
            self.null_threshold, self.max_length,
        )

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"squad": self._metric()})

    def predict_batch(self, module: LightningModule, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """Start and end logits of each feature, with its index (post-processed in :meth:`write_predictions`)."""
        outputs = module(**batch)
        return batch["feature_index"], outputs.start_logits, outputs.end_logits

    def write_predictions(self, predictions: list[Any], indices: list[int], path: Path) -> None:
        """``{question id: answer}`` JSON: the spans validation scores, by :class:`SquadMetric`."""
        metric = self._metric()
        for batch_outputs in predictions:
            metric.update(*batch_outputs)
        path.write_text(json.dumps(metric.predictions(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    def metric_inputs(
        self, outputs: Any, batch: dict[str, torch.Tensor], module: LightningModule
    ) -> tuple[Any, ...] | None:
        if "feature_index" not in batch:
            return None
        return batch["feature_index"], outputs.start_logits, outputs.end_logits

"""The nine GLUE tasks and the diagnostic set (AX): columns, labels, files, official metrics and
submission format, plus the TSV reader.

The original GLUE TSVs are read with quoting off (``csv.QUOTE_NONE``): with default quoting,
MRPC, QNLI, RTE and STS-B silently lose rows. CoLA's train/dev files have no header; MRPC's
headers start with a UTF-8 byte-order mark. A malformed row is an error naming file and line.
"""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from sparseft.datamodules.files import utf8_lines

csv.field_size_limit(sys.maxsize)


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task.

    Attributes:
        name: hub config name (``sst2``).
        text_columns: input columns as the hub names them (one sentence or a pair).
        labels: class names in the hub's ClassLabel order; None for regression (STS-B).
        metrics: official metrics, names of :data:`sparseft.datamodules.glue.METRICS`.
        file_columns: hub column -> TSV header name (or position, for header-less files).
        validation: hub split names of the dev sets; their files are ``dev_files``.
        dev_files / test_files: TSV file names of the dev and the unlabelled test sets.
        test_columns: column map of the test files when it differs (CoLA's test has a header).
        tests: hub split names of the unlabelled test sets; their files are ``test_files``.
        submission_files: the file the GLUE website expects for each test set's predictions.
        submits_names: whether a submission writes label names (MNLI, AX, QNLI, RTE) rather than
            label ids (CoLA, SST-2, MRPC, QQP, WNLI), as GLUE's own baseline code does.
        trainable: False for AX, a test set only (predicted with an MNLI model).
    """

    name: str
    text_columns: tuple[str, ...]
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    file_columns: dict[str, str | int]
    validation: tuple[str, ...] = ("validation",)
    dev_files: tuple[str, ...] = ("dev.tsv",)
    test_files: tuple[str, ...] = ("test.tsv",)
    test_columns: dict[str, str | int] | None = None
    tests: tuple[str, ...] = ("test",)
    submission_files: tuple[str, ...] = ()
    submits_names: bool = False
    trainable: bool = True

    def columns(self, labelled: bool) -> dict[str, str | int]:
        """Column map of the labelled files, or of the unlabelled test files."""
        return self.file_columns if labelled or self.test_columns is None else self.test_columns

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    def submission_value(self, prediction: float) -> str:
        """A prediction (label id, or STS-B's score) as the GLUE website reads it, following the
        benchmark's baseline (nyu-mll/jiant's ``write_glue_preds``, "compatible with GLUE website"):
        the label name or the id (:attr:`submits_names`); STS-B's score clipped to its 0-5 scale,
        with three decimals."""
        if self.labels is None:
            return f"{min(max(float(prediction), STSB_RANGE[0]), STSB_RANGE[1]):.3f}"
        return self.labels[int(prediction)] if self.submits_names else str(int(prediction))


_PAIR = {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}
_NLI = ("entailment", "neutral", "contradiction")
#: STS-B's similarity scale
STSB_RANGE = (0.0, 5.0)

TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",),
                 {"sentence": 3, "label": 1}, test_columns={"sentence": "sentence"}, submission_files=("CoLA.tsv",)),
        GlueTask("sst2", ("sentence",), ("negative", "positive"), ("accuracy",),
                 {"sentence": "sentence", "label": "label"}, submission_files=("SST-2.tsv",)),
        GlueTask("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy"),
                 {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"},
                 submission_files=("MRPC.tsv",)),
        GlueTask("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy"),
                 {"question1": "question1", "question2": "question2", "label": "is_duplicate"},
                 submission_files=("QQP.tsv",)),
        GlueTask("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearmanr"), {**_PAIR, "label": "score"},
                 submission_files=("STS-B.tsv",)),
        GlueTask("mnli", ("premise", "hypothesis"), _NLI, ("accuracy",),
                 {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"},
                 validation=("validation_matched", "validation_mismatched"),
                 dev_files=("dev_matched.tsv", "dev_mismatched.tsv"),
                 test_files=("test_matched.tsv", "test_mismatched.tsv"), tests=("test_matched", "test_mismatched"),
                 submission_files=("MNLI-m.tsv", "MNLI-mm.tsv"), submits_names=True),
        GlueTask("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",),
                 {"question": "question", "sentence": "sentence", "label": "label"}, submission_files=("QNLI.tsv",),
                 submits_names=True),
        GlueTask("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), _PAIR,
                 submission_files=("RTE.tsv",), submits_names=True),
        GlueTask("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), _PAIR,
                 submission_files=("WNLI.tsv",)),
        # the diagnostic set: MNLI's labels, an unlabelled test file only, predicted by an MNLI model
        GlueTask("ax", ("premise", "hypothesis"), _NLI, ("accuracy",),
                 {"premise": "sentence1", "hypothesis": "sentence2"}, validation=(), dev_files=(),
                 test_files=("diagnostic.tsv",), submission_files=("AX.tsv",),
                 submits_names=True, trainable=False),
    )
}
# the spellings of the original GLUE folders
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-mm": "mnli", "diagnostic": "ax"}


def get_task(name: str) -> GlueTask:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[key]


def _parse_label(task: GlueTask, value: str, where: str) -> int | float:
    try:
        if task.labels is None:
            score = float(value)
            if not math.isfinite(score):
                raise ValueError(value)
            return score
        if value in task.labels:
            return task.labels.index(value)
        index = int(value)
    except ValueError:
        raise ValueError(f"{where}: cannot read label {value!r} for task {task.name}") from None
    if not 0 <= index < len(task.labels):
        raise ValueError(f"{where}: label {index} out of range for {task.name} ({len(task.labels)} classes)")
    return index


def read_tsv(path: Path, task: GlueTask, labelled: bool = True) -> dict[str, list]:
    """Read an original GLUE TSV into hub-named columns (``label`` when ``labelled``).

    Raises:
        FileNotFoundError: the file is missing (the message names it).
        ValueError: the file has no data rows, is not UTF-8 text, or a row has the wrong number
            of fields or an unreadable label (the message names the file and the 1-based line).
    """
    if not path.is_file():
        raise FileNotFoundError(f"GLUE {task.name}: no file {path}; data.data_dir must be the task's GLUE TSV folder")
    wanted = list(task.text_columns) + (["label"] if labelled else [])
    columns: dict[str, list] = {name: [] for name in wanted}
    lines = utf8_lines(path)
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    file_columns = task.columns(labelled)
    positional = all(isinstance(file_columns[name], int) for name in wanted)
    try:
        header = None if positional else next(reader, None)
        if not positional and header is None:
            raise ValueError(f"{path}: empty file, expected a header row")
        index = _column_index(file_columns, wanted, header, path)
        # header-less files (CoLA) end with their last wanted column: a tab inside the sentence
        # would otherwise go unnoticed and cut it short
        width = len(header) if header else max(index.values()) + 1
        for line, row in enumerate(reader, start=1 if positional else 2):
            where = f"{path}:{line}"
            if len(row) != width:
                raise ValueError(f"{where}: expected {width} tab-separated fields, found {len(row)}")
            for name in wanted:
                value = row[index[name]]
                columns[name].append(_parse_label(task, value, where) if name == "label" else value)
    except csv.Error as error:  # e.g. a NUL byte
        raise ValueError(f"{path}:{reader.line_num}: not a GLUE TSV line ({error})") from None
    if not columns[wanted[0]]:
        raise ValueError(f"{path}: no data rows{'' if positional else ' after the header'}: is it the right file?")
    return columns


def _column_index(
    file_columns: dict[str, str | int], wanted: list[str], header: list[str] | None, path: Path
) -> dict[str, int]:
    if header is None:
        return {name: int(file_columns[name]) for name in wanted}
    index = {}
    for name in wanted:
        column = file_columns[name]
        if column not in header:
            raise ValueError(f"{path}:1: header has no column {column!r} (found {header})")
        index[name] = header.index(column)
    return index

"""E2E NLG for causal language models: "MR → reference" examples, beam-search generation, the
challenge's metrics over references grouped by MR."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import datasets
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MetricCollection

from sparseft.datamodules.base import TextDataModule, progress_bars_hidden
from sparseft.datamodules.e2e_metrics import E2EMetric
from sparseft.datamodules.files import utf8_lines
from sparseft.datamodules.prompts import PromptFormat, answer_text, make_prompt_format, special_ids

HUB_DATASET = "tuetschek/e2e_nlg"
HUB_COLUMNS = {"meaning_representation": "mr", "human_reference": "ref"}
FILES = {"train": "trainset.csv", "validation": "devset.csv", "test": "testset_w_refs.csv"}
EVAL_COLUMNS = ["input_ids", "attention_mask", "example_index"]


def read_e2e_csv(path: Path) -> dict[str, list[str]]:
    """The ``mr`` and ``ref`` columns of an E2E CSV file (original release format).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: no ``mr`` / ``ref`` header, no records, a line that is not UTF-8, or a record with
            another number of fields or an empty field (the message names the file, the record and its line).
    """
    if not path.is_file():
        raise FileNotFoundError(f"E2E: no file {path}")
    rows: dict[str, list[str]] = {"mr": [], "ref": []}
    reader = csv.reader(utf8_lines(path))
    header = [field.strip().lower() for field in next(reader, [])]
    if "mr" not in header or "ref" not in header:
        raise ValueError(f"{path}: expected a header with columns 'mr' and 'ref', found {header}")
    mr_column, ref_column = header.index("mr"), header.index("ref")
    for record, fields in enumerate(reader, start=1):
        where = f"{path}: record {record} (line {reader.line_num})"
        if len(fields) != len(header):
            raise ValueError(f"{where}: {len(fields)} fields, expected {len(header)} ({fields!r})")
        if not fields[mr_column].strip() or not fields[ref_column].strip():
            raise ValueError(f"{where}: empty 'mr' or 'ref' field")
        rows["mr"].append(fields[mr_column])
        rows["ref"].append(fields[ref_column])
    if not rows["mr"]:
        raise ValueError(f"{path}: no records after the header: is it the right file?")
    return rows


def group_references(rows: dict[str, list[str]]) -> dict[str, list]:
    """One row per distinct MR (in order of first appearance) with all of its references."""
    grouped: dict[str, list[str]] = {}
    for mr, ref in zip(rows["mr"], rows["ref"]):
        grouped.setdefault(mr, []).append(ref)
    return {"mr": list(grouped), "references": list(grouped.values())}


def pad_sequences(sequences: list[torch.Tensor], value: int, left: bool) -> torch.Tensor:
    """Stack 1-D tensors into a ``[batch, longest]`` tensor, padding on the left or the right."""
    width = max(len(sequence) for sequence in sequences)
    padded = torch.full((len(sequences), width), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if left:
            padded[row, width - len(sequence) :] = sequence
        else:
            padded[row, : len(sequence)] = sequence
    return padded


class E2EDataModule(TextDataModule):
    """The E2E NLG challenge (restaurant MRs → texts) for causal LMs such as GPT-2 or SmolLM2.

    A training example is a prompt and a target (:mod:`sparseft.datamodules.prompts`). When the
    tokenizer has a chat template (instruct backbones) and ``chat_template`` is on, the prompt is
    the template's conversation with the MR as the user turn, ending with the assistant header,
    and the target is the reference as the assistant turn, ending with the template's
    end-of-turn token. Otherwise (GPT-2) the prompt is the MR's tokens and the tokenizer's EOS,
    the target " " and the reference's tokens and EOS (the LoRA / PST GPT-2 E2E format). The
    loss covers only the target (prompt labels are -100). Training batches are padded on the right.
    Evaluation has one example per distinct MR with all its references; the prompt (padded on
    the left) is completed by beam search, which stops at the end of turn (EOS), and the output,
    up to its first special token, is scored against the references with BLEU, NIST, METEOR,
    ROUGE-L and CIDEr (see :mod:`sparseft.datamodules.e2e_metrics`). ``validation`` is the dev set; ``test``
    the challenge test set with references. ``predict`` (on ``test``, or ``dev`` with
    ``predict_split``) writes ``predictions.txt``: one output per distinct MR, in the order the
    MRs first appear in the file, the challenge's system-output format; the generation settings
    are validation's.

    ``data_dir`` holds the original ``trainset.csv``, ``devset.csv`` and
    ``testset_w_refs.csv``; without it the data comes from the hub (``tuetschek/e2e_nlg``).

    Args:
        num_beams: beam size of generation.
        length_penalty: beam-search length penalty (exponent of the length normaliser).
        no_repeat_ngram_size: no n-gram of this size appears twice in an output (0: off).
        max_new_tokens: longest generated output, in tokens.
        with_meteor: report METEOR (needs ``pycocoevalcap`` and Java; skipped without them).
        chat_template: lay examples out with the tokenizer's chat template when it has one;
            false: the GPT-2 format above for every tokenizer.
        **kwargs: the :class:`TextDataModule` arguments (``max_length`` bounds prompt plus
            reference in training, default 160 here: with SmolLM2's tokenizer the longest training
            example is 126 tokens in the GPT-2 format, 155 with its chat template and system turn).
    """

    task_type = "causal-lm"
    prediction_file = "predictions.txt"
    predictions_per_rank = False  # one file, one line per MR in the test set's order
    dev_metric = "bleu"
    local_data = "--data.data_dir, a folder of the original CSVs (trainset.csv, devset.csv, testset_w_refs.csv)"

    def __init__(
        self,
        num_beams: int = 10,
        length_penalty: float = 0.8,
        no_repeat_ngram_size: int = 4,
        max_new_tokens: int = 64,
        with_meteor: bool = True,
        chat_template: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("max_length", 160)
        super().__init__(**kwargs)
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.no_repeat_ngram_size, self.max_new_tokens = no_repeat_ngram_size, max_new_tokens
        self.with_meteor, self.chat_template = with_meteor, chat_template
        self._format: PromptFormat | None = None

    def split_names(self, split: str) -> list[str]:
        """``test`` is E2E's own test set (with references), not the dev set."""
        return [split] if split == "test" else super().split_names(split)

    def load_split(self, name: str) -> datasets.Dataset:
        if self.data_dir:
            return datasets.Dataset.from_dict(read_e2e_csv(Path(self.data_dir) / FILES[name]))
        with self.hub_dataset(HUB_DATASET):
            dataset = datasets.load_dataset(HUB_DATASET, split=name)
        return dataset.rename_columns(HUB_COLUMNS).select_columns(["mr", "ref"])

    def _prepare(self, name: str, split: str) -> datasets.Dataset:
        if split == "train":
            prepared = super()._prepare(name, split)  # tokenized lazily, batch by batch (encode)
            # its MRs now, so an MR that leaves no room is refused before the run writes anything (it fired
            # at the batch holding it, after config.yaml and checkpoints were written)
            self._prompts(sorted(set(prepared.raw["mr"])))
            return prepared
        grouped = self._subsample(datasets.Dataset.from_dict(group_references(self.load_split(name).to_dict())), split)
        with progress_bars_hidden():
            encoded = grouped.map(self.encode_eval, batched=True, with_indices=True)
        return encoded.with_format("torch", columns=EVAL_COLUMNS, output_all_columns=True)

    @property
    def prompt_format(self) -> PromptFormat:
        """The layout of prompts and targets for this tokenizer (built on first use)."""
        if self._format is None or self._format.tokenizer is not self.tokenizer:
            try:
                self._format = make_prompt_format(self.tokenizer, self.chat_template)
            except ValueError as error:
                raise ValueError(f"E2E: {error}") from error
        return self._format

    @property
    def stop_ids(self) -> list[int]:
        """Generation ends at any of these: the end of turn (the EOS for GPT-2), then the EOS if it differs."""
        return self.prompt_format.stop_ids

    @property
    def pad_id(self) -> int:
        """Padding id: the tokenizer's, or the stop token (GPT-2 has none); attention masks hide it."""
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]

    def _prompts(self, mrs: list[str]) -> list[list[int]]:
        prompts = self.prompt_format.prompts(mrs)
        longest = max(map(len, prompts))
        if longest >= self.max_length:
            raise ValueError(
                f"E2E: an MR of {longest} tokens leaves no room for its reference within max_length "
                f"{self.max_length}: raise data.max_length"
            )
        return prompts

    def encode(self, examples: dict[str, list]) -> dict[str, list]:
        """Prompt + target tokens; labels only on the target (the reference and its end of turn / EOS)."""
        targets = self.prompt_format.targets(examples["mr"], examples["ref"])
        input_ids, labels, cut = [], [], 0
        for prompt, target in zip(self._prompts(examples["mr"]), targets):
            cut += len(prompt) + len(target) > self.max_length
            input_ids.append((prompt + target)[: self.max_length])
            labels.append(([-100] * len(prompt) + target)[: self.max_length])
        self._warn_on_cut_references(cut, len(labels))
        return {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids], "labels": labels}

    def _warn_on_cut_references(self, cut: int, examples: int) -> None:
        """Warn (once) when training examples are cut at ``max_length``: a cut reference loses its EOS,
        so the model sees texts that end without stopping and learns less about when to stop. Checked
        as batches are tokenized (training rows are tokenized lazily), so it names the first batch's count."""
        if cut and not getattr(self, "_cut_warned", False):
            self._cut_warned = True
            rank_zero_warn(f"E2E: {cut} of {examples} training examples in a batch are longer than max_length "
                           f"{self.max_length} and are cut, losing their EOS: raise data.max_length")

    def encode_eval(self, examples: dict[str, list], indices: list[int]) -> dict[str, list]:
        """Prompts of the distinct MRs, with their index (the references stay as a column)."""
        prompts = self._prompts(examples["mr"])
        return {"input_ids": prompts, "attention_mask": [[1] * len(ids) for ids in prompts], "example_index": indices}

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """Right padding for training (labels -100), left padding for generation."""
        left = "labels" not in features[0]
        batch: dict[str, Any] = {
            "input_ids": pad_sequences([f["input_ids"] for f in features], self.pad_id, left),
            "attention_mask": pad_sequences([f["attention_mask"] for f in features], 0, left),
        }
        if left:
            batch["example_index"] = torch.stack([f["example_index"] for f in features])
            batch["references"] = [f["references"] for f in features]
        else:
            batch["labels"] = pad_sequences([f["labels"] for f in features], -100, left=False)
        return batch

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"e2e": E2EMetric(self.with_meteor)})

    def generate(self, model: Any, batch: dict[str, Any]) -> list[str]:
        """Beam-search outputs for a left-padded batch of prompts, stopped at the end of turn (EOS) and
        decoded up to the first special token (so no next turn's role header), whitespace runs (newlines
        too) collapsed to one space."""
        output = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=self.num_beams,
            length_penalty=self.length_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size,
            max_new_tokens=self.max_new_tokens, do_sample=False, eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )
        specials = special_ids(self.tokenizer)
        generated = output[:, batch["input_ids"].shape[1] :].tolist()
        return [answer_text(self.tokenizer, ids, specials) for ids in generated]  # one line each

    def predict_batch(self, module: LightningModule, batch: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
        """Each MR's index and generated output."""
        return batch["example_index"], self.generate(module.model, batch)

    def write_predictions(self, predictions: list[Any], indices: list[int], path: Path) -> None:
        """One output per line, in MR order."""
        outputs = {int(index): text for rows, texts in predictions for index, text in zip(rows, texts)}
        path.write_text("".join(f"{outputs[index]}\n" for index in sorted(outputs)), encoding="utf-8")

    def metric_inputs(self, outputs: Any, batch: dict[str, Any], module: LightningModule) -> tuple[Any, ...] | None:
        if "references" not in batch:
            return None
        return batch["example_index"], self.generate(module.model, batch), batch["references"]

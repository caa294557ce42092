"""Raw text for causal-LM pre-training: documents → tokens → fixed-length packed blocks.

Documents come from local files (``.txt``: one document per non-empty line; ``.jsonl``: one
JSON object per line with a text field; ``.csv`` / ``.tsv``: a text column, TSVs read with
quoting off as GLUE's must be) or from a hub dataset (``datasets.load_dataset``).
Each document's tokens are followed by the tokenizer's EOS, everything is concatenated and cut
into blocks of ``block_size`` tokens (the remainder is dropped), as GPT-2 / Cerebras-GPT
pre-training packs text. The packed blocks are cached on disk, keyed by the files (path, size,
modification time) or the dataset name, the tokenizer and every setting that changes them.

The held-out split is the validation files, the hub dataset's ``validation`` split, or a
seeded ``validation_fraction`` of the documents (whole documents, so no block straddles the
two splits); it reports ``val/loss`` (mean token cross-entropy) and ``val/perplexity``
(``exp`` of the token-weighted mean over the whole split).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import datasets
import torch
from lightning.pytorch import LightningModule
from torch.utils.data import Dataset
from torchmetrics import Metric, MetricCollection

from sparseft.datamodules.base import TextDataModule
from sparseft.datamodules.files import utf8_lines

TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
TABLE_SUFFIXES = (".csv", ".tsv")


def read_documents(path: Path, text_column: str = "text") -> list[str]:
    """Documents of one local file: non-empty lines of a text file, or a field of each JSONL line
    or CSV / TSV row.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: unknown suffix, undecodable or invalid JSON line, a record without a string
            ``text_column``, or no text at all (the message names the file and line).
    """
    if not path.is_file():
        raise FileNotFoundError(f"text corpus: no file {path}")
    if path.suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES + TABLE_SUFFIXES:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; use .txt (one document per line), .jsonl, "
                         ".csv or .tsv")
    documents = _table_column(path, text_column) if path.suffix in TABLE_SUFFIXES else _lines(path, text_column)
    documents = [document for document in documents if document.strip()]
    if not documents:
        raise ValueError(f"{path}: no text")
    return documents


def _lines(path: Path, text_column: str) -> list[str]:
    documents = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}: line {number}: not UTF-8 ({error.reason})") from None
            if not line:
                continue
            documents.append(line if path.suffix in TEXT_SUFFIXES else _json_text(line, path, number, text_column))
    return documents


def _table_column(path: Path, text_column: str) -> list[str]:
    tsv = path.suffix == ".tsv"
    reader = csv.reader(utf8_lines(path), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    header = next(reader, [])
    if text_column not in header:
        raise ValueError(f"{path}: line 1: no column {text_column!r} in the header {header}")
    column, documents = header.index(text_column), []
    for fields in reader:
        if len(fields) != len(header):
            raise ValueError(f"{path}: line {reader.line_num}: {len(fields)} fields, expected {len(header)}")
        documents.append(fields[column])
    return documents


def _json_text(line: str, path: Path, number: int, text_column: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {number}: not valid JSON ({error.msg}, column {error.colno})") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_column), str):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path}: line {number}: no string field {text_column!r} (found {found})")
    return record[text_column]


def pack_blocks(token_lists: list[list[int]], eos_id: int, block_size: int) -> torch.Tensor:
    """``[n_blocks, block_size]``: every document's tokens then EOS, concatenated, cut, remainder dropped."""
    flat = [token for tokens in token_lists for token in (*tokens, eos_id)]
    n_blocks = len(flat) // block_size
    if n_blocks == 0:
        raise ValueError(f"{len(flat)} tokens make no block of {block_size}: lower block_size or add text")
    return torch.tensor(flat[: n_blocks * block_size], dtype=torch.int32).view(n_blocks, block_size)


class PackedBlocks(Dataset):
    """Token blocks as causal-LM examples (``labels`` are the inputs; the model shifts them)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.blocks[index]


class Perplexity(Metric):
    """``exp(Σ token NLL / tokens)`` over a split, from each batch's mean loss and token count."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, mean_loss: torch.Tensor, tokens: torch.Tensor) -> None:
        # out of place: states reset under validate()'s inference mode cannot be updated in place later
        self.nll = self.nll + mean_loss.detach().double() * tokens
        self.tokens = self.tokens + tokens

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll / self.tokens.clamp(min=1)).float()


class RawTextDataModule(TextDataModule):
    """Raw-text corpus for causal-LM pre-training, packed into fixed-length blocks.

    Args:
        train_files: local ``.txt`` / ``.jsonl`` files or glob patterns (relative to ``data_dir``).
        validation_files: held-out files; None holds out ``validation_fraction`` of the documents.
        dataset: hub dataset name (used when no ``train_files``), e.g. ``wikitext``.
        dataset_config: its configuration, e.g. ``wikitext-103-raw-v1``.
        text_column: the text field of JSONL records and hub datasets.
        block_size: tokens per packed block (also the context of the FLOP count).
        validation_fraction: documents held out when there is no validation split.
        cache_dir: where packed blocks are cached (default ``$XDG_CACHE_HOME/sparseft/text``).
        **kwargs: the :class:`TextDataModule` arguments (``max_train_samples`` counts documents).
    """

    task_type = "causal-lm"
    dev_metric, dev_metric_mode = "perplexity", "min"
    local_data = "--data.train_files, local .txt / .jsonl / .tsv files (relative to --data.data_dir)"

    def __init__(
        self,
        train_files: str | list[str] | None = None,
        validation_files: str | list[str] | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        text_column: str = "text",
        block_size: int = 128,
        validation_fraction: float = 0.05,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs["max_length"] = block_size
        super().__init__(**kwargs)
        if not train_files and not dataset:
            raise ValueError("RawTextDataModule needs train_files (local .txt / .jsonl) or a hub dataset name")
        if not 0.0 < validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
        self.train_files, self.validation_files = train_files, validation_files
        self.dataset, self.dataset_config, self.text_column = dataset, dataset_config, text_column
        self.block_size, self.validation_fraction = block_size, validation_fraction
        default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparseft" / "text"
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache

    # ---- documents -------------------------------------------------------------------------
    def _paths(self, patterns: str | list[str]) -> list[Path]:
        root = Path(self.data_dir) if self.data_dir else Path()
        paths = []
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            full = str(root / pattern)
            matches = sorted(glob.glob(full)) if glob.has_magic(full) else [full]
            if not matches:
                raise FileNotFoundError(f"text corpus: {pattern!r} matches no file (in {root.resolve()})")
            paths += [Path(match) for match in matches]
        return paths

    def _held_out(self, documents: list[str], split: str) -> list[str]:
        order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(self.seed)).tolist()
        held = max(1, round(self.validation_fraction * len(documents)))
        if held >= len(documents):
            raise ValueError(f"{len(documents)} documents are too few to hold out {self.validation_fraction:.0%}")
        chosen = sorted(order[:held]) if split == "validation" else sorted(order[held:])
        return [documents[index] for index in chosen]

    def load_split(self, name: str) -> datasets.Dataset:
        """The documents of ``train`` or ``validation`` as a one-column (``text``) dataset."""
        if self.train_files:
            explicit = name == "validation" and self.validation_files
            files = self._paths(self.validation_files if explicit else self.train_files)
            documents = [doc for path in files for doc in read_documents(path, self.text_column)]
            if not self.validation_files:
                documents = self._held_out(documents, name)
        else:
            documents = self._hub_documents(name)
        return datasets.Dataset.from_dict({"text": documents})

    def _hub_documents(self, name: str) -> list[str]:
        with self.hub_dataset(self.dataset):
            splits = datasets.get_dataset_split_names(self.dataset, self.dataset_config)
            if name in splits:
                return self._hub_text(name)
            return self._held_out(self._hub_text("train"), name)

    def _hub_text(self, split: str) -> list[str]:
        loaded = datasets.load_dataset(self.dataset, self.dataset_config, split=split)
        return [text for text in loaded[self.text_column] if text and text.strip()]

    def setup(self, stage: str) -> None:
        if stage == "predict":
            raise ValueError(f"{type(self).__name__}: pre-training text has nothing to predict; sparseft validate "
                             "reports its loss and perplexity")
        super().setup(stage)

    # ---- tokens and cache ------------------------------------------------------------------
    def _cache_key(self, name: str) -> str:
        if self.train_files:
            files = self._paths(self.train_files)
            files += self._paths(self.validation_files) if self.validation_files else []
            source: Any = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        else:
            source = [self.dataset, self.dataset_config]
        tokenizer = self.tokenizer
        vocabulary = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else json.dumps(tokenizer.get_vocab())
        settings = [source, name, self.text_column, self.block_size, self.validation_fraction, self.seed,
                    self.max_train_samples, self.max_eval_samples, tokenizer.eos_token_id,
                    hashlib.sha256(vocabulary.encode()).hexdigest()]
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def _prepare(self, name: str, split: str) -> PackedBlocks:
        path = self.cache_dir / f"{name}-{self._cache_key(name)}.pt"
        if path.is_file():
            return PackedBlocks(torch.load(path))
        documents = list(self._subsample(self.load_split(name), split)["text"])
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {self.tokenizer_name!r} has no EOS token to separate documents with")
        tokens = []
        for start in range(0, len(documents), 1000):
            tokens += self.tokenizer(documents[start : start + 1000], add_special_tokens=False, verbose=False)[
                "input_ids"]
        try:
            blocks = pack_blocks(tokens, eos, self.block_size)
        except ValueError as error:
            raise ValueError(f"text corpus, {name} split: {error}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(blocks, partial)
        partial.replace(path)  # atomic: concurrent ranks never read half a file
        return PackedBlocks(blocks)

    def collate(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids = torch.stack(features).long()
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}

    # ---- metrics ---------------------------------------------------------------------------
    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"perplexity": Perplexity()})

    def metric_inputs(self, outputs: Any, batch: dict[str, Any], module: LightningModule) -> tuple[Any, ...] | None:
        if outputs.loss is None:
            return None
        predicted = batch["labels"][:, 1:].ne(-100).sum()  # the model predicts every token but the first
        return outputs.loss, predicted

"""``TextDataModule``: what every sparseft datamodule shares.

Tokenizer handling (a name or path, linked from the model by the CLI and loaded lazily),
hub-or-local loading per split, tokenization (evaluation splits with ``datasets.map`` at
setup, the training split batch by batch as the loader asks: :class:`EncodedOnDemand`),
subsampling for quick runs, dynamic padding, the dataloaders, and ``predict``'s outputs. A task
module implements:

* :meth:`load_split` — the raw ``datasets.Dataset`` of a split (hub or local files);
* :meth:`encode` — tokenized features (a batched ``map`` function);
* :meth:`build_metrics` — the task's official metrics, and ``dev_metric`` — the one to monitor;
* ``num_labels``, ``task_type`` and ``val_names`` — linked into the model by the CLI;
* for another output format than a TSV of labels: :meth:`predict_batch`, :meth:`write_predictions`
  and ``prediction_file`` (``prediction_files`` where predict writes several sets).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import datasets
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MetricCollection
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from sparseft.backbones.loading import load_tokenizer
from sparseft.datamodules.order import TrainingLoader, TrainingOrder


def logits_to_predictions(logits: torch.Tensor) -> torch.Tensor:
    """Class ids, or the regression value when there is a single output."""
    return logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)


def classification_metric_inputs(
    outputs: Any, batch: dict[str, torch.Tensor], module: LightningModule | None = None
) -> tuple[Any, ...] | None:
    """``(predictions, labels)`` from a classification / regression output, or None without labels."""
    if "labels" not in batch:
        return None
    return logits_to_predictions(outputs.logits), batch["labels"]


def class_predictions(module: LightningModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``predict`` outputs of a classification / regression batch: class ids or values."""
    return logits_to_predictions(module(**batch).logits)


def write_label_tsv(
    predictions: list[torch.Tensor], indices: list[int], path: Path, format_value: Callable[[Any], str] = str
) -> None:
    """GLUE's submission layout: a header, then ``index`` and the prediction (class id or regression
    value, written by ``format_value``) per example, tab-separated; ``indices`` are the dataset rows
    (0, 1, ... when empty)."""
    values = torch.cat([p.flatten() for p in predictions]).tolist() if predictions else []
    rows = ["index\tprediction"]
    rows += [f"{index}\t{format_value(value)}" for index, value in zip(indices or range(len(values)), values)]
    path.write_text("\n".join(rows) + "\n")


@contextmanager
def progress_bars_hidden() -> Iterator[None]:
    """Inside, ``datasets`` shows no progress bars (its switch is global: it is restored after)."""
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


class EncodedOnDemand(Dataset):
    """Raw rows, tokenized by ``encode`` when a batch asks for them (one feature per row).

    The training split is read whole but tokenized lazily, so a short run tokenizes only the
    batches it trains on. Row ``i`` is the same feature an eager ``datasets.map(encode)`` would
    give at ``i``, so the sampler's indices, and hence the batches, are unchanged.
    """

    def __init__(self, raw: datasets.Dataset, encode: Any) -> None:
        self.raw, self.encode = raw, encode

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """Rows ``indices`` tokenized in one call (the DataLoader fetches a batch this way)."""
        features = self.encode(self.raw[list(indices)])
        if any(len(values) != len(indices) for values in features.values()):
            raise ValueError(f"{type(self).__name__} needs one feature per row; tokenize this dataset eagerly")
        return [{key: torch.tensor(values[row]) for key, values in features.items()} for row in range(len(indices))]


STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",), "predict": ("predict",)}


class TextDataModule(LightningDataModule):
    """Base of the sparseft datamodules.

    Args:
        tokenizer: tokenizer name, directory or ``pkg:`` path. The CLI links it from
            ``model.backbone``, so it is rarely written by hand; it is loaded on first use,
            so it may also be assigned (``data.tokenizer = ...``) any time before ``setup``.
        data_dir: folder with the task's original files; None loads from the Hugging Face hub.
        max_length: longest tokenized input; longer inputs are truncated.
        batch_size: training batch size (per device).
        eval_batch_size: evaluation batch size (default: ``batch_size``).
        num_workers: dataloader worker processes (the training order and a resume do not depend on them).
        max_train_samples: use a random subset of this many training examples (quick runs).
        max_eval_samples: use the first this many evaluation examples (quick runs).
        seed: seed of the training subset choice and of the training shuffle order. The
            order has its own generator, so it is the same for every model and strategy
            (whatever random numbers their setup draws) and for every global seed. Epoch ``e``
            is shuffled with ``seed + e`` and, with several processes, sharded between them; a
            checkpoint records the position in the epoch, so ``--ckpt_path`` resumes at the next
            batch on every process (:mod:`sparseft.datamodules.order`).
        predict_split: what ``sparseft predict`` runs on: ``test`` (the task's test sets) or
            ``dev`` (the validation sets, labelled: to score the written predictions elsewhere),
            one file per set. None: ``test`` where the task has a test set, else ``dev``.
    """

    task_type: ClassVar[str] = "sequence-classification"
    #: the datasets ``predict_split: test`` loads; none where the task has no test set to predict
    test_names: ClassVar[tuple[str, ...]] = ("test",)
    #: the file ``sparseft predict`` writes in the run directory (:meth:`write_predictions`)
    prediction_file: ClassVar[str] = "predictions.tsv"
    #: whether each process of a multi-process predict can write its own file of the rows it saw
    predictions_per_rank: ClassVar[bool] = True
    #: the task's dev metric (a key of :meth:`build_metrics`' results) and whether higher is better
    dev_metric: ClassVar[str] = "accuracy"
    dev_metric_mode: ClassVar[Literal["max", "min"]] = "max"
    #: the options that read the data from local files instead of the hub, for the error when it is unreachable
    local_data: ClassVar[str] = "--data.data_dir, a folder of the task's original files"

    def __init__(
        self,
        tokenizer: str | None = None,
        data_dir: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 42,
        predict_split: Literal["test", "dev"] | None = None,
    ) -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"data.max_length {max_length}: inputs are cut to max_length tokens; give at least 1")
        for name, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if size is not None and size < 1:
                raise ValueError(f"data.{name} must be at least 1, got {size}")
        self.tokenizer_name = tokenizer
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.data_dir = data_dir
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.seed = seed
        self.predict_split = predict_split
        self.training_order = TrainingOrder(seed)
        self.datasets: dict[str, Dataset] = {}

    # ---- what a task implements ------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return 0

    @property
    def val_names(self) -> list[str]:
        """Names of the validation sets, one dataloader each."""
        return ["validation"]

    @property
    def monitor(self) -> str:
        """The dev metric as the module logs it (on the first dev set), for ``ModelCheckpoint(monitor=...)``."""
        names = self.val_names
        return ("val/" if len(names) == 1 else f"val/{names[0]}/") + self.dev_metric

    def split_names(self, split: str) -> list[str]:
        """Dataset names behind a logical split (``validation`` may be several sets; ``predict``'s are
        ``predict:<source>``, apart from the same sets prepared for evaluation)."""
        if split == "predict":
            return [f"predict:{source}" for source in self.predict_sources]
        return self.val_names if split in ("validation", "test") else [split]

    @staticmethod
    def _source(name: str) -> str:
        """The dataset that :meth:`split_names`' ``name`` loads (:meth:`load_split`'s name)."""
        return name.removeprefix("predict:")

    def load_split(self, name: str) -> datasets.Dataset:
        raise NotImplementedError

    def encode(self, examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        raise NotImplementedError

    def build_metrics(self) -> MetricCollection:
        raise NotImplementedError

    def metric_inputs(
        self, outputs: Any, batch: dict[str, torch.Tensor], module: LightningModule
    ) -> tuple[Any, ...] | None:
        """Arguments of ``metrics.update`` for one evaluation batch (None: nothing to score).

        ``outputs`` is the Hugging Face model output; ``module`` the LightningModule, for tasks
        that must generate. The default scores class ids (or the regression value) against
        ``labels``.
        """
        return classification_metric_inputs(outputs, batch, module)

    def predict_batch(self, module: LightningModule, batch: dict[str, Any]) -> Any:
        """``predict`` outputs of one batch (labels removed); :meth:`write_predictions` gets them all."""
        return class_predictions(module, batch)

    def write_predictions(self, predictions: list[Any], indices: list[int], path: Path) -> None:
        """Write every batch's :meth:`predict_batch` output of one predicted set to ``path`` (``indices``:
        the dataset rows), each prediction as :meth:`format_prediction` writes it."""
        write_label_tsv(predictions, indices, path, self.format_prediction)

    def format_prediction(self, value: Any) -> str:
        """One class id (or regression value) as :meth:`write_predictions` writes it: its label name
        where the task has ``label_names``, else as it is."""
        names = getattr(self, "label_names", None)
        return names[int(value)] if names and not isinstance(value, float) else str(value)

    @property
    def predict_sources(self) -> list[str]:
        """The datasets ``predict`` runs on, one dataloader and one file each: ``predict_split``
        resolved to dataset names (``dev``: every validation set)."""
        split = self.predict_split or ("test" if self.test_names else "dev")
        sources = list(self.val_names if split == "dev" else self.test_names)
        if not sources:
            other = "; set data.predict_split dev" if split == "test" else ""
            raise ValueError(f"{type(self).__name__} has no {split} set to predict{other}")
        return sources

    @property
    def prediction_files(self) -> list[str]:
        """The file ``predict`` writes for each of :attr:`predict_sources`, in order: ``prediction_file``,
        named after its set where there are several."""
        sources, file = self.predict_sources, Path(self.prediction_file)
        return [file.name] if len(sources) == 1 else [f"{file.stem}-{name}{file.suffix}" for name in sources]

    @contextmanager
    def hub_dataset(self, name: str) -> Iterator[None]:
        """Inside, ``datasets`` loads ``name`` from the hub; when it is neither cached nor reachable (no network,
        ``HF_DATASETS_OFFLINE=1``) the error is one line that names the local alternative (:attr:`local_data`)
        instead of a ``ConnectionError`` traceback."""
        try:
            yield
        except ConnectionError as error:
            raise FileNotFoundError(f"data: {name!r} is not in the local datasets cache and the hub cannot be "
                                    f"reached; offline, give {self.local_data}") from error

    # ---- shared machinery ------------------------------------------------------------------
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, loaded from ``tokenizer_name`` on first use (the CLI links the name late)."""
        if self._tokenizer is None:
            if not self.tokenizer_name:
                raise ValueError(
                    f"{type(self).__name__} has no tokenizer: set data.tokenizer, or model.backbone / "
                    "model.tokenizer, which the CLI links to it"
                )
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: str | PreTrainedTokenizerBase | None) -> None:
        """Take a name / path (loaded lazily) or a ready tokenizer object."""
        if isinstance(value, PreTrainedTokenizerBase):
            self.tokenizer_name, self._tokenizer = value.name_or_path, value
        else:
            self.tokenizer_name, self._tokenizer = value, None

    def _subsample(self, dataset: datasets.Dataset, split: str) -> datasets.Dataset:
        if split == "train" and self.max_train_samples and self.max_train_samples < len(dataset):
            return dataset.shuffle(seed=self.seed).select(range(self.max_train_samples))
        if split != "train" and self.max_eval_samples and self.max_eval_samples < len(dataset):
            return dataset.select(range(self.max_eval_samples))
        return dataset

    def _prepare(self, name: str, split: str) -> Dataset:
        raw = self._subsample(self.load_split(name), split)
        if len(raw) == 0:  # torch's sampler would fail later with no word of which data
            raise ValueError(f"{type(self).__name__}: {name!r} has no examples; check data.data_dir and its files")
        if split == "train":
            return EncodedOnDemand(raw, self.encode)
        with progress_bars_hidden():  # an evaluation set takes a second or two; its bar was noise in every log
            encoded = raw.map(self.encode, batched=True, remove_columns=raw.column_names)
        return encoded.with_format("torch")

    def check_room(self) -> None:
        """Refuse a ``max_length`` that the special tokens of a sentence pair fill: no text would be left."""
        special = self.tokenizer.num_special_tokens_to_add(pair=True)
        if self.max_length <= special:
            raise ValueError(
                f"data.max_length {self.max_length} leaves no room for text: the tokenizer adds {special} special "
                f"tokens to an input; raise data.max_length above {special}"
            )

    def setup(self, stage: str) -> None:
        self.check_room()
        if stage == "predict" and not self.predictions_per_rank and self.trainer and self.trainer.world_size > 1:
            raise ValueError(f"{type(self).__name__}: predict in one process (--trainer.devices 1); its outputs "
                             "need every example's features together")
        for split in STAGE_SPLITS.get(stage, ()):
            for name in self.split_names(split):
                if name not in self.datasets:
                    self.datasets[name] = self._prepare(self._source(name), split)

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = DataCollatorWithPadding(self.tokenizer)(features)
        if "labels" in batch and batch["labels"].is_floating_point():
            batch["labels"] = batch["labels"].float()  # regression targets match float32 logits
        return dict(batch)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if name not in self.datasets:
            raise RuntimeError(f"dataset {name!r} was not set up; call setup() for its stage first")
        dataset = self.datasets[name]
        # the order depends on ``seed``, the epoch and the process only; the loader's own generator (worker
        # seeds) keeps every loader from drawing on the global generator, which dropout uses
        sampler = self.training_order.sampler(len(dataset), self.batch_size, self.trainer) if shuffle else None
        return (TrainingLoader if shuffle else DataLoader)(
            dataset, batch_size=self.batch_size if shuffle else self.eval_batch_size, sampler=sampler,
            num_workers=self.num_workers, collate_fn=self.collate, generator=torch.Generator().manual_seed(self.seed),
        )

    def state_dict(self) -> dict[str, Any]:
        """Where the training loop is in the training order (Lightning saves it in checkpoints)."""
        return {"training_order": self.training_order.state_dict(self.trainer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.training_order.load_state_dict(state_dict.get("training_order"), self.trainer)

    def _loaders(self, split: str) -> DataLoader | list[DataLoader]:
        loaders = [self._loader(name, shuffle=False) for name in self.split_names(split)]
        return loaders[0] if len(loaders) == 1 else loaders

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._loaders("validation")

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._loaders("test")

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._loaders("predict")

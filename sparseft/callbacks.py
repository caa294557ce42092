"""Callbacks that are not sparsity strategies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """Write ``sparseft predict`` outputs as a TSV: ``index`` and ``prediction`` per example.

    Class ids become label names when the datamodule has ``label_names`` (GLUE's test-set
    submission format); regression values are written as numbers. With several processes each
    rank writes its own file, ``<stem>-rank<r>.tsv``, with the dataset indices it saw.

    Args:
        output_file: where to write; relative paths are under the trainer's ``default_root_dir``.
    """

    def __init__(self, output_file: str = "predictions.tsv") -> None:
        super().__init__(write_interval="epoch")
        self.output_file = output_file

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        path = Path(trainer.default_root_dir) / self.output_file
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}-rank{trainer.global_rank}{path.suffix}")
        names = getattr(trainer.datamodule, "label_names", None)
        rows = ["index\tprediction"]
        indices = [i for batch in (batch_indices[0] if batch_indices else []) for i in batch]
        values = torch.cat([p.flatten() for p in predictions]).tolist() if predictions else []
        for index, value in zip(indices or range(len(values)), values):
            label = names[int(value)] if names and not isinstance(value, float) else value
            rows.append(f"{index}\t{label}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rows) + "\n")

"""Datamodules: tokenizer handling and loaders in ``base``, one module per task family."""

from sparseft.datamodules.base import TextDataModule
from sparseft.datamodules.glue import GLUEDataModule

__all__ = ["GLUEDataModule", "TextDataModule"]

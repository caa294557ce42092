"""Datamodules: tokenizer handling and loaders in ``base``, one module per task family."""

from sparseft.datamodules.base import TextDataModule
from sparseft.datamodules.e2e import E2EDataModule
from sparseft.datamodules.glue import GLUEDataModule
from sparseft.datamodules.squad import SquadDataModule
from sparseft.datamodules.text import RawTextDataModule

__all__ = ["E2EDataModule", "GLUEDataModule", "RawTextDataModule", "SquadDataModule", "TextDataModule"]

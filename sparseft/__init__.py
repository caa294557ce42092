"""sparseft: sparse fine-tuning of pre-trained language models with PyTorch Lightning.

The public API: the module, the strategy base and registry, the built-in strategies, the
datamodules, the plain-PyTorch entry points of :mod:`sparseft.sparse` and the exports of
:mod:`sparseft.export`.
"""

from sparseft.datamodules import E2EDataModule, GLUEDataModule, RawTextDataModule, SquadDataModule, TextDataModule
from sparseft.export import export_pretrained, load_compressed, to_semi_structured
from sparseft.sparse import prune_, sparsify
from sparseft.strategies import (
    DSEE,
    PST,
    S2FT,
    SPDF,
    LoRA,
    Magnitude,
    Movement,
    SparsityStrategy,
    available_strategies,
    get_strategy,
    register_strategy,
)
from sparseft.training import SparseFTModule

__version__ = "0.1.0"

__all__ = [
    "DSEE", "PST", "S2FT", "SPDF", "E2EDataModule", "GLUEDataModule", "LoRA", "Magnitude", "Movement",
    "RawTextDataModule", "SparseFTModule", "SparsityStrategy", "SquadDataModule", "TextDataModule",
    "available_strategies", "export_pretrained", "get_strategy", "load_compressed", "prune_", "register_strategy",
    "sparsify", "to_semi_structured",
]

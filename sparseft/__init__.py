"""sparseft: sparse fine-tuning of pre-trained language models with PyTorch Lightning.

The public API: the module, the strategy base and registry, the built-in strategies, the
datamodules, and the plain-PyTorch entry points of :mod:`sparseft.sparse`.
"""

from sparseft.datamodules import E2EDataModule, GLUEDataModule, RawTextDataModule, SquadDataModule, TextDataModule
from sparseft.module import SparseFTModule
from sparseft.sparse import export_pretrained, prune_, sparsify
from sparseft.strategies import (
    DSEE,
    PST,
    S2FT,
    SPDF,
    Magnitude,
    Movement,
    SparsityStrategy,
    available_strategies,
    get_strategy,
    register_strategy,
)

__version__ = "0.1.0"

__all__ = [
    "DSEE", "PST", "S2FT", "SPDF", "E2EDataModule", "GLUEDataModule", "Magnitude", "Movement",
    "RawTextDataModule", "SparseFTModule", "SparsityStrategy", "SquadDataModule", "TextDataModule",
    "available_strategies", "export_pretrained", "get_strategy", "prune_", "register_strategy", "sparsify",
]

from sparseft.sparse.compressed import load_compressed  # noqa: E402  (kept apart from the list above)
from sparseft.sparse.semi_structured import to_semi_structured  # noqa: E402

__all__ += ["load_compressed", "to_semi_structured"]

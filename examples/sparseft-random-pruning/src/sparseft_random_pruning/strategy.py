"""``RandomPruning``: every target weight gets a fixed random score; the mask keeps the top ones."""

from __future__ import annotations

import zlib

import torch

from sparseft.sparse.parametrize import SparseLayer
from sparseft.sparse.schedules import SparsitySchedule
from sparseft.sparse.targets import TargetSpec
from sparseft.strategies import SparsityStrategy


class RandomPruning(SparsityStrategy):
    """Prune target weights at random: the floor any pruning criterion should beat.

    Each weight's score is drawn once from ``seed`` and the layer's name, so the masks are the
    same on every DDP rank, on every device and after a resume, with no state to save, and they
    are nested: a weight pruned at a lower sparsity stays pruned as the schedule raises it.

    Runs on: ``on_train_batch_start`` (the base class updates the masks when the scheduled
    sparsity changes); nothing else is needed.

    Args:
        sparsity: final fraction of target weights removed, in [0, 1).
        targets: layers to prune: role names (``q``, ``ffn_in``, ...) or regular expressions
            matching whole module names. Default: every linear of the transformer blocks.
        schedule: how sparsity grows over training (default: cubic).
        seed: seed of the random scores.
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        targets: TargetSpec = None,
        schedule: SparsitySchedule | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(sparsity, targets, schedule)
        self.seed = seed

    def layer_scores(self, layer: SparseLayer) -> torch.Tensor:
        """Scores of one layer, ``[out, in]``, on the mask's device."""
        # drawn by a CPU generator (the same numbers whatever the device), then moved to the mask's
        # device: a CPU tensor times a CUDA mask would fail
        generator = torch.Generator().manual_seed(self.seed + zlib.crc32(layer.name.encode()))
        return torch.rand(layer.mask.shape, generator=generator).to(layer.mask.device)

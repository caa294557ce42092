"""Learned importance scores, one per weight (movement pruning's ``mask_scores``)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

ScoreInit = Literal["constant", "uniform", "kaiming"]


def initial_scores(shape: tuple[int, int], init: ScoreInit = "constant", scale: float = 0.0) -> torch.Tensor:
    """Scores at the start of training, as emmental's ``init_mask``.

    ``constant``: every score ``scale`` (the paper uses 0); ``uniform``: U(-scale, scale);
    ``kaiming``: kaiming-uniform with a = sqrt(5), like ``nn.Linear`` weights.
    """
    scores = torch.empty(shape)
    if init == "constant":
        return nn.init.constant_(scores, scale)
    if init == "uniform":
        return nn.init.uniform_(scores, -scale, scale)
    if init == "kaiming":
        return nn.init.kaiming_uniform_(scores, a=math.sqrt(5))
    raise ValueError(f"unknown score init {init!r}; use constant, uniform or kaiming")


class LearnedScores(nn.Module):
    """A score per weight, used by the mask through a straight-through estimator.

    With ``W' = M(S) ⊙ W`` and an identity backward for ``M``, ``∂L/∂S = ∂L/∂W' ⊙ W``: under
    SGD, ``S`` accumulates ``-W · ∂L/∂W``, the weights' *movement* away from zero
    (Sanh et al. 2020, eq. 3).
    """

    def __init__(self, shape: tuple[int, int], init: ScoreInit = "constant", scale: float = 0.0) -> None:
        super().__init__()
        self.scores = nn.Parameter(initial_scores(shape, init, scale))
        self.scale = scale
        #: parameters whose start :meth:`reset_empty_` sets once they have storage: a constant start can be
        #: (sharded loading then creates the scores on the meta device, so no process holds all of them); a
        #: random one could not be drawn again identically
        self.empty_start = ("scores",) if init == "constant" else ()

    @torch.no_grad()
    def reset_empty_(self) -> None:
        """The constant start: every score ``scale``, on whatever shard this process holds."""
        self.scores.fill_(self.scale)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.scores

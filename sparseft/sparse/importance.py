"""PST's importance score: data-free magnitude plus a factorized data-driven part."""

from __future__ import annotations

import torch
from torch import nn


class PSTImportance(nn.Module):
    """``S = |W_eff| + α1·A·B + α2·(R·1ᵀ + 1·Cᵀ)`` (Li et al. 2022, eq. 6-8).

    ``|W_eff|`` is the magnitude of the *updated* weight ``W0 + β·U·V`` and carries gradient
    into U and V. The data-driven part replaces movement pruning's dense score matrix by a
    rank-``r`` product ``A·B`` (A ~ N(0, 1), B = 0) plus a row vector R and a column vector C
    (both 0), so at step 0 the score is pure magnitude. Used with the straight-through mask,
    ``∂L/∂S = (∂L/∂W') ⊙ W_eff``: A·B receives α1 times it, R and C α2 times its row and
    column sums.

    ``|W_eff|`` is computed without autograd (``magnitude_term``): the straight-through mask
    adds its gradient into ``W_eff`` itself, ``sgn(W_eff) ⊙ ∂L/∂S = (∂L/∂W') ⊙ |W_eff|``, so
    the step needs no sign, product and sum temporaries of full size. Use the module inside
    that mask (as :class:`~sparseft.sparse.parametrize.SparseWeight` does) for gradients
    into ``W_eff``; the parameters A, B, R and C get theirs from autograd either way.

    The score is computed in float32 whatever the weight's and the factors' dtype: under
    ``bf16-mixed`` autocast hands ``W_eff`` over in bfloat16 while A, B, R and C stay float32
    (``addmm_`` refuses the mix), and under ``bf16-true`` a bfloat16 score (8 bits of mantissa)
    would tie many entries at the top-k threshold. Gradients reach A, B, R and C in their own dtype.

    Args:
        shape: ``(out_features, in_features)``.
        rank: ``r_m``, the rank of ``A·B``.
        alpha1: weight of the low-rank part.
        alpha2: weight of the row and column part.
    """

    magnitude_term = True

    def __init__(self, shape: tuple[int, int], rank: int = 8, alpha1: float = 1.0, alpha2: float = 1.0) -> None:
        super().__init__()
        out_features, in_features = shape
        self.alpha1, self.alpha2 = alpha1, alpha2
        self.A = nn.Parameter(torch.randn(out_features, rank))
        self.B = nn.Parameter(torch.zeros(rank, in_features))
        self.R = nn.Parameter(torch.zeros(out_features))
        self.C = nn.Parameter(torch.zeros(in_features))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The float32 score in one full-size buffer: the data-driven part is the rank-``(r+2)``
        product ``[α1·A, α2·R, α2·1] · [B; 1ᵀ; Cᵀ]``, added to ``|W_eff|`` in place by ``addmm_``."""
        a, b, r, c = (factor.float() for factor in (self.A, self.B, self.R, self.C))
        ones_column = r.new_ones(r.shape[0], 1)
        ones_row = c.new_ones(1, c.shape[0])
        left = torch.cat([self.alpha1 * a, self.alpha2 * r.unsqueeze(1), self.alpha2 * ones_column], dim=1)
        right = torch.cat([b, ones_row, c.unsqueeze(0)], dim=0)
        magnitude = weight.detach().to(torch.float32, copy=True).abs_()  # one full-size copy, in float32
        return magnitude.addmm_(left, right)

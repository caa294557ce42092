"""Sparse + low-rank decomposition of a weight, and the support Ω of DSEE's sparse update.

DSEE (Chen et al., ACL 2023, eq. 2) decomposes a pre-trained matrix ``W ≈ U·V + S`` with
GreBsmo (Zhou & Tao, 2013), a robust PCA that grows the rank of ``U·V`` greedily and keeps
``S`` sparse, and trains a sparse update on the positions of the largest ``|S|``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sparseft.sparse.masks import keep_highest

SupportMethod = Literal["grebsmo", "magnitude", "random"]


@dataclass(frozen=True)
class Decomposition:
    """``W ≈ left @ right + sparse``; ``left`` has orthonormal columns."""

    left: torch.Tensor
    right: torch.Tensor
    sparse: torch.Tensor

    def residual(self, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.left @ self.right - self.sparse


def keep_largest(matrix: torch.Tensor, count: int) -> torch.Tensor:
    """``matrix`` with all but its ``count`` largest-magnitude entries set to zero (ties by index)."""
    return matrix * keep_highest(matrix.abs(), matrix.numel() - count)


@torch.no_grad()
def grebsmo(
    weight: torch.Tensor,
    rank: int,
    cardinality: int | None = None,
    threshold: float = 0.01,
    step: int = 5,
    outer_iters: int = 30,
    inner_iters: int = 2,
    generator: torch.Generator | None = None,
) -> Decomposition:
    """GreBsmo-style robust PCA: ``W ≈ U·V + S`` with ``rank(U·V) <= rank`` and ``S`` sparse.

    Alternates, ``inner_iters`` times per outer iteration (DSEE's reference code, ``run_glue.py``)::

        U ← QR((W − S)·Vᵀ).Q;   V ← Uᵀ·(W − S);   S ← P(W − U·V)

    then appends ``step`` rows to ``V`` from a bilateral sketch of the residual
    ``E = W − U·V − S`` (the greedy rank increment), until ``rank`` is reached. ``V`` starts as
    one random row. ``P`` keeps the ``cardinality`` largest entries when it is given (the
    ``card(S) ≤ k`` constraint of GreBsmo), else hard-thresholds ``|·| < threshold`` to zero as
    the reference does (0.01).

    Args:
        weight: ``[out, in]`` matrix.
        rank: final rank of ``U·V`` (capped at ``min(out, in)``).
        cardinality: number of non-zeros of ``S``; None to threshold instead.
        threshold: hard threshold on ``S`` when ``cardinality`` is None.
        step: rank added per outer iteration.
        outer_iters: outer iterations (the rank stops growing once reached).
        inner_iters: alternating updates per outer iteration.
        generator: random source of the initial row and the sketches.
    """
    matrix = weight.detach().float()
    rank = max(1, min(rank, *matrix.shape))
    right = torch.randn(1, matrix.shape[1], generator=generator, device=matrix.device)
    sparse = torch.zeros_like(matrix)
    for outer in range(outer_iters):
        for _ in range(inner_iters):
            left = torch.linalg.qr((matrix - sparse) @ right.T).Q
            right = left.T @ (matrix - sparse)
            rest = matrix - left @ right
            sparse = keep_largest(rest, cardinality) if cardinality is not None else rest * (rest.abs() >= threshold)
        grow = min(step, rank - right.shape[0])
        if grow > 0 and outer < outer_iters - 1:
            right = torch.cat([right, _sketch_rows(matrix - left @ right - sparse, grow, generator)])
    return Decomposition(left, right, sparse)


def _sketch_rows(residual: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` rows spanning (approximately) the residual's dominant row space: a bilateral
    random projection ``Qᵀ·E`` with ``Q`` an orthonormal basis of ``E·G``, G Gaussian."""
    probe = torch.randn(residual.shape[1], count, generator=generator, device=residual.device)
    basis = torch.linalg.qr(residual @ (residual.T @ (residual @ probe))).Q
    return basis.T @ residual


@torch.no_grad()
def sparse_support(
    weight: torch.Tensor,
    count: int,
    method: SupportMethod = "grebsmo",
    rank: int = 16,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sorted flat indices Ω of ``count`` positions of ``weight`` (``[out, in]``) for a sparse update.

    * ``grebsmo``: the ``count`` largest ``|S|`` of ``W ≈ U·V + S`` (:func:`grebsmo` with
      ``card(S) = count``): positions a rank-``rank`` structure does not explain (DSEE's default);
    * ``magnitude``: the ``count`` largest ``|W|`` (the reference's ``omp``);
    * ``random``: uniformly random positions (the reference's ``rp``).

    Ties are broken by position, so the result is deterministic for a given generator.
    """
    numel = weight.numel()
    if not 0 <= count <= numel:
        raise ValueError(f"support size must be in [0, {numel}], got {count}")
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=weight.device)
    if method == "random":
        chosen = torch.randperm(numel, generator=generator)[:count].to(weight.device)
        return chosen.sort().values
    if method == "magnitude":
        scores = weight.detach().abs()
    elif method == "grebsmo":
        scores = grebsmo(weight, rank, cardinality=count, generator=generator).sparse.abs()
    else:
        raise ValueError(f"unknown support method {method!r}; use grebsmo, magnitude or random")
    keep = keep_highest(scores, numel - count)
    return keep.flatten().nonzero().flatten()

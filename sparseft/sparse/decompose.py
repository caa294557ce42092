"""Sparse + low-rank decomposition of a weight, and the support Ω of DSEE's sparse update.

DSEE (Chen et al., ACL 2023, eq. 2) decomposes a pre-trained matrix ``W ≈ U·V + S``, low-rank
plus sparse, with GreBsmo (Zhou & Tao, 2013), a robust PCA that grows the rank of ``U·V``
greedily, and trains a sparse update on the positions of the N largest ``|S|``. Two solvers:

* :func:`grebsmo` (``support: grebsmo``, the default): the rank capped at ``r`` (16) and ``S``
  projected on its N largest entries in every step (``card(S) = N``, GoDec's projection), so
  Ω always has N entries. sparseft's reading of the method, *not* the reference's loop.
* :func:`grebsmo_reference` (``support: grebsmo_reference``): the loop of VITA-Group/DSEE's
  ``run_glue.py`` step for step, with its support rule :func:`kthvalue_support`.

Neither uses the soft threshold ``S_λ`` that the paper writes for GreBsmo's S-step; the reference
code hard-thresholds at 0.01. docs/strategies/dsee.md lists every difference between the two, with measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sparseft.sparse.masks import keep_highest

SupportMethod = Literal["grebsmo", "grebsmo_reference", "magnitude", "random"]


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
    """GreBsmo-style robust PCA: ``W ≈ U·V + S`` with ``rank(U·V) <= rank`` and ``card(S) <= cardinality``.

    sparseft's solver of DSEE's decomposition (the default support); it shares the alternating
    updates with the reference but is a different algorithm (see :func:`grebsmo_reference`).
    ``V`` starts as one random row and ``S = 0``; each outer iteration runs ``inner_iters`` of::

        U ← QR((W − S)·Vᵀ).Q;   V ← Uᵀ·(W − S);   S ← P(W − U·V)

    carrying ``S`` over from the previous outer iteration, then appends ``step`` rows to ``V``
    (the greedy rank increment) from a bilateral random sketch of the residual
    ``E = W − U·V − S`` (:func:`_sketch_rows`; GreBsmo also sketches randomly), until the
    rank reaches ``rank``. ``P`` keeps the ``cardinality`` largest entries when it is given
    (``card(S) ≤ cardinality``, GoDec's projection), else sets ``|·| < threshold`` to zero (a hard
    threshold, as the reference does, inside this loop).

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
    random projection ``Qᵀ·E`` with ``Q`` an orthonormal basis of ``E·Eᵀ·E·G`` (one power
    iteration), G Gaussian."""
    probe = torch.randn(residual.shape[1], count, generator=generator, device=residual.device)
    basis = torch.linalg.qr(residual @ (residual.T @ (residual @ probe))).Q
    return basis.T @ residual


@torch.no_grad()
def grebsmo_reference(
    weight: torch.Tensor,
    outer_iters: int = 100,
    inner_iters: int = 2,
    step: int = 5,
    threshold: float = 0.01,
    generator: torch.Generator | None = None,
) -> Decomposition:
    """The GreBsmo loop of VITA-Group/DSEE (``run_glue.py``, ``sparse_method == 'grebsmo'``), exactly.

    Step for step the reference's code for one matrix (its ``torch.qr`` is the reduced QR used
    here); tests/test_decompose.py checks it against a literal transcription of that loop.

    ``U ~ randn(out, 1)`` and ``V ~ randn(1, in)`` are drawn in that order (``U`` is overwritten
    before it is used, as in the reference). Then ``outer_iters`` times (the reference: 100)::

        S ← 0                                            # reset every outer iteration
        inner_iters times (2):
            U ← QR((W − S)·Vᵀ).Q;   V ← Uᵀ·(W − S)
            S ← W − U·V;   S[|S| < threshold] ← 0        # hard threshold 0.01
        E ← W − U·V − S
        V ← [V; QR(E).R[:step]]                          # rank + 5, no cap

    The rank of ``U·V`` at the last inner step is ``min(1 + step·(outer_iters − 1), out, in)``:
    496 on BERT-base's 768×768. On any matrix with a side of 496 or less (MiniLM's 384×384) it
    saturates: ``U·V`` reproduces ``W − S``, so ``S`` is 0 and :func:`kthvalue_support` keeps
    every entry. The rows appended after the last iteration are never used and are not returned.

    Args:
        weight: ``[out, in]`` matrix.
        outer_iters: outer iterations (the reference's 100).
        inner_iters: alternating updates per outer iteration (2).
        step: rows appended to ``V`` per outer iteration (5).
        threshold: entries of ``S`` with ``|S| < threshold`` are zeroed (0.01).
        generator: random source of the initial ``U`` and ``V`` (the reference: the global RNG).
    """
    matrix = weight.detach().float()
    torch.randn(matrix.shape[0], 1, generator=generator)  # the reference's unused initial U
    right = torch.randn(1, matrix.shape[1], generator=generator).to(matrix.device)
    for _ in range(outer_iters):
        sparse = torch.zeros_like(matrix)
        for _ in range(inner_iters):
            left = torch.linalg.qr((matrix - sparse) @ right.T).Q
            right = left.T @ (matrix - sparse)
            sparse = matrix - left @ right
            sparse[sparse.abs() < threshold] = 0
        residual = matrix - left @ right - sparse
        right = torch.cat([right, torch.linalg.qr(residual).R[:step]], 0)
    return Decomposition(left, right[: left.shape[1]], sparse)


def kthvalue_support(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted flat indices of ``scores >= t``, ``t`` the ``(numel − count + 1)``-th smallest score:
    the reference's rule (``torch.kthvalue`` then ``>=``). It keeps every entry tied with ``t``,
    so it selects more than ``count`` positions on ties, and all of them when ``scores`` is 0."""
    flat = scores.detach().flatten()
    threshold = flat.kthvalue(flat.numel() - count + 1).values
    return (flat >= threshold).nonzero().flatten()


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
      ``card(S) = count``): positions a rank-``rank`` structure does not explain (the default);
    * ``grebsmo_reference``: the reference's loop (:func:`grebsmo_reference`, ``rank`` unused)
      and its ``kthvalue >=`` rule (:func:`kthvalue_support`), which returns *more* than
      ``count`` positions on ties, and every position when that loop's ``S`` is 0;
    * ``magnitude``: the ``count`` largest ``|W|`` (the reference's ``omp``);
    * ``random``: uniformly random positions (the reference's ``rp``).

    Except for ``grebsmo_reference``, exactly ``count`` positions, ties broken by position, so
    the result is deterministic for a given generator.
    """
    numel = weight.numel()
    if not 0 <= count <= numel:
        raise ValueError(f"support size must be in [0, {numel}], got {count}")
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=weight.device)
    if method == "random":
        chosen = torch.randperm(numel, generator=generator)[:count].to(weight.device)
        return chosen.sort().values
    if method == "grebsmo_reference":
        return kthvalue_support(grebsmo_reference(weight, generator=generator).sparse.abs(), count)
    if method == "magnitude":
        scores = weight.detach().abs()
    elif method == "grebsmo":
        scores = grebsmo(weight, rank, cardinality=count, generator=generator).sparse.abs()
    else:
        raise ValueError(f"unknown support method {method!r}; use grebsmo, grebsmo_reference, magnitude or random")
    keep = keep_highest(scores, numel - count)
    return keep.flatten().nonzero().flatten()

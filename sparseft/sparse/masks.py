"""Masks from importance scores: exact top-k (per layer or global) and N:M (per group of M inputs).

All functions are pure: scores in, boolean keep-masks out (``True`` = weight kept). Scores
are ``[out, in]`` tensors, larger = more important.

Exactness matters: ``topk_mask(s, 0.9)`` prunes exactly ``pruned_count(numel, 0.9)``
weights, however many scores tie; how that count rounds follows each method's reference
(:func:`pruned_count`). Ties are broken deterministically by flat index (the
lower index is pruned first), so every DDP rank, and every resumed run, gets the same mask.
On the CPU the threshold comes from NumPy's introselect (``np.partition``): the whole top-k
of a 1536×384 score matrix takes 0.56 ms, against 5.5 ms with torch's ``kthvalue`` and 57 ms
with an argsort, the reference implementations' method (``benchmarks/selection.py``, 2
threads). On a GPU it is one stable radix sort: CUDA's
``kthvalue`` on one large slice runs in a single thread block (on an H100 shared by six runs,
magnitude pruning's steps took 0.21 s with it against 0.05 s with the sort), and the sort needs
no host synchronisation. Both give the same mask.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch


def check_sparsity(sparsity: float) -> float:
    """Validate a sparsity fraction; sparsity 1.0 would remove whole layers, so it is refused."""
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}: it is the fraction of weights removed")
    return float(sparsity)


CountRule = Literal["round", "floor", "keep_floor"]


def pruned_count(numel: int, sparsity: float, rule: CountRule = "round") -> int:
    """How many of ``numel`` weights a sparsity prunes, by the rule of a method's reference code.

    * ``round``: ``round(numel·s)``, as ``torch.nn.utils.prune`` (``L1Unstructured``,
      ``global_unstructured``): the magnitude baseline and DSEE's pruning; the default.
    * ``floor``: ``int(numel·s)``, as PST's ``SparseBinarizer`` (0.29·100 = 28.999... prunes 28).
    * ``keep_floor``: ``numel − int((1−s)·numel)``, as movement pruning's ``TopKBinarizer``, which
      keeps ``int(kept·numel)`` of the kept fraction it is given. sparseft is given ``s``, and
      ``1 − s`` carries float error (``1 − 0.9 = 0.09999999999999998``), so a tolerance of 1e-6
      recovers the reference's count (1000 weights at 90% keep 100, as the reference's 0.1 does).
    """
    sparsity = check_sparsity(sparsity)
    if rule == "round":
        return round(numel * sparsity)
    if rule == "floor":
        return int(numel * sparsity)
    if rule == "keep_floor":
        return numel - int(numel * (1.0 - sparsity) + 1e-6)
    raise ValueError(f"unknown pruned-count rule {rule!r}; use round, floor or keep_floor")


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The exact ``k``-th smallest value (1-based) of a 1-D CPU tensor, as a 0-d tensor.

    NumPy's introselect partitions a copy; ``bfloat16`` (which NumPy lacks) is widened to
    ``float32`` first, exactly and order-preserving.
    """
    values = flat.numpy() if flat.dtype in (torch.float32, torch.float64, torch.float16) else flat.float().numpy()
    return torch.from_numpy(np.partition(values, k - 1)[k - 1 : k]).to(flat.dtype).squeeze(0)


def keep_highest_by_sort(flat: torch.Tensor, pruned: int) -> torch.Tensor:
    """Keep-mask of a 1-D tensor dropping its ``pruned`` lowest entries, by one stable sort (the GPU path).

    A stable sort keeps equal scores in index order, so ties are broken by flat index exactly
    as :func:`keep_highest` does on the CPU.
    """
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[:pruned]] = False
    return keep


def keep_highest(scores: torch.Tensor, pruned: int) -> torch.Tensor:
    """Keep-mask (same shape) dropping the ``pruned`` lowest scores; among equal scores the
    lower flat index is dropped first."""
    flat = scores.detach().flatten()
    numel = flat.numel()
    if pruned <= 0 or pruned >= numel:
        return torch.full(scores.shape, pruned <= 0, dtype=torch.bool, device=scores.device)
    if flat.is_cuda:
        return keep_highest_by_sort(flat, pruned).view_as(scores)
    threshold = kth_smallest(flat, pruned)
    keep = flat > threshold
    tied_to_keep = numel - pruned - int(keep.count_nonzero())
    if tied_to_keep:  # the threshold value occurs more than once: keep its highest-indexed copies
        tied = flat == threshold
        keep |= tied & (tied.cumsum(0) > int(tied.count_nonzero()) - tied_to_keep)
    return keep.view_as(scores)


def topk_mask(scores: torch.Tensor, sparsity: float, row_blocks: int = 1, rule: CountRule = "round") -> torch.Tensor:
    """Keep-mask of one layer that prunes exactly ``pruned_count(numel, sparsity, rule)`` lowest scores.

    ``row_blocks > 1`` splits the rows into that many equal matrices ranked separately: a
    fused projection such as GPT-2's ``c_attn`` (``[q; k; v]``) is pruned as three matrices.
    """
    if row_blocks == 1:
        return keep_highest(scores, pruned_count(scores.numel(), sparsity, rule))
    if scores.shape[0] % row_blocks:
        raise ValueError(f"cannot split {scores.shape[0]} rows into {row_blocks} equal blocks")
    return torch.cat([topk_mask(block, sparsity, rule=rule) for block in scores.chunk(row_blocks, dim=0)])


def global_topk_masks(scores: list[torch.Tensor], sparsity: float, rule: CountRule = "round") -> list[torch.Tensor]:
    """Keep-masks for several layers ranked together: one threshold over all their scores.

    The total number pruned is exact; layers end up with different sparsities.
    """
    flat = torch.cat([score.detach().flatten().float() for score in scores])
    keep = topk_mask(flat, sparsity, rule=rule)
    return [part.view_as(score) for part, score in zip(keep.split([s.numel() for s in scores]), scores)]


def threshold_mask(scores: torch.Tensor, threshold: float, min_keep_fraction: float = 0.005) -> torch.Tensor:
    """Keep-mask ``scores > threshold``, but never fewer than ``int(min_keep_fraction·numel) + 1``.

    Soft movement pruning thresholds ``σ(S)``; the floor (emmental's ThresholdBinarizer, 0.5%
    per matrix) keeps a layer from being emptied by a global threshold.
    """
    keep = scores.detach() > threshold
    floor = int(min_keep_fraction * scores.numel()) + 1
    if int(keep.sum()) < floor:
        return keep_highest(scores, scores.numel() - floor)
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask: in every group of ``m`` consecutive inputs of a row, keep the ``n`` largest.

    This is the pattern of NVIDIA's 2:4 sparse tensor cores (``n=2, m=4``) along the input
    dimension of an ``[out, in]`` weight, the layout ``torch.sparse.to_sparse_semi_structured``
    takes for an ``nn.Linear`` weight. Ties are broken towards the lower index.
    """
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity needs 0 < n < m, got {n}:{m}")
    return group_topk_mask(scores, n, m)


def group_topk_mask(scores: torch.Tensor, kept: int, m: int) -> torch.Tensor:
    """Keep-mask keeping the ``kept`` largest scores of every group of ``m`` consecutive inputs.

    The shared selection of every N:M mask, final (``kept = n``) or on the way there
    (:func:`nm_kept_per_group`); ``kept = m`` keeps everything. Among equal scores the lower
    index is kept, so every rank and every resumed run gets the same mask.

    Each entry's rank in its group is counted with ``m·(m−1)`` elementwise comparisons of
    whole columns rather than by sorting ``numel/m`` tiny groups: the same mask (ties included)
    for a fraction of the time (a 1536×384 matrix, 2:4, one CPU thread: about 4x less than a
    stable ``torch.sort`` along the groups).
    """
    if not 0 < kept <= m:
        raise ValueError(f"a group of {m} keeps between 1 and {m} weights, got {kept}")
    out_features, in_features = scores.shape
    if in_features % m:
        raise ValueError(f"N:M sparsity with m={m} needs in_features divisible by {m}, got {in_features}")
    if kept == m:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    columns = scores.detach().reshape(out_features, in_features // m, m).unbind(-1)
    keep = []
    for i, score in enumerate(columns):
        rank = torch.zeros(score.shape, dtype=torch.int16, device=score.device)  # entries ranked above it
        for j, other in enumerate(columns):
            if j != i:
                rank += (other >= score) if j < i else (other > score)  # an equal score before it wins
        keep.append(rank < kept)
    return torch.stack(keep, dim=-1).view_as(scores)


def nm_kept_per_group(sparsity: float, n: int, m: int) -> int:
    """Weights each group of ``m`` keeps at a scheduled ``sparsity`` on the way to N:M.

    ``k(s) = m − ⌊s·m⌋`` for ``0 ≤ s ≤ 1 − n/m``: the group sparsity ``(m − k)/m`` is the
    largest multiple of ``1/m`` not above ``s`` (a group cannot prune a fraction of a weight), so
    the masks never run ahead of the schedule and reach exactly ``n`` of ``m`` at the final
    sparsity ``1 − n/m``. With 2:4 on a ramp: 4 kept below s = 0.25, 3 from 0.25, 2 at 0.5.

    Raises:
        ValueError: ``s`` above ``1 − n/m``, which N:M cannot reach.
    """
    sparsity = check_sparsity(sparsity)
    if sparsity > 1.0 - n / m + 1e-9:
        raise ValueError(f"pattern {n}:{m} prunes at most {1 - n / m:g} of the weights, asked for sparsity {sparsity}")
    return m - int(sparsity * m + 1e-9)  # 1e-9: 0.75·4 computed as 2.9999... still prunes 3


def sparsity_of(mask: torch.Tensor) -> float:
    """Fraction of ``False`` (pruned) entries in a keep-mask."""
    return 1.0 - float(mask.sum()) / mask.numel()

"""GreBsmo-style decomposition and the support Ω of DSEE's sparse update."""

from __future__ import annotations

import pytest
import torch

from sparseft.sparse.decompose import grebsmo, keep_largest, sparse_support

# Stated tolerance: on an exactly low-rank + sparse matrix the decomposition reconstructs W
# to a relative Frobenius error below 1e-5 and recovers both parts.
TOLERANCE = 1e-5


def planted(rows: int = 60, cols: int = 40, rank: int = 4, spikes: int = 30, seed: int = 0):
    """``W = L0 + S0``: a rank-``rank`` matrix plus ``spikes`` entries of magnitude 3 to 5."""
    generator = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator)
    support = torch.randperm(rows * cols, generator=generator)[:spikes].sort().values
    sparse = torch.zeros(rows * cols)
    signs = torch.randn(spikes, generator=generator).sign()
    sparse[support] = (3 + 2 * torch.rand(spikes, generator=generator)) * signs
    return low_rank, sparse.view(rows, cols), support


def test_keep_largest_keeps_exactly_count_entries_breaking_ties_by_position():
    matrix = torch.tensor([[1.0, -3.0, 2.0], [-2.0, 0.5, 3.0]])
    # |.| = [1, 3, 2, 2, .5, 3]; keep 3 -> both 3s and one 2: the later 2 (position 3) survives
    assert keep_largest(matrix, 3).tolist() == [[0.0, -3.0, 0.0], [-2.0, 0.0, 3.0]]


def test_reconstructs_planted_low_rank_plus_sparse_within_tolerance():
    low_rank, sparse, support = planted()
    weight = low_rank + sparse
    parts = grebsmo(weight, rank=4, cardinality=30, generator=torch.Generator().manual_seed(1))
    assert parts.residual(weight).norm() / weight.norm() < TOLERANCE
    assert (parts.left @ parts.right - low_rank).norm() / low_rank.norm() < TOLERANCE
    assert torch.equal(parts.sparse.flatten().nonzero().flatten(), support)  # the planted support
    assert torch.allclose(parts.left.T @ parts.left, torch.eye(4), atol=1e-5)  # orthonormal U
    assert parts.right.shape == (4, 40)


def test_support_of_the_sparse_part_is_the_planted_one():
    low_rank, sparse, support = planted(seed=3)
    chosen = sparse_support(low_rank + sparse, 30, "grebsmo", rank=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(chosen, support)
    # magnitude alone does not find it: the low-rank part has entries as large as the spikes
    assert not torch.equal(sparse_support(low_rank + sparse, 30, "magnitude"), support)


def test_threshold_mode_is_the_reference_hard_threshold():
    low_rank, sparse, _ = planted()
    weight = low_rank + sparse
    parts = grebsmo(weight, rank=4, threshold=0.5, generator=torch.Generator().manual_seed(1))
    kept = parts.sparse[parts.sparse != 0]
    assert kept.abs().min() >= 0.5  # |S| < threshold is set to zero
    assert parts.residual(weight).abs().max() < 0.5 + 1e-5


@pytest.mark.parametrize("method", ["grebsmo", "magnitude", "random"])
def test_support_has_exactly_n_distinct_sorted_positions_and_is_reproducible(method):
    weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(5))
    first = sparse_support(weight, 20, method, rank=3, generator=torch.Generator().manual_seed(7))
    again = sparse_support(weight, 20, method, rank=3, generator=torch.Generator().manual_seed(7))
    assert first.numel() == 20 and first.unique().numel() == 20
    assert torch.equal(first, first.sort().values) and torch.equal(first, again)
    assert int(first.min()) >= 0 and int(first.max()) < weight.numel()


def test_magnitude_support_is_the_largest_weights():
    weight = torch.tensor([[0.1, -5.0, 0.3], [4.0, 0.0, -0.2]])
    assert sparse_support(weight, 2, "magnitude").tolist() == [1, 3]


def test_rejects_unknown_method_and_bad_size():
    weight = torch.randn(4, 4)
    with pytest.raises(ValueError, match="unknown support method"):
        sparse_support(weight, 2, "svd")
    with pytest.raises(ValueError, match="support size"):
        sparse_support(weight, 17, "magnitude")

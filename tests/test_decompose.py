"""GreBsmo-style decomposition and the support Ω of DSEE's sparse update."""

from __future__ import annotations

import pytest
import torch

from sparseft.sparse.decompose import grebsmo, grebsmo_reference, keep_largest, kthvalue_support, sparse_support

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


def test_threshold_mode_sets_entries_below_the_threshold_to_zero():
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


# ---- the official loop, transcribed by hand ----------------------------------------------
def official_grebsmo_support(weight: torch.Tensor, num_sparse: int, seed: int, outer: int = 100):
    """VITA-Group/DSEE run_glue.py (`sparse_method == 'grebsmo'`), one matrix, written out step by
    step in plain torch and kept independent of sparseft. Differences from the script: the
    global RNG is seeded here, ``torch.qr`` is spelled ``torch.linalg.qr`` (the same reduced QR),
    the mask stays on the CPU, and ``outer`` replaces the literal 100 only where a test says so."""
    torch.manual_seed(seed)
    Q_weight = weight.detach()
    U_Q = torch.randn((Q_weight.shape[0], 1))  # drawn, then overwritten by the first QR
    V_Q = torch.randn((1, Q_weight.shape[1]))
    for _rank in range(outer):
        S_Q = torch.zeros_like(Q_weight)
        for _ in range(2):
            U_Q = torch.linalg.qr((Q_weight - S_Q) @ V_Q.T)[0]
            V_Q = U_Q.T @ (Q_weight - S_Q)
            S_Q = Q_weight - U_Q @ V_Q
            q = 0.01
            S_Q[S_Q.abs() < q] = 0
        E_Q = Q_weight - U_Q @ V_Q - S_Q
        E_Q_vector = torch.linalg.qr(E_Q)[1][:5]
        V_Q = torch.cat([V_Q, E_Q_vector], 0)
    q, _ = torch.kthvalue(S_Q.abs().view(-1), S_Q.numel() - num_sparse + 1)
    mask = (S_Q.abs() >= q).float()
    return S_Q, mask


def bert_like(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A fixed matrix at a pre-trained weight's scale (std 0.04), where the 0.01 threshold bites."""
    return 0.04 * torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_reference_mode_matches_the_official_loop_below_saturation():
    # 8 outer iterations: the rank reaches 36 < 48, so S stays non-zero and Ω is a real top-N
    weight = bert_like(64, 48, seed=11)
    sparse, mask = official_grebsmo_support(weight, 20, seed=4, outer=8)
    parts = grebsmo_reference(weight, outer_iters=8, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(parts.sparse, sparse, atol=1e-6)
    chosen = kthvalue_support(parts.sparse.abs(), 20)
    assert torch.equal(chosen, mask.flatten().nonzero().flatten())
    assert chosen.numel() == 20


def test_reference_mode_matches_the_official_loop_and_saturates_on_a_small_matrix():
    # the literal 100 iterations: the rank (1 + 5 per iteration) passes min(24, 20), U becomes square,
    # S = 0 and the `>=` rule selects every entry -- the reference's dense S2 on small matrices
    weight = bert_like(24, 20, seed=2)
    sparse, mask = official_grebsmo_support(weight, 16, seed=9)
    parts = grebsmo_reference(weight, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(parts.sparse, sparse, atol=1e-6) and not sparse.any()
    chosen = sparse_support(weight, 16, "grebsmo_reference", generator=torch.Generator().manual_seed(9))
    assert torch.equal(chosen, mask.flatten().nonzero().flatten()) and chosen.numel() == 24 * 20


@pytest.mark.slow
def test_reference_mode_matches_the_official_loop_at_full_length_on_a_large_matrix():
    # 100 iterations end at rank 496 < 512: no saturation, the official loop exactly as run on BERT
    weight = bert_like(520, 512, seed=5)
    sparse, mask = official_grebsmo_support(weight, 64, seed=1)
    parts = grebsmo_reference(weight, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(parts.sparse, sparse, atol=1e-6)
    chosen = sparse_support(weight, 64, "grebsmo_reference", generator=torch.Generator().manual_seed(1))
    assert torch.equal(chosen, mask.flatten().nonzero().flatten())


def test_kthvalue_support_keeps_every_tie_at_the_threshold():
    scores = torch.tensor([[1.0, 3.0, 3.0], [2.0, 0.0, 3.0]])
    # the (6 - 2 + 1) = 5th smallest is 3; `>= 3` keeps all three 3s although N = 2
    assert kthvalue_support(scores, 2).tolist() == [1, 2, 5]
    assert kthvalue_support(torch.zeros(2, 3), 2).tolist() == [0, 1, 2, 3, 4, 5]  # S = 0: everything

import pytest
import torch

from sparseft.sparse.masks import (
    global_topk_masks,
    keep_highest,
    keep_highest_by_sort,
    nm_mask,
    pruned_count,
    topk_mask,
)


def test_topk_prunes_the_smallest_exactly():
    scores = torch.tensor([[0.5, -3.0, 2.0], [1.0, 0.1, 4.0]])
    keep = topk_mask(scores.abs(), 0.5)
    # |scores| = .5 3 2 / 1 .1 4 -> prune the three smallest: .1, .5, 1
    assert keep.tolist() == [[False, True, True], [False, False, True]]


def test_topk_breaks_ties_by_index_and_keeps_the_count():
    scores = torch.zeros(4, 5)
    keep = topk_mask(scores, 0.3)
    assert int((~keep).sum()) == 6
    assert (~keep).flatten().tolist() == [True] * 6 + [False] * 14
    assert torch.equal(keep, topk_mask(scores.clone(), 0.3))  # deterministic


def test_topk_ties_at_threshold_only_take_what_is_needed():
    scores = torch.tensor([3.0, 1.0, 2.0, 1.0, 1.0, 5.0])
    keep = keep_highest(scores, 2)
    assert keep.tolist() == [True, False, True, False, True, True]


@pytest.mark.parametrize(
    "rule, numel, sparsity, expected",
    [
        # torch.nn.utils.prune: round(n·s), Python's round (half to even)
        ("round", 100, 0.29, 29), ("round", 768 * 768, 0.9, 530842), ("round", 7, 0.5, 4), ("round", 5, 0.5, 2),
        # PST's SparseBinarizer: int(n·s), float error included (0.29·100 = 28.999...)
        ("floor", 100, 0.29, 28), ("floor", 10, 0.7, 7), ("floor", 768 * 768, 0.9, 530841), ("floor", 7, 0.5, 3),
        # movement's TopKBinarizer keeps int(kept·n) of the kept fraction 0.1: 1000 keeps 100, 589824 keeps 58982
        ("keep_floor", 1000, 0.9, 900), ("keep_floor", 768 * 768, 0.9, 768 * 768 - 58982), ("keep_floor", 7, 0.5, 4),
    ],
)
def test_pruned_count_follows_each_reference(rule, numel, sparsity, expected):
    assert pruned_count(numel, sparsity, rule) == expected


@pytest.mark.parametrize("numel, sparsity", [(589824, 0.9), (100, 0.29), (7, 0.5), (5, 0.5), (1536, 0.37)])
def test_round_rule_prunes_as_many_as_torch_prune(numel, sparsity):
    weight = torch.nn.Linear(numel, 1, bias=False)
    torch.nn.utils.prune.l1_unstructured(weight, "weight", amount=sparsity)
    assert pruned_count(numel, sparsity, "round") == int((weight.weight_mask == 0).sum())


def test_keep_floor_matches_the_movement_reference_where_floor_loses_a_weight():
    kept_reference = int(0.1 * 1536 * 384)  # TopKBinarizer: j = int(threshold · numel), threshold 0.1
    assert 1536 * 384 - pruned_count(1536 * 384, 0.9, "keep_floor") == kept_reference
    assert int(topk_mask(torch.rand(1536, 384), 0.9, rule="keep_floor").sum()) == kept_reference


def test_unknown_count_rule_is_refused():
    with pytest.raises(ValueError, match="unknown pruned-count rule 'ceil'"):
        pruned_count(10, 0.5, "ceil")


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_outside_unit_interval_is_refused(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        topk_mask(torch.ones(3, 3), sparsity)


def test_global_topk_ranks_layers_together():
    small = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    large = torch.tensor([[10.0, 20.0], [30.0, 0.05]])
    keep_small, keep_large = global_topk_masks([small, large], 0.5)
    assert keep_small.tolist() == [[False, False], [False, True]]
    assert keep_large.tolist() == [[True, True], [True, False]]


def test_nm_mask_keeps_n_of_every_m():
    torch.manual_seed(0)
    scores = torch.randn(8, 16).abs()
    keep = nm_mask(scores, 2, 4)
    groups = keep.view(8, 4, 4)
    assert (groups.sum(-1) == 2).all()
    kept_min = torch.where(groups, scores.view(8, 4, 4), torch.inf).min(-1).values
    dropped_max = torch.where(groups, -torch.inf, scores.view(8, 4, 4)).max(-1).values
    assert (kept_min >= dropped_max).all()


def test_nm_mask_ties_and_errors():
    assert nm_mask(torch.zeros(1, 4), 2, 4).tolist() == [[True, True, False, False]]
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_mask(torch.zeros(2, 6), 2, 4)
    with pytest.raises(ValueError, match="0 < n < m"):
        nm_mask(torch.zeros(2, 4), 4, 4)


def test_topk_row_blocks_prune_each_fused_matrix_separately():
    # q rows have small scores, v rows large: one top-k over the fused matrix would empty q
    scores = torch.cat([torch.full((2, 4), 0.1), torch.full((2, 4), 1.0), torch.full((2, 4), 9.0)])
    scores += torch.arange(24.0).view(6, 4) * 1e-3
    keep = topk_mask(scores, 0.5, row_blocks=3)
    for block in keep.chunk(3):
        assert int(block.sum()) == 4
    assert int(topk_mask(scores, 0.5)[:2].sum()) == 0
    with pytest.raises(ValueError, match="equal blocks"):
        topk_mask(torch.ones(4, 2), 0.5, row_blocks=3)


@pytest.mark.parametrize("kind", ["normal", "integers", "half_zeros", "constant"])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.97])
def test_fast_selection_equals_a_stable_sort_on_large_matrices(kind, sparsity):
    generator = torch.Generator().manual_seed(7)
    shape = (768, 128)  # large enough for the sampled bracket
    scores = {
        "normal": torch.randn(shape, generator=generator),
        "integers": torch.randint(0, 50, shape, generator=generator).float(),  # heavy ties
        "half_zeros": torch.randn(shape, generator=generator).abs() * torch.randint(0, 2, shape, generator=generator),
        "constant": torch.full(shape, 0.25),
    }[kind]
    k = pruned_count(scores.numel(), sparsity)
    order = torch.sort(scores.flatten(), stable=True).indices
    expected = torch.ones(scores.numel(), dtype=torch.bool)
    expected[order[:k]] = False
    assert torch.equal(keep_highest(scores, k), expected.view(shape))
    assert torch.equal(keep_highest_by_sort(scores.flatten(), k), expected)  # the GPU path, run on the CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sparsity", [0.1, 0.9])
def test_gpu_selection_gives_the_cpu_mask(sparsity):
    generator = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 1000, (1536, 384), generator=generator).float()  # many ties
    k = pruned_count(scores.numel(), sparsity)
    assert torch.equal(keep_highest(scores.cuda(), k).cpu(), keep_highest(scores, k))
    on_gpu = global_topk_masks([scores.cuda(), scores[:384].cuda()], sparsity)
    on_cpu = global_topk_masks([scores, scores[:384]], sparsity)
    assert all(torch.equal(gpu.cpu(), cpu) for gpu, cpu in zip(on_gpu, on_cpu, strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_selection_in_other_float_types_matches_float32(dtype):
    generator = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 200, (300, 64), generator=generator).to(dtype)  # exact in every type, many ties
    k = pruned_count(scores.numel(), 0.8)
    assert torch.equal(keep_highest(scores, k), keep_highest(scores.float(), k))

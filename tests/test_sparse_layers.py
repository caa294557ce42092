import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparseft.backbones.loading import load_backbone
from sparseft.sparse import merge_, prune_, select_targets, sparsify
from sparseft.sparse.deltas import LowRank, RowBlocks
from sparseft.sparse.layers import LinearLayer, find_linear_layers
from sparseft.sparse.parametrize import SparseWeight, attach
from sparseft.sparse.targets import describe_targets
from sparseft.testing import tiny_config


def tiny(model_type: str) -> nn.Module:
    return load_backbone("sequence-classification", config=tiny_config(model_type, pad_token_id=0), num_labels=2)


def test_conv1d_view_is_out_in_and_masks_the_right_entries():
    conv = Conv1D(nf=3, nx=5)  # weight [in=5, out=3]
    layer = LinearLayer("c", conv, None, None)
    assert layer.shape == (3, 5)
    assert torch.equal(layer.weight(), conv.weight.t())
    sparse = attach(layer)
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[1, 4] = False  # output 1, input 4
    sparse.set_mask_(keep)
    assert conv.weight[4, 1] == 0 and conv.weight.count_nonzero() == 14
    x = torch.randn(2, 5)
    expected = x @ (conv.parametrizations.weight.original.t() * keep).t() + conv.bias
    assert torch.allclose(conv(x), expected)


@pytest.mark.parametrize(
    "model_type, roles",
    [
        ("bert", ["q", "k", "v", "o", "ffn_in", "ffn_out"]),
        ("roberta", ["q", "k", "v", "o", "ffn_in", "ffn_out"]),
        ("gpt2", ["qkv", "o", "ffn_in", "ffn_out"]),
        ("llama", ["q", "k", "v", "o", "ffn_in", "ffn_in", "ffn_out"]),
    ],
)
def test_role_presets_cover_every_block_linear_and_nothing_else(model_type, roles):
    model = tiny(model_type)
    layers = find_linear_layers(model)
    block = [layer for layer in layers if layer.layer_index == 0]
    assert sorted(layer.role for layer in block) == sorted(roles)
    outside = [layer for layer in layers if layer.layer_index is None]
    assert outside and all(layer.role is None for layer in outside)  # classifier / pooler / score
    assert len(select_targets(model)) == 2 * len(roles)


def test_targets_one_rule_for_string_and_list():
    model = tiny("bert")
    by_string = select_targets(model, "q")
    by_list = select_targets(model, ["q"])
    assert [t.name for t in by_string] == [t.name for t in by_list]
    assert [t.name for t in by_string] == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    regex = select_targets(model, r"bert\.encoder\.layer\.1\..*(query|value)")
    assert [t.role for t in regex] == ["q", "v"]


def test_target_matching_nothing_names_the_pattern():
    model = tiny("bert")
    with pytest.raises(ValueError, match=r"target pattern 'query' matched no linear layer.*whole module name"):
        select_targets(model, ["q", "query"])
    with pytest.raises(ValueError, match="target role 'qkv' matched no layer: model type 'bert' has roles"):
        select_targets(model, "qkv")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        select_targets(model, "(")


def test_describe_targets_lists_matches():
    table = describe_targets(select_targets(tiny("bert"), ["ffn_in"]))
    assert "bert.encoder.layer.0.intermediate.dense  ffn_in" in table
    assert "2 target layers, 4,096 weights" in table


def test_parametrization_forward_merge_and_gradients():
    torch.manual_seed(0)
    model = tiny("gpt2").eval()
    layers = sparsify(model)
    prune_(layers, [s.dense().abs() for s in layers], 0.75)
    ids = torch.randint(0, 400, (2, 6))
    logits = model(input_ids=ids).logits
    model(input_ids=ids).logits.sum().backward()
    for sparse in layers:
        grad = sparse.layer.module.parametrizations.weight.original.grad
        out_in_grad = grad.t() if sparse.layer.transposed else grad
        assert (out_in_grad[~sparse.mask] == 0).all()  # pruned weights get no gradient
        assert sparse.layer.weight().count_nonzero() == sparse.mask.sum()
    assert merge_(model) == len(layers)
    assert torch.equal(model(input_ids=ids).logits, logits)
    assert not any("parametrizations" in name for name, _ in model.named_parameters())


def test_straight_through_score_gets_grad_times_weight():
    class Scores(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.zeros(2, 3))

        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return self.s

    linear = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]]))
    sparse = attach(LinearLayer("l", linear, None, None), score=Scores())
    sparse.set_mask_(torch.tensor([[True, False, True], [False, True, True]]))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    out = linear(x)
    assert out.tolist() == [[1.0 + 9.0, 10.0 - 18.0]]  # masked weights only
    out.sum().backward()
    # dL/dW' = 1 x^T per output row; dL/dS = dL/dW' * W (unmasked W)
    expected = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]) * linear.parametrizations.weight.original
    assert torch.equal(sparse.param.score.s.grad, expected)
    assert isinstance(sparse.param, SparseWeight)


def test_fused_updates_equal_weight_plus_delta():
    torch.manual_seed(0)
    weight = torch.randn(6, 4)
    low_rank = LowRank((6, 4), rank=2, scale=0.5, left_std=1.0, right_std=1.0)
    blocks = RowBlocks([LowRank((2, 4), rank=1, scale=2.0, left_std=1.0, right_std=1.0) for _ in range(3)])
    for delta in (low_rank, blocks):
        assert torch.allclose(delta.added_to(weight), weight + delta())
        assert torch.allclose(delta.added_to(weight.t().contiguous().t()), weight + delta())  # a Conv1D view


def test_mask_from_forward_scores_needs_a_score_module():
    sparse = attach(LinearLayer("l", nn.Linear(3, 2), None, None))
    with pytest.raises(ValueError, match="score module"):
        sparse.param.refresh_mask_on_forward(lambda scores: scores > 0)


def test_attaching_twice_is_refused():
    linear = nn.Linear(3, 2)
    layer = LinearLayer("l", linear, None, None)
    attach(layer)
    with pytest.raises(ValueError, match="already sparsified"):
        attach(layer)


def test_freeze_backbone_keeps_only_listed_parameters_and_the_head():
    from sparseft.sparse.freezing import freeze_backbone_

    model = tiny("bert")
    query = model.bert.encoder.layer[0].attention.self.query.weight
    trainable = freeze_backbone_(model, keep={id(query)}, train_head=True)
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier"))
    assert trainable == query.numel() + head
    assert freeze_backbone_(model, keep={id(query)}, train_head=False) == query.numel()


def test_remaining_weights_counts_biases_and_layernorm_like_the_paper():
    from sparseft.sparse.measure import remaining_weights

    model = tiny("bert")
    layers = sparsify(model)
    prune_(layers, [s.dense().abs() for s in layers], 0.9)
    names = [s.name for s in layers]
    result = remaining_weights(model, names)
    matrices = sum(s.mask.numel() for s in layers)  # 2 x (4 x 32*32 + 2 x 32*64) = 16,384
    kept = sum(int(s.mask.sum()) for s in layers)
    # per block: biases 4*32 + 64 + 32 = 224, LayerNorms 2 x 2 x 32 = 128 -> 352, two blocks
    extra = 2 * 352
    assert matrices == 16_384 and result["targets"] == pytest.approx(kept / matrices)
    assert result["blocks_paper"] == pytest.approx((kept + extra) / (matrices + extra))

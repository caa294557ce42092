"""S²FT on the real SmolLM2-135M-Instruct: grouped-query attention (9 query heads over 3 key/value
heads, head size 64) and the default budget. Expectations are computed by hand from the config:
hidden 576 = 9 heads x 64, so query head h owns o_proj input columns 64h..64h+63; 9 / 3 = 3 query
heads share a key/value head, so head h reads KV head h // 3, whose v_proj rows are 64(h // 3)..+63."""

from __future__ import annotations

import pytest
import torch

from sparseft.backbones.loading import load_backbone
from sparseft.strategies import S2FT

pytestmark = pytest.mark.slow

# (block, query head) pairs made the 5 largest by weight norm; their KV heads by hand: h // 3
PLANTED_HEADS = {0: [0, 4, 8], 29: [3, 5]}
EXPECTED_O_COLUMNS = {0: [*range(0, 64), *range(256, 320), *range(512, 576)], 29: [*range(192, 256), *range(320, 384)]}
EXPECTED_V_ROWS = {0: list(range(0, 192)), 29: list(range(64, 128))}  # block 0: KV 0, 1, 2; block 29: KV 1 only
PLANTED_CHANNELS = {7: [5, 1000], 12: [1535], 29: [0]}


def test_smollm2_layout_is_what_the_expectations_assume(smollm2_dir):
    smollm2 = load_backbone("causal-lm", str(smollm2_dir))
    config = smollm2.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert tuple(smollm2.model.layers[0].self_attn.v_proj.weight.shape) == (192, 576)


def plant(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Scale the planted heads' o_proj columns and channels' down_proj columns by 100 so that the
    weight criterion ranks them first; returns the original weights to put back."""
    originals = {}
    with torch.no_grad():
        for block, layer in enumerate(model.model.layers):
            for name, module, width, units in (("o", layer.self_attn.o_proj, 64, PLANTED_HEADS),
                                               ("down", layer.mlp.down_proj, 1, PLANTED_CHANNELS)):
                if block in units:
                    originals[f"{block}.{name}"] = module.weight.detach().clone()
                    for unit in units[block]:
                        module.weight[:, unit * width:(unit + 1) * width] *= 100.0
    return originals


def test_gqa_selection_on_the_real_model_trains_query_head_columns_and_kv_group_rows(smollm2_dir):
    model = load_backbone("causal-lm", str(smollm2_dir))
    originals = plant(model)
    strategy = S2FT(heads=5, channels=4, criterion="weight", rows=True)
    plan = {layer.name: layer.module.index.tolist() for layer in strategy.attach(model)}
    attn, mlp = "model.layers.{}.self_attn.{}_proj", "model.layers.{}.mlp.{}_proj"
    for block in range(30):
        assert plan[attn.format(block, "o")] == EXPECTED_O_COLUMNS.get(block, [])
        assert plan.get(attn.format(block, "v"), []) == EXPECTED_V_ROWS.get(block, [])
        for proj in ("down", "up", "gate"):
            assert plan.get(mlp.format(block, proj), []) == PLANTED_CHANNELS.get(block, [])
        assert attn.format(block, "q") not in plan and attn.format(block, "k") not in plan
    with torch.no_grad():  # back to the real weights, then one AdamW step
        for key, weight in originals.items():
            block, name = key.split(".")
            layer = model.model.layers[int(block)]
            (layer.self_attn.o_proj if name == "o" else layer.mlp.down_proj).weight.copy_(weight)
    before = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.AdamW(strategy.param_groups(), lr=1e-3, betas=(0.9, 0.95))
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for name, tensor in model.state_dict().items():  # W0 and every other weight: bit-identical
        if not name.endswith((".delta", ".index")):
            assert torch.equal(tensor, before[name]), name
    for sliced in strategy.layers:  # the effective weight changed exactly on the planned slice
        changed = sliced.weight() != sliced.module.out_in()
        assert torch.equal(changed, sliced.mask), sliced.name
    # o columns of 5 heads, v rows of 4 KV heads, 4 channels of down, up and gate
    assert sum(sliced.trained for sliced in strategy.layers) == 5 * 64 * 576 + 4 * 64 * 576 + 4 * 576 * 3


def test_default_selection_on_the_real_model_is_whole_heads_and_the_paper_budget(smollm2_dir):
    model = load_backbone("causal-lm", str(smollm2_dir))
    strategy = S2FT(rows=True)  # defaults: 5.2% of 270 (layer, head) pairs, 2% of 46,080 channels
    layers = {layer.name: layer.module.index for layer in strategy.attach(model)}
    heads = kv_rows = 0
    for block in range(30):
        columns = layers[f"model.layers.{block}.self_attn.o_proj"]
        selected = columns.reshape(-1, 64)[:, 0] // 64  # whole heads: 64 consecutive columns each
        assert torch.equal(columns, (selected[:, None] * 64 + torch.arange(64)).flatten())
        groups = (selected // 3).unique()
        expected_v = (groups[:, None] * 64 + torch.arange(64)).flatten()
        assert torch.equal(layers.get(f"model.layers.{block}.self_attn.v_proj", torch.empty(0, dtype=torch.long)),
                           expected_v)
        heads, kv_rows = heads + selected.numel(), kv_rows + expected_v.numel()
    channels = sum(layers[f"model.layers.{block}.mlp.down_proj"].numel() for block in range(30))
    assert (heads, channels) == (14, 921)  # int(0.052 * 270), int(0.02 * 46,080)
    columns_trained = 14 * 64 * 576 + 921 * 576
    assert columns_trained == 1_046_592
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained == columns_trained + kv_rows * 576 + 2 * 921 * 576  # + v rows + up and gate rows

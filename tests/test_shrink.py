"""Physical removal of heads and FFN channels: same logits in memory and after a round trip on disk."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from sparseft.backbones.loading import load_backbone
from sparseft.export.pretrained import export_pretrained
from sparseft.export.shrink import REMOTE_CODE_FILE, shrink_
from sparseft.sparse.layers import find_linear_layers
from sparseft.sparse.prune import sparsify
from sparseft.sparse.structured import HeadLayout, channel_masks, group_blocks, head_masks
from sparseft.testing import tiny_config

FAMILIES = ["bert", "roberta", "gpt2", "llama"]


def tiny(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"pad_token_id": 0} if model_type in ("gpt2", "llama") else {}
    return load_backbone("sequence-classification", config=tiny_config(model_type, **extra), num_labels=2).eval()


def structured_masks(model: torch.nn.Module, heads: bool = True, ffn: bool = True, uniform: bool = True) -> dict:
    """Drop one unit per block (a different one in each block) and 5 FFN channels (6 in block 1
    unless ``uniform``)."""
    layout = HeadLayout.of(model)
    masks = {}
    for block in group_blocks(find_linear_layers(model)):
        if heads:
            keep = torch.ones(layout.units, dtype=torch.bool)
            keep[(block.index + 1) % layout.units] = False
            masks.update(head_masks(block, keep, layout))
        if ffn:
            channels = torch.ones(block.get("ffn_out").shape[1], dtype=torch.bool)
            channels[block.index * 3: block.index * 3 + 5 + (0 if uniform else block.index)] = False
            masks.update(channel_masks(block, channels))
    return masks


def masked_model(model_type: str, **kwargs) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A model with structured masks on the ``W_eff = M ⊙ W0`` parametrization, inputs and its logits."""
    model = tiny(model_type)
    masks = structured_masks(model, **kwargs)
    layers = sparsify(model, [name.replace(".", r"\.") for name in masks])
    for layer in layers:
        layer.set_mask_(masks[layer.name])
    inputs = torch.randint(3, 400, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model, inputs, model(input_ids=inputs).logits


@pytest.mark.parametrize("model_type", FAMILIES)
def test_exported_shrunk_model_gives_the_masked_model_logits(model_type, tmp_path):
    model, inputs, expected = masked_model(model_type)
    dense_parameters = sum(p.numel() for p in tiny(model_type).parameters())
    report = export_pretrained(model, tmp_path, shrink=True)
    structured = report["structured"]
    assert set(structured["heads"]) == {0, 1} and structured["ffn_channels"] == {0: 5, 1: 5}
    assert structured["total_parameters"] < dense_parameters
    with torch.no_grad():
        assert torch.allclose(model(input_ids=inputs).logits, expected, atol=1e-6)  # shrunk in memory
    remote = model_type != "llama"  # BERT, RoBERTa and GPT-2 tie the attention width to hidden_size
    assert (tmp_path / REMOTE_CODE_FILE).exists() == remote
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, trust_remote_code=remote).eval()
    assert sum(p.numel() for p in loaded.parameters()) == structured["total_parameters"]
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=inputs).logits, expected, atol=1e-6)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["structured"]["load_with"].endswith("trust_remote_code=True)" if remote else "(path)")


def test_llama_gqa_removes_whole_key_value_groups_and_shrinks_the_config(tmp_path):
    model, inputs, expected = masked_model("llama", ffn=False)
    layout = HeadLayout.of(model)
    assert (layout.num_heads, layout.num_kv_heads) == (4, 2)  # groups of 2 query heads
    export_pretrained(model, tmp_path, shrink=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 8)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (16, 32) and attention.k_proj.weight.shape == (8, 32)
    assert attention.o_proj.weight.shape == (32, 16)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=inputs).logits, expected, atol=1e-6)


def test_uniform_ffn_pruning_loads_plainly_with_a_smaller_intermediate_size(tmp_path):
    model, inputs, expected = masked_model("bert", heads=False)
    export_pretrained(model, tmp_path, shrink=True)
    assert not (tmp_path / REMOTE_CODE_FILE).exists()
    assert json.loads((tmp_path / "config.json").read_text())["intermediate_size"] == 64 - 5
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=inputs).logits, expected, atol=1e-6)


def test_different_counts_per_block_fall_back_to_remote_code(tmp_path):
    model, inputs, expected = masked_model("llama", heads=False, uniform=False)
    export_pretrained(model, tmp_path, shrink=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["intermediate_size"] == 64  # not expressible: block 0 keeps 59, block 1 keeps 58
    assert config["sparseft_resized"]["linears"]["model.layers.1.mlp.down_proj"] == [32, 58]
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=inputs).logits, expected, atol=1e-6)


def test_head_shrunk_bert_refuses_to_load_without_remote_code(tmp_path):
    model, _, _ = masked_model("bert", ffn=False)
    export_pretrained(model, tmp_path, shrink=True)
    with pytest.raises(RuntimeError, match="mismatched"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_unstructured_zeros_are_not_removed():
    model = tiny("bert")
    with torch.no_grad():
        for layer in find_linear_layers(model):
            layer.module.weight.mul_(torch.rand_like(layer.module.weight) > 0.5)
    shapes = [tuple(p.shape) for p in model.parameters()]
    removed = shrink_(model)
    assert removed == {"heads": {}, "ffn_channels": {}, "resized": {}}
    assert [tuple(p.shape) for p in model.parameters()] == shapes


def test_a_head_is_removed_only_when_its_input_rows_are_zero_too():
    model = tiny("bert")
    attention = model.bert.encoder.layer[0].attention
    with torch.no_grad():
        attention.output.dense.weight[:, 8:16] = 0  # head 1's output columns only
    assert shrink_(model)["heads"] == {}
    with torch.no_grad():
        for projection in (attention.self.query, attention.self.key, attention.self.value):
            projection.weight[8:16] = 0
    assert shrink_(model)["heads"] == {0: [1]}
    assert attention.self.query.weight.shape == (24, 32) and attention.output.dense.weight.shape == (32, 24)

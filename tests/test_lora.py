"""LoRA on the input side: the forward it computes, PEFT's defaults, equivalence with PEFT on identical
tensors, DSEE's update moving into the weight when it prunes, and the PEFT adapter export."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from sparseft.backbones.loading import load_backbone
from sparseft.export.peft import extract_peft_adapter, save_peft_adapter
from sparseft.sparse.parametrize import merge_
from sparseft.strategies import DSEE, LoRA
from sparseft.testing import SyntheticClassificationData, tiny_config
from sparseft.testing.conformance import tiny_module
from sparseft.testing.isolated import python_without_sparseft, run_without_sparseft

IDS = torch.tensor([[5, 17, 3, 250, 9, 41], [7, 7, 120, 33, 2, 64]])


def tiny_lm(**lora: object) -> tuple[nn.Module, LoRA]:
    torch.manual_seed(0)
    model = load_backbone("causal-lm", config=tiny_config("llama"))
    strategy = LoRA(**{"rank": 2, "alpha": 4.0, "targets": ["q", "v", "ffn_out"], **lora})
    strategy.attach(model)
    return model, strategy


def randomize_factors_(strategy: LoRA) -> None:
    """Non-zero B (trained-like), so the update changes the output."""
    with torch.no_grad():
        for layer in strategy.layers:
            layer.param.delta.left.normal_(0, 0.1)


def test_update_is_computed_from_the_input_with_no_mask_and_no_full_size_tensor():
    model, strategy = tiny_lm()
    randomize_factors_(strategy)
    assert not any(key.endswith("mask") for key in model.state_dict())
    layer = strategy.layers[0]
    module, delta = layer.layer.module, layer.param.delta
    assert module.weight is layer.stored_weight  # W0 as it is: nothing formed per forward
    x = torch.randn(3, module.in_features)  # fewer rows than W0 has: x is saved, not counted
    expected = x @ layer.stored_weight.T + 2.0 * (x @ delta.right.T) @ delta.left.T  # α/r = 4/2
    torch.testing.assert_close(module(x), expected)
    full_size = []

    def pack(saved: torch.Tensor) -> torch.Tensor:
        if saved.numel() >= layer.stored_weight.numel() and saved.data_ptr() != layer.stored_weight.data_ptr():
            full_size.append(tuple(saved.shape))  # W0 itself is saved (by reference) for the input gradient
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        module(x.requires_grad_())
    assert not full_size, f"saved [out, in]-sized tensors {full_size}"
    assert torch.equal(layer.weight(), layer.stored_weight + delta())  # the effective weight, on demand
    assert strategy.measured_sparsity() == 0.0 and bool(layer.mask.all())


def test_defaults_and_init_are_peft_s():
    strategy = LoRA()
    assert (strategy.rank, strategy.alpha, strategy.dropout, strategy.scale) == (8, 8.0, 0.0, 1.0)
    model = load_backbone("causal-lm", config=tiny_config("llama"))
    strategy.attach(model)
    assert {layer.layer.role for layer in strategy.layers} == {"q", "v"}
    for layer in strategy.layers:
        a, b = layer.param.delta.right, layer.param.delta.left
        bound = 1 / math.sqrt(a.shape[1])  # kaiming-uniform with a = √5: nn.Linear's init of lora_A
        assert a.shape[0] == 8 and 0.5 * bound < a.abs().max() <= bound and not b.any()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if ".delta." in name}  # LM head frozen


def test_refuses_settings_that_mean_nothing():
    for kwargs, message in [({"sparsity": 0.5}, "LoRA prunes nothing"), ({"rank": 0}, "rank must be >= 1"),
                            ({"alpha": 0.0}, "alpha must be > 0"), ({"dropout": 1.0}, r"dropout must be in \[0, 1\)")]:
        with pytest.raises(ValueError, match=message):
            LoRA(**kwargs)
    with pytest.raises(ValueError, match="--sparsity.rank 40 is above the rank"):
        LoRA(rank=40).attach(load_backbone("causal-lm", config=tiny_config("llama")))


def test_dropout_acts_on_the_factors_input_in_training_only():
    model, strategy = tiny_lm(dropout=0.5)
    randomize_factors_(strategy)
    plain, _ = tiny_lm()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=IDS).logits, plain.eval()(input_ids=IDS).logits)
        assert not torch.allclose(model.train()(input_ids=IDS).logits, plain(input_ids=IDS).logits)


def test_merge_bakes_the_update_into_plain_weights():
    model, strategy = tiny_lm()
    randomize_factors_(strategy)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        merge_(model)
        assert not any(module._forward_hooks for module in model.modules())
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=1e-5)


def test_matches_peft_on_identical_tensors():
    peft = pytest.importorskip("peft")
    model, strategy = tiny_lm()
    randomize_factors_(strategy)
    torch.manual_seed(0)
    base = load_backbone("causal-lm", config=tiny_config("llama"))
    names = [layer.name for layer in strategy.layers]
    reference = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=names))
    for layer in strategy.layers:
        peft_layer = reference.base_model.model.get_submodule(layer.name)
        with torch.no_grad():
            peft_layer.base_layer.weight.copy_(layer.stored_weight)
            peft_layer.lora_A["default"].weight.copy_(layer.param.delta.right)
            peft_layer.lora_B["default"].weight.copy_(layer.param.delta.left)
    ours, theirs = model(input_ids=IDS).logits, reference(input_ids=IDS).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    (ours ** 2).mean().backward()
    (theirs ** 2).mean().backward()
    for layer in strategy.layers:
        peft_layer = reference.base_model.model.get_submodule(layer.name)
        torch.testing.assert_close(layer.param.delta.right.grad, peft_layer.lora_A["default"].weight.grad)
        torch.testing.assert_close(layer.param.delta.left.grad, peft_layer.lora_B["default"].weight.grad)


def test_dsee_update_is_on_the_input_until_its_mask_prunes():
    torch.manual_seed(0)
    model = load_backbone("sequence-classification", config=tiny_config("bert"), num_labels=2)
    strategy = DSEE(sparsity=0.5, rank=2, num_sparse=4, pattern="layer", targets=["q", "v"])
    strategy.attach(model)
    updated = [layer for layer in strategy.layers if layer.param.delta is not None]
    with torch.no_grad():
        for layer in updated:
            low_rank, residual = layer.param.delta.parts
            low_rank.left.normal_(0, 0.1)
            residual.values.normal_(0, 0.1)
    assert all(layer.param.update_on_input for layer in updated)
    x = torch.randn(2, 5, 32)
    before = [layer.layer.module(x) for layer in updated]
    for layer, y in zip(updated, before):  # input side: x·W0ᵀ + b + x·ΔWᵀ, as the weight side gives
        torch.testing.assert_close(y, x @ layer.dense().T + layer.layer.module.bias)
    strategy.update_masks(0.5)
    for layer in updated:
        assert not layer.param.update_on_input
        torch.testing.assert_close(layer.layer.module.weight, torch.where(layer.mask, layer.dense(), 0.0))
    pruned = model.state_dict()
    reloaded = load_backbone("sequence-classification", config=tiny_config("bert"), num_labels=2)
    fresh = DSEE(sparsity=0.5, rank=2, num_sparse=4, pattern="layer", targets=["q", "v"])
    fresh._supports = strategy._supports
    fresh.attach(reloaded)
    reloaded.load_state_dict(pruned)  # a loaded mask that prunes moves the update into the weight too
    assert not any(layer.param.update_on_input for layer in fresh.layers)


def test_dsee_at_sparsity_0_has_no_masks_and_loads_old_all_ones_ones():
    model = load_backbone("sequence-classification", config=tiny_config("bert"), num_labels=2)
    DSEE(sparsity=0.0, rank=2, num_sparse=4).attach(model)
    state = model.state_dict()
    assert not any(key.endswith(".mask") for key in state)
    old = {**state, "bert.encoder.layer.0.attention.self.query.parametrizations.weight.0.mask":
           torch.ones(32, 32, dtype=torch.bool)}
    model.load_state_dict(old)  # an all-ones mask of a checkpoint from before masks were optional: M = 1


def fit_lora(model_type: str, tmp_path, **lora: object):
    strategy = LoRA(**{"rank": 2, "alpha": 4.0, "learning_rate": 1e-2, **lora})
    module = tiny_module(model_type)
    trainer = Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                      default_root_dir=tmp_path, callbacks=[strategy])
    trainer.fit(module, SyntheticClassificationData(size=32))
    return trainer, module, strategy


@pytest.mark.slow
def test_export_writes_a_peft_adapter_that_peft_loads_without_sparseft(tmp_path):
    """Needs peft (the venv without sparseft reaches this interpreter's packages): about 15 s, a fit, an export
    and a second interpreter importing transformers and PEFT."""
    pytest.importorskip("peft")
    from sparseft.cli import main

    base = tmp_path / "base"
    tiny_module("llama").model.save_pretrained(base)  # the pre-trained model the run starts from
    trainer, module, _ = fit_lora("llama", tmp_path / "run", targets=["q", "k", "v", "ffn_in", "ffn_out"])
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    with torch.no_grad():
        torch.save(module.eval().model(input_ids=IDS).logits, tmp_path / "expected.pt")
    main(["export", f"--ckpt_path={tmp_path / 'last.ckpt'}", f"--output_dir={tmp_path / 'merged'}",
          f"--adapter_path={tmp_path / 'adapter'}"])
    assert sorted(path.name for path in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    venv = tmp_path / "venv"
    python_without_sparseft(venv)
    output = run_without_sparseft(f"""
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification
base = AutoModelForSequenceClassification.from_pretrained({str(base)!r})
model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor({IDS.tolist()})).logits
print((logits - torch.load({str(tmp_path / 'expected.pt')!r})).abs().max().item())
""", venv)
    assert float(output.strip()) <= 1e-5


def test_dsee_fused_qkv_exports_as_one_block_diagonal_pair_peft_reproduces(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = tiny_config("gpt2", pad_token_id=1)
    model = load_backbone("sequence-classification", config=config, num_labels=2)
    base_state = {key: value.clone() for key, value in model.state_dict().items()}
    strategy = DSEE(sparsity=0.0, rank=2, num_sparse=0)
    strategy.attach(model)
    with torch.no_grad():
        for p in strategy.update_parameters():
            p.normal_(0, 0.1)
        expected = model.eval()(input_ids=IDS).logits
    save_peft_adapter(*extract_peft_adapter(model), tmp_path / "adapter")
    base = load_backbone("sequence-classification", config=config, num_labels=2)
    base.load_state_dict(base_state)
    with torch.no_grad():  # the trained head travels in modules_to_save; the rest is the adapter's
        logits = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(input_ids=IDS).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_peft_export_refuses_what_lora_cannot_hold():
    model = load_backbone("sequence-classification", config=tiny_config("bert"), num_labels=2)
    DSEE(sparsity=0.0, rank=2, num_sparse=4).attach(model)
    with pytest.raises(ValueError, match="not low-rank"):
        extract_peft_adapter(model)
    model = load_backbone("sequence-classification", config=tiny_config("bert"), num_labels=2)
    strategy = DSEE(sparsity=0.5, rank=2, num_sparse=0, pattern="layer")
    strategy.attach(model)
    strategy.update_masks(0.5)
    with pytest.raises(ValueError, match="is pruned"):
        extract_peft_adapter(model)

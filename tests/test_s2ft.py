"""S²FT: partial back-propagation, selection, GQA, freezing, accumulation, adapters, export."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparseft.backbones.loading import build_config, load_backbone
from sparseft.export.adapters import apply_adapter_, extract_adapter, load_adapter, remove_adapter_, save_adapter
from sparseft.export.pretrained import export_pretrained
from sparseft.sparse.selection import allocate, unit_count, unit_groups, unit_scores
from sparseft.sparse.slices import SliceLinear, restore_linear_
from sparseft.strategies import S2FT
from sparseft.testing import tiny_config


def tiny_llama(seed: int = 0) -> nn.Module:
    """LLaMA-style causal LM: 2 blocks, 8 query heads over 2 key/value heads (head_dim 8), d_ff 64."""
    torch.manual_seed(seed)
    config = tiny_config("llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=2)
    return load_backbone("causal-lm", config=build_config(config, "causal-lm", 2))


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("axis", ["columns", "rows"])
@pytest.mark.parametrize("conv1d", [False, True])
def test_slice_gradient_equals_full_autograd_restricted_to_the_slice(axis, conv1d):
    torch.manual_seed(0)
    module = Conv1D(6, 5) if conv1d else nn.Linear(5, 6)  # [out, in] = [6, 5] either way
    index = torch.tensor([3, 1]) if axis == "columns" else torch.tensor([4, 0, 2])
    sliced = SliceLinear(copy.deepcopy(module), index, axis)
    index = index.sort().values  # the slice is kept in index order: Δ's i-th column is the i-th smallest
    assert torch.equal(sliced.index, index)
    with torch.no_grad():
        sliced.delta.normal_()  # a non-zero update: grad_input must use W0 + Δ
    w_full = (module.weight.t() if conv1d else module.weight).detach().clone()
    if axis == "columns":
        w_full[:, index] += sliced.delta.detach()
    else:
        w_full[index] += sliced.delta.detach()
    w_full.requires_grad_(True)
    x = torch.randn(2, 3, 5, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    upstream = torch.randn(2, 3, 6)
    y = sliced(x)
    y_ref = F.linear(x_ref, w_full, module.bias)
    torch.testing.assert_close(y, y_ref)
    (y * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    expected = w_full.grad[:, index] if axis == "columns" else w_full.grad[index]
    torch.testing.assert_close(sliced.delta.grad, expected)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert sliced.weight.grad is None and not sliced.weight.requires_grad


def test_autocast_computes_in_its_dtype_and_returns_gradients_in_the_parameters_dtype():
    torch.manual_seed(0)
    sliced = SliceLinear(nn.Linear(16, 8), torch.tensor([1, 5, 7]))
    x = torch.randn(2, 4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sliced(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()  # dL/dY = 1: dL/dΔ[i, c] = Σ_tokens x[..., c], dL/dX = Σ_i W[i, :]
    assert sliced.delta.grad.dtype == x.grad.dtype == torch.float32
    expected = x.detach()[..., [1, 5, 7]].flatten(0, 1).sum(0).expand(8, 3)
    torch.testing.assert_close(sliced.delta.grad, expected, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(x.grad, sliced.weight.sum(0).expand(2, 4, 16), rtol=2e-2, atol=2e-2)


def test_column_slice_saves_only_the_selected_input_columns():
    torch.manual_seed(0)
    sliced = SliceLinear(nn.Linear(64, 32), torch.tensor([5, 9, 17]))
    x = torch.randn(4, 10, 64, requires_grad=True)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        sliced(x)
    # W0 (by reference), Δ, the index and X[..., sel]: never the full X
    assert sorted(saved, key=str) == sorted([torch.Size([32, 64]), torch.Size([32, 3]), torch.Size([3]),
                                             torch.Size([4, 10, 3])], key=str)


def test_gqa_selection_trains_query_head_columns_and_their_kv_group_rows():
    model = tiny_llama()
    with torch.no_grad():  # make the weight criterion pick head 5 of block 0 and head 2 of block 1
        for block, head in ((0, 5), (1, 2)):
            o_proj = model.model.layers[block].self_attn.o_proj.weight
            o_proj.zero_()
            o_proj[:, head * 8:(head + 1) * 8] = 1.0
    strategy = S2FT(heads=2, channels=0, criterion="weight", rows=True)
    plan = {layer.name: layer.module.index.tolist() for layer in strategy.attach(model)}
    prefix = "model.layers.{}.self_attn.{}_proj"
    assert plan[prefix.format(0, "o")] == list(range(40, 48))
    assert plan[prefix.format(1, "o")] == list(range(16, 24))
    # 8 query heads over 2 KV heads: heads 0-3 share KV head 0, heads 4-7 KV head 1 (v rows 8 each)
    assert plan[prefix.format(0, "v")] == list(range(8, 16))
    assert plan[prefix.format(1, "v")] == list(range(0, 8))
    assert plan["model.layers.0.mlp.down_proj"] == [] and plan["model.layers.0.mlp.up_proj"] == []


def test_counts_ratios_and_allocation_by_hand():
    assert unit_count(0.052, None, 32 * 32) == 53 and unit_count(0.02, None, 32 * 11008) == 7045  # LLaMA2-7B
    scores = [torch.tensor([0.1, 0.9, 0.5]), torch.tensor([0.8, 0.7, 0.2])]
    assert [s.tolist() for s in allocate(scores, 3, "global")] == [[1], [0, 1]]
    assert [s.tolist() for s in allocate(scores, 3, "global", "smallest")] == [[0, 2], [2]]
    assert [s.tolist() for s in allocate(scores, 3, "layer")] == [[1, 2], [0]]


def test_random_selection_depends_on_the_seed_only():
    plans = []
    for model_seed, seed in ((0, 0), (1, 0), (0, 1)):
        strategy = S2FT(head_ratio=0.25, channel_ratio=0.1, seed=seed)
        plans.append({layer.name: layer.module.index.tolist() for layer in strategy.attach(tiny_llama(model_seed))})
    assert plans[0] == plans[1]  # other weights, same seed: the same slices (as on every rank)
    assert plans[0] != plans[2]
    assert sum(len(index) for name, index in plans[0].items() if "o_proj" in name) == int(0.25 * 16) * 8
    assert sum(len(index) for name, index in plans[0].items() if "down_proj" in name) == int(0.1 * 128)


def test_gradient_and_activation_scores_match_plain_autograd():
    model, ids = tiny_llama(), torch.randint(0, 400, (2, 6))
    groups = unit_groups(model)
    down = model.model.layers[1].mlp.down_proj
    inputs = {}
    handle = down.register_forward_hook(lambda m, args, out: inputs.update(x=args[0].detach()))
    lm_loss(model, ids).backward()
    handle.remove()
    expected_gradient = down.weight.grad.norm(dim=0)
    model.zero_grad(set_to_none=True)
    model.model.embed_tokens.weight.requires_grad_(False)  # flags are restored as they were
    scores = {criterion: unit_scores(model, groups, criterion, batches=[ids], loss_fn=lambda b: lm_loss(model, b))
              for criterion in ("gradient", "activation")}
    torch.testing.assert_close(scores["gradient"][3], expected_gradient)  # groups: o, down, o, down
    torch.testing.assert_close(scores["activation"][3], inputs["x"].flatten(0, 1).norm(dim=0))
    assert all(p.grad is None for p in model.parameters())  # calibration leaves no gradient behind
    assert [p.requires_grad for p in model.parameters()].count(False) == 1


def train_steps(model: nn.Module, strategy: S2FT, steps: int, lr: float = 1e-2) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(strategy.param_groups(), lr=lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        lm_loss(model, torch.randint(0, 400, (4, 8), generator=generator)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def test_frozen_parts_never_change_and_adam_state_covers_only_the_slices():
    model = tiny_llama()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    strategy = S2FT(head_ratio=0.25, channel_ratio=0.1)
    strategy.attach(model)
    optimizer = train_steps(model, strategy, 3)
    for name, value in model.state_dict().items():
        if name.endswith((".delta", ".index")):
            continue
        assert torch.equal(value, before[name]), name  # W0, biases, norms, embeddings, LM head
    for layer in strategy.layers:
        changed = layer.weight() != before[f"{layer.name}.weight"]
        assert changed.any() and not changed[~layer.mask].any(), layer.name
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained == sum(layer.trained for layer in strategy.layers) == 4 * 8 * 64 + 12 * 64
    moments = sum(s.numel() for state in optimizer.state.values() for k, s in state.items() if k != "step")
    assert moments == 2 * trained  # exp_avg + exp_avg_sq of the slices; full fine-tuning: 2 · every parameter
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_accumulated_micro_batches_equal_one_big_batch():
    ids = torch.randint(0, 400, (4, 8), generator=torch.Generator().manual_seed(0))
    grads = []
    for chunks in (1, 4):
        model = tiny_llama()
        strategy = S2FT(head_ratio=0.25, channel_ratio=0.1)
        strategy.attach(model)
        for micro in ids.chunk(chunks):
            (lm_loss(model, micro) / chunks).backward()  # equal lengths: the mean of means is the mean
        grads.append([p.grad for p in strategy.slice_parameters()])
    for big, accumulated in zip(*grads, strict=True):
        torch.testing.assert_close(accumulated, big, rtol=1e-5, atol=1e-7)


def trained_llama(seed: int, **kwargs) -> tuple[nn.Module, S2FT]:
    model = tiny_llama()
    strategy = S2FT(seed=seed, **kwargs)
    strategy.attach(model)
    train_steps(model, strategy, 2)
    return model, strategy


def test_adapter_round_trips_bit_exactly_and_matches_the_merged_export(tmp_path):
    base = tiny_llama().to(torch.bfloat16)  # coarse rounding: (W0 + Δ) − Δ differs from W0 somewhere
    model = copy.deepcopy(base)
    strategy = S2FT(head_ratio=0.25, channel_ratio=0.1)
    strategy.attach(model)
    with torch.no_grad():
        for p in strategy.slice_parameters():
            p.normal_(std=0.37)
    adapter = load_adapter(save_adapter(extract_adapter(model), tmp_path / "s2ft.safetensors"))
    restore_linear_(model)
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    target = copy.deepcopy(base)
    apply_adapter_(target, adapter)
    for name, value in model.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
    delta = adapter["model.layers.0.mlp.down_proj"]
    weight = target.model.layers[0].mlp.down_proj.weight[:, delta["index"]]
    assert not torch.equal(weight - delta["delta"], delta["base"])  # subtraction would not be exact
    remove_adapter_(target, adapter)
    for name, value in base.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


def test_disjoint_adapters_compose_and_overlapping_ones_are_refused():
    kwargs = dict(heads=1, channels=4, criterion="weight", allocation="layer")
    first, _ = trained_llama(0, order="largest", **kwargs)
    second, _ = trained_llama(0, order="smallest", **kwargs)
    adapters = [extract_adapter(first), extract_adapter(second)]
    base = tiny_llama()
    combined = tiny_llama()
    for adapter in adapters:
        apply_adapter_(combined, adapter)
    for name, part in adapters[0].items():
        other = adapters[1][name]
        weight, original = combined.get_submodule(name).weight, base.get_submodule(name).weight
        assert torch.equal(weight[:, part["index"]], part["base"] + part["delta"])
        assert torch.equal(weight[:, other["index"]], other["base"] + other["delta"])
        untouched = torch.ones(weight.shape[1], dtype=torch.bool)
        untouched[torch.cat([part["index"], other["index"]])] = False
        assert torch.equal(weight[:, untouched], original[:, untouched])
    with pytest.raises(ValueError, match="overlap an applied adapter"):
        apply_adapter_(combined, adapters[0])
    fresh = tiny_llama()
    apply_adapter_(fresh, adapters[0])
    fresh.__dict__.pop("_sparseft_adapters")  # a model that forgot what it holds: the base values still tell
    with pytest.raises(ValueError, match="not its base values"):
        apply_adapter_(fresh, adapters[0])


def test_checkpoint_restores_its_own_selection():
    trained, strategy = trained_llama(0, heads=3, channels=5, criterion="weight")
    rebuilt = tiny_llama(seed=1)  # other weights: the weight criterion picks other slices
    other = S2FT(heads=3, channels=5, criterion="weight")
    other.attach(rebuilt)
    assert any(not torch.equal(a.module.index, b.module.index) for a, b in zip(strategy.layers, other.layers))
    rebuilt.load_state_dict(trained.state_dict())
    for a, b in zip(strategy.layers, other.layers, strict=True):
        assert torch.equal(a.module.index, b.module.index) and torch.equal(a.module.delta, b.module.delta)


def test_export_gives_plain_index_aligned_weights_with_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_llama()
    model, strategy = trained_llama(0, head_ratio=0.25, channel_ratio=0.1)
    ids = torch.randint(0, 400, (2, 8))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    export_pretrained(model, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    for layer in strategy.layers:
        changed = plain.get_submodule(layer.name).weight != base.get_submodule(layer.name).weight
        assert changed.any() and not changed[~layer.mask].any(), layer.name


def fit_bert(s2ft: S2FT, root, steps: int, ckpt_path=None, callbacks=(), **trainer_kwargs):
    from lightning.pytorch import Trainer

    from sparseft.testing import SyntheticClassificationData
    from sparseft.training.module import SparseFTModule

    torch.manual_seed(0)
    config = tiny_config("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    module = SparseFTModule(config=config, num_labels=2, learning_rate=1e-2)
    trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0, limit_val_batches=0,
                      callbacks=[s2ft, *callbacks], **trainer_kwargs)
    trainer.fit(module, SyntheticClassificationData(size=32), ckpt_path=ckpt_path)
    return trainer, module


def test_resumed_run_gives_identical_slices_and_weights(tmp_path):
    from lightning.pytorch import Callback

    class SaveAt(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 4:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    straight = S2FT(heads=3, channels=20, criterion="gradient", calibration_batches=2)
    fit_bert(straight, tmp_path / "a", 8, callbacks=[SaveAt()])
    resumed = S2FT(heads=3, channels=20, criterion="gradient", calibration_batches=2)
    fit_bert(resumed, tmp_path / "b", 8, ckpt_path=str(tmp_path / "mid.ckpt"))
    for a, b in zip(straight.layers, resumed.layers, strict=True):
        assert torch.equal(a.module.index, b.module.index)
        torch.testing.assert_close(a.module.delta, b.module.delta, rtol=0, atol=1e-6)
    assert any(layer.module.delta.abs().sum() > 0 for layer in straight.layers)
    assert straight.measured_sparsity() == 1 - (3 * 8 * 32 + 20 * 32) / (2 * 32 * 32 + 2 * 32 * 64)


DDP_SCRIPT = """
import sys, torch
from lightning.pytorch import Callback
sys.path.insert(0, {tests!r})
from test_s2ft import fit_bert
from sparseft.strategies import S2FT

class Dump(Callback):
    def on_train_end(self, trainer, pl_module):
        layers = trainer.callbacks[0].layers
        torch.save({{l.name: (l.module.index.clone(), l.module.delta.detach().clone()) for l in layers}},
                   {root!r} + f"/rank{{trainer.global_rank}}.pt")

s2ft = S2FT(sparsity=0.75, allocation="layer", criterion="activation", calibration_batches=2)
fit_bert(s2ft, {root!r}, 4, callbacks=[Dump()], strategy="ddp", devices=2, accumulate_grad_batches=2)
"""


@pytest.mark.slow
def test_ddp_two_processes_train_the_same_slices_identically(tmp_path):
    from pathlib import Path

    from sparseft.testing.processes import run_ddp_script

    run_ddp_script(DDP_SCRIPT.format(tests=str(Path(__file__).parent), root=str(tmp_path)), tmp_path)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) == 4
    for name, (index, delta) in ranks[0].items():
        assert torch.equal(index, ranks[1][name][0]) and torch.equal(delta, ranks[1][name][1]), name
        assert delta.abs().sum() > 0, name  # trained (the ranks saw different halves of the data)


def test_export_command_writes_the_adapter_that_the_merged_model_holds(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from sparseft.cli.command import export_command

    fit_bert(S2FT(sparsity=0.75, allocation="layer"), tmp_path / "run", 3)
    (checkpoint,) = (tmp_path / "run").rglob("*.ckpt")
    umask = os.umask(0o027)
    try:
        export_command(["--ckpt_path", str(checkpoint), "--output_dir", str(tmp_path / "out"),
                        "--adapter_path", str(tmp_path / "s2ft.safetensors")])
    finally:
        os.umask(umask)
    # the adapter is as readable as the export beside it: what the umask allows (safetensors alone writes 0600)
    modes = {path.stat().st_mode & 0o777 for path in [tmp_path / "s2ft.safetensors", *(tmp_path / "out").iterdir()]}
    assert modes == {0o640}
    adapter = load_adapter(tmp_path / "s2ft.safetensors")
    assert sorted(adapter) == [f"bert.encoder.layer.{i}.{name}.dense" for i in (0, 1)
                               for name in ("attention.output", "output")]
    assert [part["index"].numel() for part in adapter.values()] == [8, 16, 8, 16]  # 1 of 4 heads, 16 of 64 channels
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    remove_adapter_(plain, adapter)  # refuses unless every slice holds exactly base + Δ
    for name, part in adapter.items():
        assert torch.equal(plain.get_submodule(name).weight[:, part["index"]], part["base"])

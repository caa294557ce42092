"""N:M (2:4) masks with the gradual strategies: group top-k from each strategy's scores, the
schedule from dense to N:M, the refusals, and unchanged straight-through gradients."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch import nn

from sparseft.sparse.masks import group_topk_mask, nm_kept_per_group, nm_mask
from sparseft.sparse.parametrize import sparse_layers
from sparseft.sparse.prune import prune_, sparsify
from sparseft.sparse.schedules import SparsitySchedule
from sparseft.sparse.targets import select_targets
from sparseft.strategies import PST, SPDF, Magnitude, Movement, build_strategy
from sparseft.testing import SyntheticClassificationData, tiny_config
from sparseft.training.module import SparseFTModule

RAMP = dict(kind="cubic", initial_warmup=0.1, final_warmup=0.3)
GRADUAL = {
    "magnitude": dict(schedule=RAMP),
    "movement": dict(schedule=RAMP),
    "pst": dict(schedule=RAMP, learning_rate=1e-2),
    "spdf": dict(seed=3),
}


def kept_per_group(mask: torch.Tensor, m: int = 4) -> torch.Tensor:
    """Kept entries of every group of ``m`` consecutive inputs of an ``[out, in]`` mask."""
    out_features, in_features = mask.shape
    return mask.reshape(out_features, in_features // m, m).sum(-1)


def make_module(model_type: str = "bert", **overrides) -> SparseFTModule:
    config = tiny_config(model_type, pad_token_id=0, **overrides)
    return SparseFTModule(config=config, num_labels=2, learning_rate=1e-3)


class GroupCounts(Callback):
    """After every training step: the applied sparsity, the set of per-group kept counts over
    all target layers, and a copy of the masks."""

    def __init__(self) -> None:
        self.sparsity: list[float] = []
        self.counts: list[set[int]] = []
        self.masks: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        strategy = next(c for c in trainer.callbacks if hasattr(c, "layers"))
        self.sparsity.append(strategy.applied_sparsity)
        self.counts.append({int(c) for layer in strategy.layers for c in kept_per_group(layer.mask).unique()})
        self.masks.append([layer.mask.clone() for layer in strategy.layers])


def fit(strategy, steps: int, model_type: str = "bert", callbacks=()) -> SparseFTModule:
    torch.manual_seed(0)
    module = make_module(model_type)
    trainer = Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[strategy, *callbacks],
    )
    trainer.fit(module, SyntheticClassificationData(size=32))
    return module


# ---- the rule ----------------------------------------------------------------------------------
def test_kept_per_group_steps_from_m_to_n_never_ahead_of_the_schedule():
    assert [nm_kept_per_group(s, 2, 4) for s in (0.0, 0.2, 0.2499, 0.25, 0.4, 0.5)] == [4, 4, 4, 3, 3, 2]
    assert nm_kept_per_group(0.75, 1, 4) == 1  # 0.75·4 is 2.9999... in floats: still prunes 3
    assert [nm_kept_per_group(s, 4, 8) for s in (0.1, 0.125, 0.3, 0.5)] == [8, 7, 6, 4]
    with pytest.raises(ValueError, match="2:4 prunes at most 0.5"):
        nm_kept_per_group(0.6, 2, 4)


def test_group_topk_keeps_the_highest_scores_of_every_group():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 4.0, 3.0, 2.0, 1.0]])
    assert group_topk_mask(scores, 3, 4).tolist() == [[False, True, True, True, True, True, True, False]]
    assert group_topk_mask(scores, 4, 4).all()
    assert torch.equal(group_topk_mask(scores, 2, 4), nm_mask(scores, 2, 4))
    with pytest.raises(ValueError, match="between 1 and 4"):
        group_topk_mask(scores, 0, 4)


@pytest.mark.parametrize("kept", [1, 2, 3])
def test_group_topk_equals_a_stable_descending_sort_of_every_group_ties_included(kept):
    torch.manual_seed(0)
    for scores in (torch.randn(16, 32), torch.randint(0, 3, (16, 32)).float(), torch.zeros(4, 8)):
        order = torch.sort(scores.view(-1, 8, 4), dim=-1, descending=True, stable=True).indices
        expected = torch.zeros(scores.view(-1, 8, 4).shape, dtype=torch.bool).scatter_(-1, order[..., :kept], True)
        assert torch.equal(group_topk_mask(scores, kept, 4), expected.view_as(scores))


def test_prune_at_an_intermediate_sparsity_keeps_that_many_per_group():
    layers = sparsify(nn.Sequential(nn.Linear(8, 3)), ["0"])
    prune_(layers, [torch.rand(3, 8)], 0.3, "2:4")
    assert (kept_per_group(layers[0].mask) == 3).all()
    with pytest.raises(ValueError, match="2:4 prunes at most 0.5"):
        prune_(layers, [torch.rand(3, 8)], 0.9, "2:4")


# ---- every gradual strategy ends at exactly N of every M ------------------------------------
@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("name", sorted(GRADUAL))
def test_every_group_of_four_keeps_exactly_two_at_the_end(name, model_type):
    strategy = build_strategy({"name": name, "init_args": dict(sparsity=0.5, pattern="2:4", **GRADUAL[name])})
    fit(strategy, 6, model_type)
    for layer in strategy.layers:
        assert (kept_per_group(layer.mask) == 2).all(), layer.name
        # the effective weight in the stored layout ([in, out] for GPT-2's Conv1D) has its groups
        # along the input dimension, as to_sparse_semi_structured needs of the [out, in] weight
        stored = layer.layer.module.weight
        out_in = stored.t() if layer.layer.transposed else stored
        assert (kept_per_group(out_in != 0) == 2).all(), layer.name
        if layer.layer.transposed and name != "spdf":  # not along the stored rows by accident
            assert not (kept_per_group(stored != 0) == 2).all(), layer.name
    assert strategy.measured_sparsity() == 0.5


# ---- the schedule to N:M ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["magnitude", "movement", "pst"])
def test_a_ramp_keeps_m_minus_floor_s_m_per_group_at_every_step(name):
    strategy = build_strategy({"name": name, "init_args": dict(sparsity=0.5, pattern="2:4", **GRADUAL[name])})
    record = GroupCounts()
    fit(strategy, 12, callbacks=[record])
    for sparsity, counts in zip(record.sparsity, record.counts, strict=True):
        assert counts == {4 - int(sparsity * 4 + 1e-9)}, sparsity  # every group of every layer alike
    kept = [next(iter(counts)) for counts in record.counts]
    assert kept == sorted(kept, reverse=True) and {4, 3, 2} <= set(kept), kept
    if name == "magnitude":  # pruned weights stay pruned: every mask only loses entries
        for before, after in zip(record.masks, record.masks[1:]):
            for old, new in zip(before, after, strict=True):
                assert not (new & ~old).any()


def test_one_shot_goes_from_dense_to_two_of_four_at_the_given_step():
    schedule = SparsitySchedule(kind="one_shot", initial_warmup=4, warmup_unit="steps")
    record = GroupCounts()
    fit(Magnitude(sparsity=0.5, pattern="2:4", schedule=schedule), 8, callbacks=[record])
    assert record.counts == [{4}] * 4 + [{2}] * 4


def test_spdf_static_two_of_four_mask_keeps_the_largest_initial_weights_and_never_changes():
    torch.manual_seed(0)
    initial = {layer.name: layer.weight().detach().clone() for layer in select_targets(make_module().model, None)}
    strategy = SPDF(sparsity=0.5, pattern="2:4", init="magnitude")
    record = GroupCounts()
    fit(strategy, 6, callbacks=[record])
    for layer in strategy.layers:
        assert torch.equal(layer.mask, nm_mask(initial[layer.name].abs(), 2, 4)), layer.name
        assert (layer.stored_weight[~layer.mask] == 0).all(), layer.name  # W0 itself zeroed where pruned
    assert all(all(torch.equal(a, b) for a, b in zip(masks, record.masks[0])) for masks in record.masks)


# ---- refusals ----------------------------------------------------------------------------------
def test_widths_not_divisible_by_m_are_refused_at_attach_naming_the_layer():
    model = make_module(intermediate_size=66).model  # FFN output layers have 66 inputs
    strategy = Magnitude(sparsity=0.5, pattern="2:4", schedule=SparsitySchedule(**RAMP))
    with pytest.raises(ValueError, match=r"layer bert\.encoder\.layer\.0\.output\.dense has 66"):
        strategy.attach(model)
    assert sparse_layers(model) == []  # refused before any layer was parametrized
    layers = sparsify(model, ["ffn_out"])  # the plain API names the layer too
    with pytest.raises(ValueError, match=r"layer\.1\.output\.dense \(66 inputs\)"):
        prune_(layers, [torch.rand(layer.layer.shape) for layer in layers], 0.5, "2:4")


def test_patterns_a_strategy_cannot_follow_are_refused():
    with pytest.raises(ValueError, match="means sparsity 0.5"):
        Movement(sparsity=0.7, pattern="2:4")
    with pytest.raises(ValueError, match="soft movement pruning"):
        Movement(sparsity=0.5, variant="soft", pattern="2:4")
    with pytest.raises(ValueError, match="PST ranks every matrix"):
        PST(sparsity=0.5, pattern="global")
    with pytest.raises(ValueError, match="SPDF's masks are uniform"):
        SPDF(sparsity=0.5, pattern="global")
    with pytest.raises(ValueError, match="quote it in YAML"):
        Magnitude(sparsity=0.5, pattern=124)  # what YAML makes of an unquoted 2:4


# ---- straight-through gradients are those of the unstructured case ------------------------------
def test_movement_score_gradient_with_an_nm_mask_is_output_gradient_times_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 3, bias=False))
    weight = model[0].weight.detach().clone()
    strategy = Movement(sparsity=0.5, pattern="2:4", targets="0", freeze_embeddings=False)
    strategy.attach(model)
    with torch.no_grad():
        strategy.scores()[0].copy_(torch.randn(3, 8))
    strategy.update_masks(0.5)
    mask = strategy.layers[0].mask
    assert (kept_per_group(mask) == 2).all()
    inputs = torch.randn(5, 8)
    model(inputs).pow(2).sum().backward()
    grad_effective = (2 * inputs @ (weight * mask).t()).t() @ inputs  # ∂L/∂W'
    assert torch.allclose(strategy.scores()[0].grad, grad_effective * weight)  # reaches pruned scores too
    assert torch.allclose(model[0].parametrizations.weight.original.grad, grad_effective * mask)


@pytest.mark.parametrize("name", ["movement", "pst"])
def test_straight_through_gradients_equal_the_unstructured_ones_given_the_same_mask(name):
    args = dict(sparsity=0.5, **GRADUAL[name])
    batch = next(iter(SyntheticClassificationData(size=8).train_dataloader()))
    grads = []
    for pattern in ("2:4", "layer"):
        torch.manual_seed(0)
        module = make_module(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        strategy = build_strategy({"name": name, "init_args": dict(args, pattern=pattern)})
        strategy.attach(module.model)
        if pattern == "2:4":
            with torch.no_grad():  # scores away from their (constant or zero) start
                for parameter in module.parameters():
                    if parameter.requires_grad:
                        parameter.add_(torch.randn_like(parameter) * 0.01)
            strategy.update_masks(0.5)
            masks = [layer.mask.clone() for layer in strategy.layers]
            assert all((kept_per_group(keep) == 2).all() for keep in masks)
            state = module.state_dict()
        else:
            module.load_state_dict(state)
            for layer, keep in zip(strategy.layers, masks, strict=True):
                layer.set_mask_(keep)
        module.model(**batch).loss.backward()
        grads.append({key: p.grad for key, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("score" in key for key in grads[0])
    for key, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][key], atol=1e-7), key

"""PST against hand-computed tensors: the score, the mask count and every gradient path."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from sparseft.backbones.loading import load_backbone
from sparseft.sparse.masks import pruned_count, topk_mask
from sparseft.sparse.measure import count_parameters
from sparseft.sparse.prune import prune_on_next_forward_
from sparseft.sparse.schedules import SparsitySchedule
from sparseft.strategies import PST
from sparseft.testing import SyntheticClassificationData, tiny_config
from sparseft.training.module import SparseFTModule

W0 = torch.tensor([[1.0, -2.0, 3.0], [4.0, 0.5, -6.0]])
U = torch.tensor([[1.0], [-1.0]])           # out x r_w (r_w = 1)
V = torch.tensor([[0.5, 0.0, -1.0]])        # r_w x in
A = torch.tensor([[2.0], [1.0]])            # out x r_m
B = torch.tensor([[0.1, -0.2, 0.3]])        # r_m x in
R = torch.tensor([0.5, -0.5])
C = torch.tensor([0.0, 1.0, -1.0])
BETA, ALPHA1, ALPHA2 = 2.0, 0.5, 3.0


def one_layer() -> tuple[nn.Sequential, PST]:
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(W0)
    strategy = PST(sparsity=0.5, targets="0", weight_rank=1, mask_rank=1, beta=BETA, alpha1=ALPHA1, alpha2=ALPHA2)
    layer = strategy.attach(model)[0]
    with torch.no_grad():
        layer.param.delta.left.copy_(U)
        layer.param.delta.right.copy_(V)
        for name, value in {"A": A, "B": B, "R": R, "C": C}.items():
            getattr(layer.param.score, name).copy_(value)
    return model, strategy


def test_score_is_updated_magnitude_plus_factorized_part():
    _, strategy = one_layer()
    w_eff = W0 + BETA * U @ V  # [[2, -2, 1], [3, .5, -4]]
    assert torch.equal(w_eff, torch.tensor([[2.0, -2.0, 1.0], [3.0, 0.5, -4.0]]))
    expected = w_eff.abs() + ALPHA1 * A @ B + ALPHA2 * (R[:, None] + C[None, :])
    assert torch.allclose(strategy.compute_scores()[0], expected)
    # by hand, first row: |2| + .5*.2 + 3*.5 = 3.6 ; |-2| - .5*.4 + 3*1.5 = 6.3 ; |1| + .5*.6 + 3*(-.5) = -.2
    assert torch.allclose(expected, torch.tensor([[3.6, 6.3, -0.2], [1.55, 1.9, -0.35]]))


def test_mask_prunes_exactly_int_numel_times_sparsity_lowest_scores():
    _, strategy = one_layer()
    strategy.update_masks(0.5)
    # second row by hand: |3| + .05 - 1.5 = 1.55 ; |.5| - .1 + 1.5 = 1.9 ; |-4| + .15 - 4.5 = -.35
    # scores [[3.6, 6.3, -0.2], [1.55, 1.9, -0.35]] -> prune -0.35, -0.2 and 1.55
    assert strategy.layers[0].mask.tolist() == [[True, True, False], [False, True, False]]
    assert int((~strategy.layers[0].mask).sum()) == pruned_count(6, 0.5) == 3


@pytest.mark.parametrize("masks_from", ["update_masks", "the forward's scores"])
def test_pruned_count_is_the_references_int_of_numel_times_sparsity(masks_from):
    model = nn.Sequential(nn.Linear(10, 10, bias=False))
    strategy = PST(sparsity=0.29, targets="0")
    strategy.attach(model)
    if masks_from == "update_masks":
        strategy.update_masks(0.29)
    else:
        prune_on_next_forward_(strategy.layers, 0.29, strategy.pruned_count_rule)
        model(torch.randn(2, 10))
    # SparseBinarizer: num_prune = int(100 * 0.29) = int(28.999999999999996) = 28
    assert int((~strategy.layers[0].mask).sum()) == int(100 * 0.29) == 28


@pytest.mark.parametrize("masks_from", ["update_masks", "the forward's scores"])
def test_every_gradient_path(masks_from):
    model, strategy = one_layer()
    if masks_from == "update_masks":
        strategy.update_masks(0.5)
    else:
        prune_on_next_forward_(strategy.layers, 0.5)
    layer = strategy.layers[0]
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.0, 2.0]])
    upstream = torch.tensor([[1.0, -1.0], [2.0, 0.5]])  # dL/dy
    (model(x) * upstream).sum().backward()
    assert layer.mask.tolist() == [[True, True, False], [False, True, False]]  # by hand, test above
    mask = layer.mask.float()
    grad_w_prime = upstream.t() @ x                      # dL/dW' for y = x W'^T
    w_eff = W0 + BETA * U @ V
    g = grad_w_prime * w_eff                             # STE: dL/dS = dL/dW' * W_eff, no mask gating
    score = layer.param.score
    assert torch.allclose(score.A.grad, ALPHA1 * g @ B.t())
    assert torch.allclose(score.B.grad, ALPHA1 * A.t() @ g)
    assert torch.allclose(score.R.grad, ALPHA2 * g.sum(1))
    assert torch.allclose(score.C.grad, ALPHA2 * g.sum(0))
    # U, V: through M * W_eff (dL/dW' * M) and through |W_eff| in S (sign(W_eff) * g)
    grad_w_eff = grad_w_prime * mask + torch.sign(w_eff) * g
    assert torch.allclose(layer.param.delta.left.grad, BETA * grad_w_eff @ V.t())
    assert torch.allclose(layer.param.delta.right.grad, BETA * U.t() @ grad_w_eff)
    assert layer.stored_weight.grad is None and not layer.stored_weight.requires_grad  # W0 frozen


def test_trainable_parameters_are_17_times_out_plus_in_per_matrix():
    model = load_backbone("sequence-classification", config=tiny_config("bert"), num_labels=2)
    strategy = PST(train_head=False)
    strategy.attach(model)
    per_block = 4 * (32 + 32) + (64 + 32) + (32 + 64)
    assert count_parameters(model)[0] == 17 * per_block * 2


@pytest.mark.slow
def test_bert_base_has_2_82m_pst_parameters():
    config = dict(model_type="bert")  # bert-base-uncased's architecture, random weights
    model = load_backbone("sequence-classification", config=config, num_labels=2)
    strategy = PST(train_head=False)
    strategy.attach(model)
    assert count_parameters(model)[0] == 2_820_096
    strategy_with_head = PST()
    model = load_backbone("sequence-classification", config=config, num_labels=2)
    strategy_with_head.attach(model)
    assert count_parameters(model)[0] == 2_820_096 + 768 * 2 + 2


def test_gpt2_prunes_q_k_v_as_three_matrices_and_trains_only_the_factors(tmp_path):
    module = SparseFTModule(config=tiny_config("gpt2", pad_token_id=0), num_labels=2, learning_rate=1e-2)
    strategy = PST(sparsity=0.75)
    w0 = module.model.transformer.h[0].attn.c_attn.weight.detach().clone()
    trainer = Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=[strategy],
                      default_root_dir=tmp_path)
    trainer.fit(module, SyntheticClassificationData(size=32))
    c_attn = strategy.layers[0]
    assert c_attn.layer.role == "qkv" and len(c_attn.param.delta.blocks) == 3
    assert c_attn.param.score.magnitude_term  # the |W_eff| gradient comes from the mask for all three
    for block in c_attn.mask.chunk(3):  # each of q, k, v exactly 75% sparse
        assert int((~block).sum()) == pruned_count(block.numel(), 0.75)
    assert torch.equal(c_attn.stored_weight, w0)  # W0 never changes
    # per layer: q, k, v (32 x 32 each) + c_proj (32 x 32) + c_fc (128 x 32) + mlp c_proj (32 x 128)
    per_block = 17 * (3 * 64 + 64 + 160 + 160)
    head = module.model.score.weight.numel()
    assert count_parameters(module)[0] == 2 * per_block + head


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_next_forward_sets_the_masks_prune_would_set_from_the_same_scores(grad_enabled):
    """GPT-2: a transposed Conv1D and a fused qkv ranked as three matrices."""
    torch.manual_seed(0)
    model = load_backbone("sequence-classification", config=tiny_config("gpt2", pad_token_id=0), num_labels=2)
    strategy = PST(sparsity=0.6)
    strategy.attach(model)
    for parameter in strategy.factors():  # scores that are not pure magnitude
        torch.nn.init.normal_(parameter, std=0.05)
    expected = [topk_mask(s, 0.6, layer.row_blocks) for s, layer in zip(strategy.compute_scores(), strategy.layers)]
    prune_on_next_forward_(strategy.layers, 0.6)
    assert all(layer.mask.all() for layer in strategy.layers)  # nothing changes before the forward
    with torch.set_grad_enabled(grad_enabled):  # no gradient: e.g. the first pass of activation checkpointing
        model(input_ids=torch.randint(0, 400, (2, 6)))
    for layer, keep in zip(strategy.layers, expected, strict=True):
        assert torch.equal(layer.mask, keep), layer.name
        assert layer.param.mask_from_scores is None  # applied once, not at every forward


class PSTWithSeparateScores(PST):
    """PST with the generic mask update: scores computed again, without autograd, before the forward."""

    masks_from_forward_scores = False


def test_masks_from_the_forward_train_exactly_like_a_separate_mask_update(tmp_path):
    runs = {}
    for strategy_class in (PST, PSTWithSeparateScores):
        torch.manual_seed(0)
        module = SparseFTModule(config=tiny_config("bert"), num_labels=2, learning_rate=1e-2)
        strategy = strategy_class(sparsity=0.8, schedule=SparsitySchedule(initial_warmup=0.2, final_warmup=0.2))
        trainer = Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, callbacks=[strategy],
                          default_root_dir=tmp_path)
        trainer.fit(module, SyntheticClassificationData(size=48))
        runs[strategy_class] = (module.model.state_dict(), strategy.measured_sparsity())
    (fused, fused_sparsity), (separate, separate_sparsity) = runs.values()
    assert fused.keys() == separate.keys()
    for name in fused:
        assert torch.equal(fused[name], separate[name]), name
    assert fused_sparsity == separate_sparsity == pytest.approx(0.8, abs=0.01)

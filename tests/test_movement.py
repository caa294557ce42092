"""Movement pruning against hand-computed tensors."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from sparseft.sparse.masks import threshold_mask
from sparseft.sparse.schedules import SparsitySchedule
from sparseft.strategies import Movement
from sparseft.testing import SyntheticClassificationData, tiny_config
from sparseft.training.module import SparseFTModule

W = torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]])
X = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]])


def one_linear(**kwargs) -> tuple[nn.Sequential, Movement]:
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(W)
    strategy = Movement(targets="0", freeze_embeddings=False, **kwargs)
    strategy.attach(model)
    return model, strategy


def test_score_gradient_is_output_gradient_times_unmasked_weight():
    model, strategy = one_linear(sparsity=0.5)
    strategy.layers[0].set_mask_(torch.tensor([[True, False, True], [False, True, True]]))
    model(X).pow(2).sum().backward()
    masked = W * strategy.layers[0].mask
    out = X @ masked.t()                      # [2 examples, 2 outputs]
    grad_w_eff = (2 * out).t() @ X             # dL/dW' = sum_n dL/dy_n x_n^T
    assert torch.allclose(strategy.scores()[0].grad, grad_w_eff * W)
    # the weight itself gets the masked gradient: pruned entries receive exactly zero
    weight_grad = model[0].parametrizations.weight.original.grad
    assert torch.allclose(weight_grad, grad_w_eff * strategy.layers[0].mask)
    assert (weight_grad[~strategy.layers[0].mask] == 0).all()


def test_sgd_scores_accumulate_minus_weight_times_weight_gradient():
    model, strategy = one_linear(sparsity=0.5)  # mask all ones: dL/dW' = dL/dW
    optimizer = torch.optim.SGD(strategy.scores(), lr=0.1)
    loss = model(X).pow(2).sum()
    loss.backward()
    grad_w = model[0].parametrizations.weight.original.grad.clone()
    optimizer.step()
    assert torch.allclose(strategy.scores()[0].detach(), -0.1 * grad_w * W)


def test_hard_topk_keeps_the_exact_count_and_breaks_ties_by_position():
    _, strategy = one_linear(sparsity=0.5)
    strategy.update_masks(0.5)  # all scores are 0 at init: the first three positions are pruned
    assert strategy.layers[0].mask.tolist() == [[False, False, False], [True, True, True]]
    with torch.no_grad():
        strategy.scores()[0].copy_(torch.tensor([[0.3, -1.0, 2.0], [0.3, 0.1, 0.3]]))
    strategy.update_masks(0.5)
    # lowest three: -1.0, 0.1, then the first of the tied 0.3s (position 0)
    assert strategy.layers[0].mask.tolist() == [[False, False, True], [True, False, True]]


def test_kept_count_is_the_references_int_of_the_kept_fraction():
    model = nn.Sequential(nn.Linear(32, 32, bias=False))
    strategy = Movement(targets="0", freeze_embeddings=False)
    strategy.attach(model)
    with torch.no_grad():
        strategy.scores()[0].copy_(torch.randn(32, 32))
    strategy.update_masks(0.9)
    # emmental's TopKBinarizer keeps int(0.1 * 1024) = 102 (flooring the pruned count would keep 103)
    assert int(strategy.layers[0].mask.sum()) == int(0.1 * 1024) == 102


def test_default_schedule_is_the_references_one_and_two_lr_warmups():
    schedule = Movement().schedule
    assert (schedule.initial_warmup, schedule.final_warmup, schedule.warmup_unit) == (1, 2, "lr_warmup")
    assert schedule.window(1000, lr_warmup_steps=100) == (100, 800)


def test_schedule_in_lr_warmups_without_an_lr_warmup_is_refused(tmp_path):
    # the reference would prune from step 0 (t_i = t_f = 0 warm-ups of a 0-step LR warm-up)
    module = SparseFTModule(config=tiny_config("bert"), num_labels=2, warmup_ratio=0.0)
    trainer = Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[Movement(sparsity=0.5)])
    with pytest.raises(ValueError, match="counts its warm-ups in learning-rate warm-ups"):
        trainer.fit(module, SyntheticClassificationData(size=16))


def test_a_short_run_whose_lr_warmup_rounds_to_zero_names_the_cause_and_a_fix_that_works(tmp_path):
    # movement_bert.yaml's warm-ups (1 and 1 LR warm-ups, warmup_ratio 0.163) on a 2-step smoke run
    def fit(max_steps: int) -> None:
        schedule = SparsitySchedule(initial_warmup=1, final_warmup=1, warmup_unit="lr_warmup")
        module = SparseFTModule(config=tiny_config("bert"), num_labels=2, warmup_ratio=0.163)
        trainer = Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                          callbacks=[Movement(sparsity=0.5, schedule=schedule)])
        trainer.fit(module, SyntheticClassificationData(size=64))

    with pytest.raises(ValueError) as refused:
        fit(2)
    assert "int(0.163 × 2) = 0 warm-up steps" in str(refused.value)
    assert "--trainer.max_steps 7" in str(refused.value)
    fit(7)  # the fix it names runs: int(0.163 × 7) = 1 warm-up step, pruning from step 1 to step 6


def test_fewest_steps_with_an_lr_warmup():
    schedule = SparsitySchedule(initial_warmup=1, final_warmup=2, warmup_unit="lr_warmup")
    assert schedule.fewest_steps_with_lr_warmup(0.25) == 4  # int(0.25 × 4) = 1; window (1, 2)
    assert schedule.fewest_steps_with_lr_warmup(0.0) is None
    assert schedule.fewest_steps_with_lr_warmup(0.5) is None  # three warm-ups of half of training never fit


def test_initial_sparsity_above_the_final_one_is_refused():
    with pytest.raises(ValueError, match="would un-prune weights"):
        Movement(sparsity=0.3, schedule=SparsitySchedule(initial_sparsity=0.6))


def test_soft_mask_threshold_penalty_and_floor():
    _, strategy = one_linear(variant="soft", final_threshold=0.5, final_lambda=10.0,
                             schedule=SparsitySchedule(initial_warmup=0.0, final_warmup=0.0, warmup_unit="steps"))
    scores = torch.tensor([[0.0, 2.0, -1.0], [1.0, -3.0, 0.5]])
    with torch.no_grad():
        strategy.scores()[0].copy_(scores)
    strategy.total_steps, strategy.step = 10, 5
    tau = 0.5 * (1 - 0.5**3)  # cubic at half way
    assert strategy.threshold() == pytest.approx(tau)
    strategy.update_masks(0.0)
    assert strategy.layers[0].mask.tolist() == (torch.sigmoid(scores) > tau).tolist()
    # λ_t = final_λ · τ_t / τ_f, penalty = mean over matrices of mean σ(S)
    expected = 10.0 * tau / 0.5 * torch.sigmoid(scores).mean()
    assert strategy.loss_term().item() == pytest.approx(expected.item())
    # a threshold above every score keeps int(0.005 * numel) + 1 = 1 weight, the largest
    assert threshold_mask(torch.sigmoid(scores), 0.99).tolist() == [[False, True, False], [False, False, False]]


def test_global_topk_ranks_layers_together_and_keeps_its_threshold_between_recomputes():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    strategy = Movement(sparsity=0.5, targets=["0", "1"], pattern="global", global_topk_every=25,
                        freeze_embeddings=False)
    strategy.attach(model)
    with torch.no_grad():
        strategy.scores()[0].copy_(torch.tensor([[0.1, 0.2], [0.3, 0.4]]))
        strategy.scores()[1].copy_(torch.tensor([[5.0, 6.0], [7.0, 0.0]]))
    strategy.step = 0
    strategy.update_masks(0.5)
    assert strategy.layers[0].mask.tolist() == [[False, False], [False, True]]
    assert strategy.layers[1].mask.tolist() == [[True, True], [True, False]]
    with torch.no_grad():
        strategy.scores()[1][1, 1] = 9.0  # moves above the kept minimum (0.4)
    strategy.step = 1
    strategy.update_masks(0.5)  # no recompute: same threshold, so one more weight survives
    assert int(strategy.layers[1].mask.sum()) == 4
    strategy.step = 25
    strategy.update_masks(0.5)  # recompute: exactly half again
    assert sum(int(layer.mask.sum()) for layer in strategy.layers) == 4


def test_scores_have_their_own_group_and_embeddings_are_frozen(tmp_path):
    module = SparseFTModule(config=tiny_config("gpt2", pad_token_id=0), num_labels=2, learning_rate=1e-3)
    strategy = Movement(sparsity=0.8, schedule=SparsitySchedule(initial_warmup=0.1, final_warmup=0.3))
    trainer = Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=[strategy],
                      default_root_dir=tmp_path)
    trainer.fit(module, SyntheticClassificationData(size=24))
    groups = trainer.optimizers[0].param_groups
    assert groups[0]["params"] == strategy.scores() and groups[0]["weight_decay"] == 0.0
    assert groups[0]["initial_lr"] == 1e-2
    assert not module.model.transformer.wte.weight.requires_grad
    assert [s.layer.role for s in strategy.layers[:4]] == ["qkv", "o", "ffn_in", "ffn_out"]  # Conv1D targets
    assert strategy.measured_sparsity() == pytest.approx(0.8, abs=1e-3)


def test_soft_variant_trains_and_reports_what_the_threshold_gives(tmp_path):
    module = SparseFTModule(config=tiny_config("bert"), num_labels=2, learning_rate=1e-3)
    strategy = Movement(variant="soft", final_threshold=0.1, final_lambda=50.0, score_lr=0.5,
                        schedule=SparsitySchedule(initial_warmup=0.0, final_warmup=0.2))
    trainer = Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=[strategy],
                      default_root_dir=tmp_path)
    trainer.fit(module, SyntheticClassificationData(size=40))
    assert 0.0 < strategy.measured_sparsity() < 1.0  # the penalty pushed scores below the threshold
    assert strategy.applied_sparsity == strategy.measured_sparsity()
    for sparse in strategy.layers:
        assert int(sparse.mask.sum()) >= int(0.005 * sparse.mask.numel()) + 1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown movement variant 'l0'"):
        Movement(variant="l0")
    with pytest.raises(ValueError, match="threshold on sigmoid"):
        Movement(variant="soft", final_threshold=1.5)

"""Masks held in the weights (sparseft.sparse.inplace): the dense forward, the masking forward's results."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch import nn

from sparseft.sparse.deltas import LowRank
from sparseft.sparse.inplace import hold_, mask_gradients_, mask_weights_, release_, stored_keep, zero_pruned_
from sparseft.sparse.prune import prune_, sparsify
from sparseft.sparse.schedules import SparsitySchedule
from sparseft.sparse.scores import LearnedScores
from sparseft.strategies import Magnitude
from sparseft.testing import SyntheticClassificationData, tiny_config
from sparseft.testing.conformance import check_in_place
from sparseft.training.module import SparseFTModule


def gpt2_layers(sparsity: float = 0.5) -> tuple[nn.Module, list]:
    """A tiny GPT-2 (``Conv1D``: ``W0`` stored ``[in, out]``) with magnitude masks at ``sparsity``."""
    torch.manual_seed(0)
    model = SparseFTModule(config=tiny_config("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                           task="causal-lm").model
    layers = sparsify(model)
    prune_(layers, [layer.dense().abs() for layer in layers], sparsity)
    return model, layers


def test_a_held_layer_returns_its_stored_weight_zeroed_where_pruned():
    model, layers = gpt2_layers()
    expected = [layer.layer.weight().detach().clone() for layer in layers]
    hold_(layers)
    for layer, weight in zip(layers, expected, strict=True):
        assert layer.layer.module.weight is layer.stored_weight  # no where(), no temporary
        assert torch.equal(layer.layer.weight(), weight)
        assert layer.stored_weight.t().eq(0).sum() >= (~layer.mask).sum()


def test_held_and_masking_forwards_give_the_same_loss_and_masked_gradients():
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(1))
    grads = {}
    for held in (False, True):
        model, layers = gpt2_layers()
        if held:
            hold_(layers)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        mask_gradients_(layers)
        grads[held] = (loss.detach(), [layer.stored_weight.grad.clone() for layer in layers])
    assert torch.equal(grads[False][0], grads[True][0])
    for masking, holding in zip(grads[False][1], grads[True][1], strict=True):
        torch.testing.assert_close(holding, masking, rtol=0, atol=1e-7)


def test_a_new_mask_releases_the_hold_until_the_newly_pruned_weights_are_zeroed():
    _, layers = gpt2_layers(0.25)
    hold_(layers)
    layer = layers[0]
    prune_([layer], [layer.dense().abs()], 0.75)  # more pruned; W0 still holds the old values there
    assert not layer.param.held
    assert torch.equal(layer.layer.weight(), torch.where(layer.mask, layer.dense(), 0.0))
    hold_([layer])
    assert layer.param.held and (layer.stored_weight[~stored_keep(layer)] == 0).all()


def test_weights_moved_where_pruned_are_zeroed_again_and_release_masks_in_the_forward():
    _, layers = gpt2_layers()
    hold_(layers)
    layer = layers[0]
    with torch.no_grad():
        layer.stored_weight.add_(1.0)  # what an optimizer step with old moments does
    mask_weights_([layer])
    assert (layer.stored_weight[~stored_keep(layer)] == 0).all()
    release_([layer])
    with torch.no_grad():
        layer.stored_weight.add_(1.0)
    assert (layer.layer.weight()[~layer.mask] == 0).all()


@pytest.mark.parametrize("attached", ["delta", "score"])
def test_a_layer_with_delta_or_scores_is_not_held(attached):
    model = SparseFTModule(config=tiny_config("bert"), num_labels=2).model

    make_delta = (lambda layer: LowRank(layer.shape, 2)) if attached == "delta" else None
    make_score = (lambda layer: LearnedScores(layer.shape)) if attached == "score" else None
    layers = sparsify(model, make_delta=make_delta, make_score=make_score)
    with pytest.raises(ValueError, match="not held"):
        hold_(layers)


class Regrowing(Magnitude):
    """Random masks drawn again at every update, so pruned weights return with the value they had, which
    holding the mask in ``W0`` (their value zeroed) cannot reproduce: it must not claim to hold."""

    def layer_scores(self, layer):
        return torch.rand(layer.mask.shape, generator=torch.Generator().manual_seed(self.step))


def test_the_in_place_check_catches_a_strategy_whose_pruned_weights_return(tmp_path):
    with pytest.raises(AssertionError, match="differs between the held and the masking run"):
        check_in_place(lambda: Regrowing(sparsity=0.5, schedule=SparsitySchedule("linear", initial_warmup=0.0,
                                                                                 final_warmup=0.5)), tmp_path)


def test_holding_zeroes_the_newly_pruned_weights_optimizer_state():
    model, layers = gpt2_layers(0.25)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    prune_(layers, [layer.dense().abs() * layer.mask for layer in layers], 0.75)
    hold_(layers, [optimizer])
    for layer in layers:
        state = optimizer.state[layer.stored_weight]
        pruned = ~stored_keep(layer)
        assert (state["exp_avg"][pruned] == 0).all() and (state["exp_avg_sq"][pruned] == 0).all()
        assert (state["exp_avg"][~pruned] != 0).any()


class DenseUpdate(torch.optim.SGD):
    """SGD that also adds the mean gradient to every entry: like Muon's or Shampoo's, its update of a
    masked gradient is dense, so pruned weights move unless masked after the step."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    parameter.add_(parameter.grad.mean(), alpha=-group["lr"])
        return loss


class HeldZeros(Callback):
    """After every optimizer step (and the strategy's own hooks) every layer is held with ``W0`` 0 where pruned."""

    def __init__(self, strategy: Magnitude) -> None:
        self.strategy, self.steps = strategy, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for layer in self.strategy.layers:
            assert layer.param.held and (layer.stored_weight[~stored_keep(layer)] == 0).all(), layer.name
        self.steps += 1


def test_pruned_weights_stay_zero_under_an_optimizer_whose_update_is_dense(tmp_path):
    strategy = Magnitude(sparsity=0.5, schedule=SparsitySchedule("linear", initial_warmup=0.0, final_warmup=0.5))
    check = HeldZeros(strategy)
    torch.manual_seed(0)
    module = SparseFTModule(config=tiny_config("bert", hidden_dropout_prob=0.0), num_labels=2, learning_rate=0.1,
                            optimizer=lambda params, lr: DenseUpdate(params, lr=lr))
    trainer = Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                      default_root_dir=tmp_path, callbacks=[strategy, check])
    trainer.fit(module, SyntheticClassificationData(size=32))
    assert check.steps == 8 and strategy.measured_sparsity() == 0.5


class Rebuild(Callback):
    """After optimizer step ``at``, replace the run's AdamW with a new one carrying its state (as a strategy
    that rebuilds its optimizers mid-run does); after every later step, check that the optimizer in use
    has zero moments where pruned."""

    def __init__(self, strategy: Magnitude, at: int) -> None:
        self.strategy, self.at, self.old, self.checked = strategy, at, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        if self.old is not None:
            assert optimizer is not self.old
            for layer in self.strategy.layers:
                state, pruned = optimizer.state[layer.stored_weight], ~stored_keep(layer)
                assert (state["exp_avg"][pruned] == 0).all() and (state["exp_avg_sq"][pruned] == 0).all(), layer.name
            self.checked += 1
        if trainer.global_step == self.at:
            new = torch.optim.AdamW([dict(group) for group in optimizer.param_groups])
            new.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # its own moments, not shared
            self.old, trainer.optimizers = optimizer, [new]


def test_holding_zeroes_the_state_of_the_optimizer_in_use_after_it_was_replaced(tmp_path):
    strategy = Magnitude(sparsity=0.75, schedule=SparsitySchedule("linear", initial_warmup=0.0, final_warmup=0.25))
    rebuild, check = Rebuild(strategy, at=2), HeldZeros(strategy)
    torch.manual_seed(0)
    module = SparseFTModule(config=tiny_config("bert", hidden_dropout_prob=0.0), num_labels=2, learning_rate=0.1)
    trainer = Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                      default_root_dir=tmp_path, callbacks=[strategy, rebuild, check])
    trainer.fit(module, SyntheticClassificationData(size=32))
    assert rebuild.checked == 6 and check.steps == 8 and strategy.measured_sparsity() == 0.75



def bits(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s bits as integers (a complex entry as two of its parts' size)."""
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex128])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_zeroing_the_pruned_gives_the_plain_where_bit_for_bit(dtype, sparsity):
    generator = torch.Generator().manual_seed(round(sparsity * 10))
    whole = (torch.randn(48, 40, generator=generator) * 3).to(dtype)  # about half negative
    whole.view(-1)[:40] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0] * 8).to(dtype)
    keep = torch.rand(48, 40, generator=generator) >= sparsity
    for target, mask in ((whole.clone(), keep), (whole.clone().t(), keep.t())):  # contiguous, and not
        expected = torch.where(mask, target, torch.zeros((), dtype=dtype))
        zero_pruned_(target, mask)
        assert torch.equal(bits(target), bits(expected)), "the kept entries' bits, and +0.0 where pruned"

"""Kill and resume gives the uninterrupted run's model, bitwise, with shuffling and dropout on.

Every registered strategy is checkpointed mid-epoch (and, where it has one, mid-schedule) by a
callback, as a killed run's last checkpoint would be, and resumed by a fresh Trainer with
``ckpt_path``; weights, masks, optimizer state and the batch of every later step must equal the
uninterrupted run's. The subprocess SIGKILL through ``sparseft fit`` is in test_cli_resume.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from sparseft.datamodules.order import EpochShuffleSampler, TrainingOrder
from sparseft.strategies import SparsityStrategy
from sparseft.strategies.registry import sparseft_strategies
from sparseft.testing import SyntheticClassificationData, tiny_config
from sparseft.training.module import SparseFTModule
from tests.test_conformance import make_strategy

STEPS = 14  # 5 batches an epoch: three epochs, the checkpoint in the second
SAVE_AT = 7  # epoch 1, after its 2nd batch; after DSEE's stage boundary (step 3), mid-ramp
STRATEGIES = sorted(sparseft_strategies())  # those of other installed packages are theirs to test
# strategies whose sparsity is fixed at setup (LoRA's: 0): the checkpoint cannot be mid-schedule
NO_SCHEDULE = {"lora", "s2ft", "spdf"}


class Recorder(Callback):
    """The batch (a digest) of every optimizer step, and a checkpoint after step ``save_at``."""

    def __init__(self, save_at: int | None = None, path: Path | None = None) -> None:
        self.save_at, self.path = save_at, path
        self.batches: dict[int, str] = {}
        self.sparsity: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches[trainer.global_step + 1] = hashlib.sha256(batch["input_ids"].numpy().tobytes()).hexdigest()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.path)
            strategy = next((c for c in trainer.callbacks if isinstance(c, SparsityStrategy)), None)
            self.sparsity = strategy.applied_sparsity if strategy else None


def run(strategy: SparsityStrategy | None, root: Path, recorder: Recorder, ckpt_path: str | None = None, **kwargs):
    """A tiny BERT with its default dropout (0.1) on a shuffled synthetic task."""
    torch.manual_seed(0)
    module = SparseFTModule(config=tiny_config("bert"), num_labels=2, learning_rate=1e-3)
    callbacks = [c for c in (strategy, recorder) if c is not None] + kwargs.pop("callbacks", [])
    options = dict(max_steps=STEPS, num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False) | kwargs
    trainer = Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, callbacks=callbacks, **options,
    )
    trainer.fit(module, SyntheticClassificationData(size=40, shuffle=True), ckpt_path=ckpt_path)
    return trainer, module


def assert_same_run(a: tuple[Trainer, SparseFTModule], b: tuple[Trainer, SparseFTModule]) -> None:
    (trainer_a, module_a), (trainer_b, module_b) = a, b
    assert trainer_a.global_step == trainer_b.global_step
    state_a, state_b = module_a.state_dict(), module_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:  # weights, masks, scores, LoRA factors, sparse values: bitwise
        assert torch.equal(state_a[key], state_b[key]), key
    opt_a, opt_b = trainer_a.optimizers[0].state_dict(), trainer_b.optimizers[0].state_dict()
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][index][name])), (index, name)


def strategy_or_none(name: str | None) -> SparsityStrategy | None:
    return make_strategy(name) if name else None


@pytest.mark.parametrize("name", [*STRATEGIES, None], ids=[*STRATEGIES, "dense"])
def test_kill_mid_epoch_and_resume_is_the_uninterrupted_run(name, tmp_path):
    ckpt = tmp_path / "killed.ckpt"
    straight = Recorder(SAVE_AT, ckpt)
    expected = run(strategy_or_none(name), tmp_path / "straight", straight)
    if name and name not in NO_SCHEDULE:
        assert 0 < straight.sparsity < expected[0].callbacks[0].final_sparsity, "the checkpoint should be mid-ramp"
    resumed = Recorder()
    got = run(strategy_or_none(name), tmp_path / "resumed", resumed, ckpt_path=str(ckpt))
    assert sorted(resumed.batches) == list(range(SAVE_AT + 1, STEPS + 1)), "no batch replayed, none skipped"
    assert all(resumed.batches[step] == straight.batches[step] for step in resumed.batches)
    assert_same_run(expected, got)


@pytest.mark.parametrize("val_batches, val_check_interval, names", [
    (1, 3, ("step=3", "step=8")),  # after a validation mid-epoch (every 3rd batch of an epoch)
    (1, 1.0, ("step=5", "step=10")),  # after the validation at an epoch's end
    (0, 1.0, ("step=5", "step=10")),  # no validation: at the end of the training epoch
])
def test_resume_from_modelcheckpoint_files(val_batches, val_check_interval, names, tmp_path):
    """ModelCheckpoint's own files: mid-epoch and at epoch ends, with and without validation."""
    straight = Recorder()
    ckpts = tmp_path / "ckpts"
    options = dict(limit_val_batches=val_batches, val_check_interval=val_check_interval, num_sanity_val_steps=1,
                   enable_checkpointing=True)
    expected = run(make_strategy("magnitude"), tmp_path / "straight", straight,
                   callbacks=[ModelCheckpoint(ckpts, filename="{step}", save_top_k=-1)], **options)
    for name in names:
        step = int(name.split("=")[1])
        resumed = Recorder()
        ckpt = str(ckpts / f"{name}.ckpt")
        got = run(make_strategy("magnitude"), tmp_path / name, resumed, ckpt_path=ckpt, **options)
        assert sorted(resumed.batches) == list(range(step + 1, STEPS + 1)), name
        assert all(resumed.batches[s] == straight.batches[s] for s in resumed.batches), name
        assert_same_run(expected, got)


class Interrupt(Callback):
    """Raise mid-step (after forward and backward drew their dropout) at optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step + 1 == self.step:
            raise RuntimeError("interrupted")


def test_the_checkpoint_saved_on_an_interrupt_resumes_to_the_uninterrupted_run(tmp_path):
    expected = run(make_strategy("pst"), tmp_path / "straight", straight := Recorder())
    on_exception = ModelCheckpoint(tmp_path / "ckpts", filename="interrupted", save_on_exception=True, save_top_k=0)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(make_strategy("pst"), tmp_path / "interrupted", Recorder(), callbacks=[on_exception, Interrupt(8)],
            enable_checkpointing=True)
    resumed = Recorder()
    got = run(make_strategy("pst"), tmp_path / "resumed", resumed, ckpt_path=str(tmp_path / "ckpts/interrupted.ckpt"))
    assert sorted(resumed.batches) == list(range(8, STEPS + 1)), "the interrupted step runs again"
    assert all(resumed.batches[step] == straight.batches[step] for step in resumed.batches)
    assert_same_run(expected, got)


def test_each_epoch_has_its_own_order_from_seed_and_epoch():
    sampler = EpochShuffleSampler(10, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert EpochShuffleSampler(10, seed=3).order(1) == second  # a pure function of (seed, epoch)
    resumed = EpochShuffleSampler(10, seed=3, start=(1, 4))
    resumed.set_epoch(1)
    assert list(resumed) == second[4:]  # the resumed epoch starts at its position, once
    assert list(resumed) == second
    finished = EpochShuffleSampler(10, seed=3, start=(1, 12), epoch_of=lambda: 1)
    assert list(finished) == [] and list(finished) == second  # a finished epoch is not trained again


def test_the_position_applies_to_its_own_epoch_only():
    order = TrainingOrder(seed=0)
    order.load_state_dict({"epoch": 2, "batches": 1})
    assert list(order.sampler(10, 4, None)) == EpochShuffleSampler(10, 0).order(2)[4:]
    order.load_state_dict({"epoch": 2, "batches": 1})
    sampler = order.sampler(10, 4, None)
    sampler.set_epoch(3)
    assert list(sampler) == EpochShuffleSampler(10, 0).order(3)
    order.load_state_dict(None)  # a checkpoint written before resumable orders: from the start
    assert list(order.sampler(10, 4, None)) == EpochShuffleSampler(10, 0).order(0)

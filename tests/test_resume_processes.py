"""Exact resume with several processes and with loader workers.

Each process shuffles its own share of the epoch's order (a pure function of seed, epoch, rank and
process count), a checkpoint records the position in the epoch and every process's random
generators, and with loader workers the sampler is read at the first batch. So a ``sparseft fit``
SIGKILLed anywhere and resumed with ``--ckpt_path`` ends with the uninterrupted run's weights,
masks and optimizer state, bitwise on CPU: with 2 DDP processes (gloo) after a mid-epoch
checkpoint, and in one process with 2 loader workers after an epoch-end checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn

from sparseft.datamodules.order import EpochShuffleSampler, TrainingLoader, TrainingOrder
from sparseft.training.callbacks import RandomState
from sparseft.training.checkpoint_checks import is_checkpoint_path, load_checkpoint
from tests.test_checkpointing import fit_command
from tests.test_cli import sst2_dir  # noqa: F401  (fixture)


def fitting_trainer(replicas: int, rank: int = 0) -> SimpleNamespace:
    """What TrainingOrder and RandomState read of a Trainer that is fitting with ``replicas`` processes."""
    kwargs = {"num_replicas": replicas, "rank": rank} if replicas > 1 else None
    return SimpleNamespace(distributed_sampler_kwargs=kwargs, world_size=replicas, global_rank=rank,
                           state=SimpleNamespace(fn=TrainerFn.FITTING), ckpt_path="run.ckpt", current_epoch=0)


def test_processes_share_each_epoch_order_by_global_batch():
    """Step i's batches of 2 processes are the i-th block of 2 x batch_size examples of the order."""
    order = EpochShuffleSampler(11, seed=3).order(1)
    shards = [EpochShuffleSampler(11, seed=3, replicas=2, rank=rank).shard(1) for rank in (0, 1)]
    assert [len(shard) for shard in shards] == [6, 6]  # padded by repeating the order's start
    padded = order + order[:1]
    for step in range(3):  # batch size 2
        together = shards[0][2 * step: 2 * step + 2] + shards[1][2 * step: 2 * step + 2]
        assert sorted(together) == sorted(padded[4 * step: 4 * step + 4])
    assert EpochShuffleSampler(11, seed=3).shard(1) == order  # one process: the whole order


def test_a_resume_starts_each_process_at_its_next_batch():
    order = TrainingOrder(seed=0)
    order.load_state_dict({"epoch": 2, "batches": 1, "replicas": 2}, fitting_trainer(2, rank=1))
    sampler = order.sampler(10, 2, fitting_trainer(2, rank=1))
    sampler.epoch_of = lambda: 2
    assert list(sampler) == EpochShuffleSampler(10, 0, replicas=2, rank=1).shard(2)[2:]
    assert len(sampler) == 5 and list(sampler) == EpochShuffleSampler(10, 0, replicas=2, rank=1).shard(2)


def test_a_resume_with_another_number_of_processes_is_refused():
    with pytest.raises(ValueError, match="shared by 2 process.*this run has 1; .* resume with 2"):
        TrainingOrder(0).load_state_dict({"epoch": 0, "batches": 1, "replicas": 2}, fitting_trainer(1))
    random_state = RandomState()
    random_state.setup(fitting_trainer(1), None, "fit")
    with pytest.raises(ValueError, match="written by 2 process.*this run has 1; .* resume with 2"):
        random_state.load_state_dict({"ranks": [RandomState.capture()] * 2})
    validating = fitting_trainer(1)
    validating.state.fn = TrainerFn.VALIDATING  # validate / test / predict restore neither
    TrainingOrder(0).load_state_dict({"epoch": 0, "batches": 1, "replicas": 2}, validating)
    random_state.setup(validating, None, "validate")
    random_state.load_state_dict({"ranks": [RandomState.capture()] * 2})


def test_each_process_gets_its_own_random_generators_back():
    random_state = RandomState()
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(RandomState.capture())
    random_state.setup(fitting_trainer(2, rank=1), None, "fit")
    random_state.load_state_dict({"ranks": states})
    random_state.on_train_start(fitting_trainer(2, rank=1), None)
    torch.manual_seed(2)
    expected = torch.rand(3)
    torch.manual_seed(1)
    random_state.load_state_dict({"ranks": states})
    random_state.on_train_start(fitting_trainer(2, rank=1), None)
    assert torch.equal(torch.rand(3), expected)
    assert RandomState().state_dict()["ranks"][0]["torch"].dtype == torch.uint8  # one process: a list of one


def test_with_workers_the_sampler_is_read_at_the_first_batch_not_at_iter():
    """Lightning calls ``iter()`` before a resumed run's epoch counter is right; the order must follow
    the epoch at the first batch, as it does without workers."""
    epoch = {"now": 0}
    sampler = EpochShuffleSampler(8, seed=5, epoch_of=lambda: epoch["now"])
    loader = TrainingLoader(list(range(8)), batch_size=8, sampler=sampler, num_workers=1)
    batches = iter(loader)
    epoch["now"] = 1
    assert next(batches).tolist() == sampler.order(1)


def run_and_kill(command: list[str], marker: str, root: Path, env: dict[str, str]) -> Path:
    """Start ``command`` in its own process group; once the checkpoint ``marker`` is written whole under
    ``root`` (a file, or a sharded directory with its ``meta.pt``), SIGKILL the group (every rank and
    loader worker) and return the checkpoint."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 600
    while not any(map(is_checkpoint_path, root.rglob(marker))) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run should have been killed before it ended"
    (checkpoint,) = root.rglob(marker)
    return checkpoint


def optimizer_tensors(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the optimizer's state, by its path: a file's ``optimizer_states[0]`` (keyed by
    parameter index) or a sharded checkpoint's ``optimizer_0`` (keyed by parameter name)."""
    optimizer = checkpoint["optimizer_states"][0] if "optimizer_states" in checkpoint else checkpoint["optimizer_0"]
    state = optimizer["state"]
    return {f"{key}/{name}": torch.as_tensor(value) for key, values in state.items() for name, value in values.items()}


def assert_same_final_checkpoint(expected_root: Path, got_root: Path) -> None:
    """Weights, masks and optimizer state of the two runs' ``last.ckpt`` (files or sharded), bitwise."""
    (expected_path,), (got_path,) = expected_root.rglob("last.ckpt"), got_root.rglob("last.ckpt")
    expected, got = load_checkpoint(expected_path), load_checkpoint(got_path)
    assert expected["global_step"] == got["global_step"] == 10
    assert expected["state_dict"].keys() == got["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(value, got["state_dict"][key]), key
    optimizer, resumed = optimizer_tensors(expected), optimizer_tensors(got)
    assert optimizer.keys() == resumed.keys() and optimizer
    for key, value in optimizer.items():
        assert torch.equal(value, resumed[key]), key


def kill_and_resume(model_dir: Path, data_dir: Path, tmp_path: Path, options: list[str], kill_after: str) -> None:
    """The uninterrupted run, one SIGKILLed once ``kill_after`` is written, its resume: the same end."""
    periodic = ["--trainer.max_steps=10", "--trainer.callbacks=lightning.pytorch.callbacks.ModelCheckpoint",
                "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_top_k=-1",
                "--trainer.callbacks.filename={step}", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(fit_command(model_dir, data_dir, straight, *periodic), env=env, check=True,
                   capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    slow = ["--trainer.callbacks+=sparseft.testing.StepDelay", "--trainer.callbacks.seconds=0.5"]
    checkpoint = run_and_kill(fit_command(model_dir, data_dir, killed, *periodic, *slow), kill_after, killed, env)
    resumed = tmp_path / "resumed"
    result = subprocess.run(fit_command(model_dir, data_dir, resumed, *periodic, f"--ckpt_path={checkpoint}"),
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_final_checkpoint(straight, resumed)


@pytest.mark.slow
def test_two_ddp_processes_killed_mid_epoch_resume_to_the_uninterrupted_run(tiny_bert_dir, sst2_dir, tmp_path):  # noqa: F811
    """48 examples, 8 a batch, 2 processes: 3 batches an epoch; killed after step 4 (epoch 1, batch 1), 10 steps."""
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2"]
    kill_and_resume(tiny_bert_dir, sst2_dir, tmp_path, ddp, "step=4.ckpt")


@pytest.mark.slow
def test_two_fsdp2_processes_killed_mid_epoch_resume_to_the_uninterrupted_run(tiny_bert_dir, sst2_dir, tmp_path):  # noqa: F811
    """The DDP case under FSDP2: sharded checkpoint directories, each rank restoring its shards."""
    fsdp2 = ["--trainer.strategy=fsdp2", "--trainer.devices=2"]
    kill_and_resume(tiny_bert_dir, sst2_dir, tmp_path, fsdp2, "step=4.ckpt")


@pytest.mark.slow
def test_loader_workers_killed_at_an_epoch_end_resume_to_the_uninterrupted_run(tiny_bert_dir, sst2_dir, tmp_path):  # noqa: F811
    """6 batches an epoch, 2 loader workers; killed after step 6 (epoch 0's last batch), 10 steps."""
    kill_and_resume(tiny_bert_dir, sst2_dir, tmp_path, ["--data.num_workers=2"], "step=6.ckpt")

"""A fit always leaves a checkpoint of its last state (also on an interrupt), checkpoints are whole or
absent and never staged in the system temporary directory, and a SIGKILLed ``sparseft fit``
resumed with ``--ckpt_path`` ends exactly where the uninterrupted run does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sparseft.cli.command import main
from sparseft.strategies import Magnitude
from sparseft.testing.conformance import SaveAt, fit
from sparseft.training.checkpointing import (
    LastIsNewest,
    SideBySideCheckpointIO,
    fit_checkpoint_callbacks,
    with_checkpoint_io,
)
from tests.test_cli import fit_args, sst2_dir  # noqa: F401  (fixture)


def test_fit_adds_last_and_on_exception_checkpoints_unless_configured():
    added, final = fit_checkpoint_callbacks([])
    assert added.save_last and added.save_on_exception and isinstance(final, LastIsNewest)
    configured = ModelCheckpoint(save_last=False)
    (final,) = fit_checkpoint_callbacks([configured])
    assert isinstance(final, LastIsNewest) and configured.save_last and configured.save_on_exception
    assert fit_checkpoint_callbacks([], enabled=False) == []
    io = SideBySideCheckpointIO()
    assert with_checkpoint_io(None)[0].__class__ is SideBySideCheckpointIO and with_checkpoint_io([io]) == [io]


def test_a_fit_that_ends_before_any_validation_leaves_last_ckpt(tiny_bert_dir, sst2_dir, tmp_path):  # noqa: F811
    root = tmp_path / "run"
    main(fit_args(tiny_bert_dir, sst2_dir, root, "--trainer.max_steps=3", "--trainer.val_check_interval=5"))
    assert [path.name for path in root.rglob("*.ckpt")] == ["last.ckpt"]


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


EVERY_4_STEPS = ("--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.every_n_train_steps=4", "--trainer.callbacks.save_top_k=-1")


def test_a_finished_fit_checkpoints_its_final_state_with_a_user_every_n_steps_checkpoint(
        tiny_bert_dir, sst2_dir, tmp_path):  # noqa: F811
    """Lightning saves "last" only when another save triggers: every 4 steps of a 10-step fit left
    ``last.ckpt`` at step 8 (steps 9-10 in no file)."""
    root = tmp_path / "run"
    main(fit_args(tiny_bert_dir, sst2_dir, root, "--trainer.max_steps=10", *EVERY_4_STEPS))
    (last,) = root.rglob("last.ckpt")
    assert ckpt_step(last) == 10


def test_after_a_resume_last_ckpt_is_overwritten_with_the_newest_state(tiny_bert_dir, sst2_dir, tmp_path):  # noqa: F811
    """Resumed from a step checkpoint that did not record ``last.ckpt`` as its own, Lightning wrote
    ``last-v1.ckpt`` beside the older ``last.ckpt``; now ``last.ckpt`` is replaced and is the newest."""
    root, logger = tmp_path / "run", "--trainer.logger=false"  # one checkpoint folder for both runs
    main(fit_args(tiny_bert_dir, sst2_dir, root, "--trainer.max_steps=6", logger, *EVERY_4_STEPS))
    (step_4,) = root.rglob("*step=4.ckpt")
    main(fit_args(tiny_bert_dir, sst2_dir, root, "--trainer.max_steps=10", logger, *EVERY_4_STEPS,
                  f"--ckpt_path={step_4}"))
    assert sorted(path.name for path in root.rglob("last*.ckpt")) == ["last.ckpt"]
    assert ckpt_step(next(root.rglob("last.ckpt"))) == 10


def test_a_resume_from_a_checkpoint_written_before_a_validation_runs_it(tmp_path):
    """Validation every 3 steps; the checkpoint is written after step 6, before its validation. Lightning
    skipped that validation on resume, leaving the dev metric of step 3 in every later checkpoint."""
    validate_every_3 = dict(limit_val_batches=1, val_check_interval=3, check_val_every_n_epoch=None)
    _, straight = fit(Magnitude(sparsity=0.5), tmp_path / "a", 8, callbacks=[SaveAt(6, tmp_path / "mid.ckpt")],
                      **validate_every_3)
    _, resumed = fit(Magnitude(sparsity=0.5), tmp_path / "b", 8, ckpt_path=str(tmp_path / "mid.ckpt"),
                     **validate_every_3)
    assert straight.dev_metric["step"] == 6 and resumed.dev_metric == straight.dev_metric


def test_checkpoints_are_staged_next_to_the_target_not_in_the_temp_dir(tmp_path, monkeypatch):
    temp = tmp_path / "system-temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    target = tmp_path / "ckpts" / "last.ckpt"
    SideBySideCheckpointIO().save_checkpoint({"weights": torch.ones(3)}, target)
    assert torch.equal(torch.load(target)["weights"], torch.ones(3))
    assert list(temp.iterdir()) == [] and sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):  # a failed save keeps the previous checkpoint whole
        SideBySideCheckpointIO().save_checkpoint({"weights": torch.zeros(3), "x": Unpicklable()}, target)
    assert torch.equal(torch.load(target)["weights"], torch.ones(3))
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def fit_command(model_dir: Path, data_dir: Path, root: Path, *extra: str) -> list[str]:
    args = [a for a in fit_args(model_dir, data_dir, root) if "max_steps" not in a]
    return [sys.executable, "-m", "sparseft", *args, "--trainer.max_steps=16", *extra]


def final_state(root: Path) -> dict[str, torch.Tensor]:
    (last,) = root.rglob("last.ckpt")
    return torch.load(last, weights_only=False)["state_dict"]


@pytest.mark.slow
def test_sigkill_mid_epoch_and_resume_through_the_cli_is_the_uninterrupted_run(tiny_bert_dir, sst2_dir, tmp_path):  # noqa: F811
    """6 batches an epoch; a checkpoint every 4 steps; killed once step 8's is written (epoch 1)."""
    periodic = ["--trainer.callbacks=lightning.pytorch.callbacks.ModelCheckpoint",
                "--trainer.callbacks.every_n_train_steps=4", "--trainer.callbacks.save_top_k=-1",
                "--trainer.callbacks.filename={step}"]
    temp = tmp_path / "system-temp"  # the runs' temporary directory: nothing may be left in it
    temp.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(temp)}
    straight = tmp_path / "straight"
    subprocess.run(fit_command(tiny_bert_dir, sst2_dir, straight, *periodic), env=env, check=True,
                   capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    slow = ["--trainer.callbacks+=sparseft.testing.StepDelay", "--trainer.callbacks.seconds=0.5"]
    process = subprocess.Popen(fit_command(tiny_bert_dir, sst2_dir, killed, *periodic, *slow), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not list(killed.rglob("step=8.ckpt")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run should have been killed before it ended"
    (checkpoint,) = killed.rglob("step=8.ckpt")
    assert list(temp.iterdir()) == []

    resumed = tmp_path / "resumed"
    subprocess.run(fit_command(tiny_bert_dir, sst2_dir, resumed, *periodic, f"--ckpt_path={checkpoint}"),
                   env=env, check=True, capture_output=True, timeout=600)
    expected, got = final_state(straight), final_state(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key

"""The command's own surface: top-level help and version, ``python -m sparseft``, and a quiet
console (no Lightning tips, no noise warnings, a step progress bar for max_steps runs)."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from sparseft import __version__
from sparseft.cli.command import main
from sparseft.cli.console import StepProgressBar, quiet_console
from sparseft.cli.help import COMMANDS

EVERY_COMMAND = ("fit", "validate", "test", "predict", "export", "strategies", "targets", "report")


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]], ids=["bare", "--help", "-h"])
def test_help_lists_every_command_on_one_line(argv, capsys):
    main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert set(EVERY_COMMAND) <= set(COMMANDS)
    for command in EVERY_COMMAND:
        (line,) = [line for line in lines if line.split()[:1] == [command]]
        assert len(line.split()) > 2, f"{command} has a one-line description"


def test_version(capsys):
    main(["--version"])
    assert capsys.readouterr().out.strip() == f"sparseft {__version__}"


@pytest.mark.slow  # a fresh interpreter imports torch, transformers and Lightning: 10-20 s here
def test_python_dash_m_is_the_command():
    result = subprocess.run([sys.executable, "-m", "sparseft", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"sparseft {__version__}"


def test_tips_and_noise_warnings_are_dropped_real_warnings_kept():
    quiet_console("predict")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    parent = logging.getLogger("lightning.pytorch")
    parent.addHandler(handler)
    try:
        rank_zero_info("💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]")
        rank_zero_info("GPU available: False, used: False")
    finally:
        parent.removeHandler(handler)
    assert [record.getMessage() for record in records] == ["GPU available: False, used: False"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", DeprecationWarning, stacklevel=1)
        warnings.warn("The dirpath has changed from 'a' to 'b'", UserWarning, stacklevel=1)
        warnings.warn("The number of training batches (4) is smaller than the logging interval", UserWarning,
                      stacklevel=1)
    assert [str(w.message)[:14] for w in caught] == ["The number of "]


@pytest.mark.skipif(StepProgressBar is None, reason="rich is not installed: Lightning's TQDM bar is used")
def test_a_max_steps_run_shows_steps_out_of_max_steps(tiny_bert_dir, tmp_path):
    from sparseft.cli.command import SparseFTCLI

    folder = tmp_path / "sst2"
    folder.mkdir()
    body = "".join(f"{text}\t{label}\n" for text, label in [("good", 1), ("bad", 0)] * 6)
    for split in ("train", "dev"):
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + body)
    args = ["fit", f"--model.backbone={tiny_bert_dir}", "--data=GLUEDataModule", f"--data.data_dir={folder}",
            "--data.batch_size=4", "--trainer.max_steps=5", "--trainer.accelerator=cpu", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={tmp_path}"]
    cli = SparseFTCLI(args=args)  # 3 batches an epoch: the 5 steps span two epochs
    (bar,) = [c for c in cli.trainer.callbacks if isinstance(c, StepProgressBar)]
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.completed, task.total) == (5, 5)
    assert task.description.strip() == "Training"

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


def sst2_folder(tmp_path):
    folder = tmp_path / "sst2"
    folder.mkdir(parents=True, exist_ok=True)
    body = "".join(f"{text}\t{label}\n" for text, label in [("good", 1), ("bad", 0)] * 6)
    for split in ("train", "dev"):
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + body)
    (folder / "test.tsv").write_text("index\tsentence\n" + "".join(f"{i}\tgood\n" for i in range(4)))
    return folder


def fit_args(backbone, tmp_path, steps=4):
    """A tiny fit whose last step validates, with the checkpoint callback the shipped configs have."""
    return ["fit", f"--model.backbone={backbone}", "--data=GLUEDataModule", f"--data.data_dir={sst2_folder(tmp_path)}",
            "--data.batch_size=4", f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}",
            "--trainer.check_val_every_n_epoch=null",
            "--trainer.accelerator=cpu", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks=ModelCheckpoint", "--trainer.callbacks.monitor=val/accuracy",
            "--trainer.callbacks.mode=max", f"--trainer.callbacks.dirpath={tmp_path / 'checkpoints'}"]


def test_a_fit_ends_with_what_it_made_and_keeps_one_copy_of_a_checkpoint(tiny_bert_dir, tmp_path, capfd, caplog):
    main(fit_args(tiny_bert_dir, tmp_path))
    out, err = capfd.readouterr()
    folder = tmp_path / "checkpoints"
    best, last = folder / "epoch=1-step=4.ckpt", folder / "last.ckpt"
    assert f"best checkpoint  {best}  (val/accuracy " in out and f"last checkpoint  {last}" in out
    assert f"next: sparseft export --ckpt_path {best} --output_dir {tmp_path / 'export'}" in out
    for noise in ("v_num", "Total FLOPs", "tokenizing", "Map:", "LOAD REPORT"):
        assert noise not in out + err + caplog.text, noise
    # the best checkpoint is of the last step: last.ckpt links to it rather than copying it
    assert last.is_symlink() and last.resolve() == best.resolve() and not best.is_symlink()
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=1-step=4.ckpt", "last.ckpt"]
    # resuming from the link continues the run (and writes last.ckpt as a file again); export reads it
    main([*fit_args(tiny_bert_dir, tmp_path, steps=6), f"--ckpt_path={last}", "--trainer.val_check_interval=3"])
    assert not last.is_symlink() and best.is_file()
    main(["export", f"--ckpt_path={best}", f"--output_dir={tmp_path / 'export'}"])
    assert (tmp_path / "export" / "config.json").is_file()


def test_evaluation_with_a_checkpoint_hides_the_report_of_the_head_the_backbone_lacks(tmp_path, capfd, caplog):
    from transformers import BertModel

    from sparseft.testing import make_tiny_model_dir

    base = make_tiny_model_dir(tmp_path / "bert", "bert")
    BertModel.from_pretrained(base).save_pretrained(base)  # no classifier: loading one reports it MISSING
    main(fit_args(base, tmp_path, steps=2))
    assert "MISSING" in "".join(capfd.readouterr()) + caplog.text  # a fit's head is new: the report is worth reading
    caplog.clear()
    data = sst2_folder(tmp_path / "p")
    main(["predict", f"--model.backbone={base}", "--data=GLUEDataModule", f"--data.data_dir={data}",
          "--trainer.accelerator=cpu", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path / 'p'}",
          f"--ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"])
    out, err = capfd.readouterr()
    assert "predictions written to" in out and "MISSING" not in out + err + caplog.text


def test_the_progress_bar_shows_short_names_and_no_logger_version():
    from sparseft.cli.console import bar_metrics

    shown = bar_metrics({"v_num": 0, "train/loss": 0.7, "sparsity/actual": 0.5,
                         "val/validation_matched/accuracy": 0.8, "val/accuracy": 0.9})
    assert shown == {"loss": 0.7, "sparsity": 0.5, "val/matched/accuracy": 0.8, "val/accuracy": 0.9}

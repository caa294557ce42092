"""Command-line choices that used to be accepted and then silently not used (issue 15): the
optimizer and LR schedule, what an export reports as trained, and a strategy switched on the
command line."""

from __future__ import annotations

import functools
import json
import re
from argparse import ArgumentError
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from sparseft.cli.command import SparseFTCLI, expand_strategy_names, main
from sparseft.strategies import DSEE
from sparseft.testing import SyntheticClassificationData, tiny_config
from sparseft.training.module import SparseFTModule
from sparseft.training.optim import lr_factor
from tests import test_cli
from tests.test_cli import fit_args, last_checkpoint
from tests.test_dsee import OptimizerTrace

sst2_dir = test_cli.sst2_dir  # the fixture: a small SST-2 folder


def cli_args(model_dir: Path, data_dir: Path, root: Path, *extra: str) -> list[str]:
    """``fit_args`` without its Magnitude strategy and the subcommand, 4 steps."""
    args = [a for a in fit_args(model_dir, data_dir, root)[1:] if not a.startswith(("--sparsity", "--trainer.max"))]
    return [*args, "--trainer.max_steps=4", *extra]


def fit_cli(*args: str) -> SparseFTCLI:
    cli = SparseFTCLI(args=expand_strategy_names(list(args)), run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def held(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_optimizer_option_trains_the_strategy_tensors(tiny_bert_dir, sst2_dir, tmp_path):
    cli = fit_cli(*cli_args(tiny_bert_dir, sst2_dir, tmp_path, "--sparsity=pst",
                            "--optimizer=torch.optim.SGD", "--optimizer.momentum=0.9"))
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    trainable = {name: p for name, p in cli.model.named_parameters() if p.requires_grad}
    factors = [name for name in trainable if ".parametrizations." in name]
    assert len(factors) > 4 and held(optimizer) == {id(p) for p in trainable.values()}  # PST factors + head
    assert {group["momentum"] for group in optimizer.param_groups} == {0.9}
    assert {group["initial_lr"] for group in optimizer.param_groups} == {1e-3}  # --model.learning_rate
    # the built-in schedule, stepped every optimizer step: linear decay to 0 over 4 steps
    assert cli.trainer.lr_scheduler_configs[0].interval == "step"
    assert max(group["lr"] for group in optimizer.param_groups) == pytest.approx(0.0)


def test_lr_scheduler_option_is_stepped_every_optimizer_step(tiny_bert_dir, sst2_dir, tmp_path):
    cli = fit_cli(*cli_args(tiny_bert_dir, sst2_dir, tmp_path, "--sparsity=pst", "--optimizer=torch.optim.SGD",
                            "--lr_scheduler=torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size=1",
                            "--lr_scheduler.gamma=0.5"))
    optimizer = cli.trainer.optimizers[0]
    assert type(cli.trainer.lr_scheduler_configs[0].scheduler).__name__ == "StepLR"
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1e-3 * 0.5**4] * 3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--optimizer=torch.optim.SGD", "--model.adam_betas=[0.9, 0.95]"], "model.adam_betas configure the default"),
        (["--lr_scheduler=torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size=1",
          "--model.warmup_ratio=0.1"], "model.warmup_ratio shape the built-in learning-rate schedule"),
        (["--model.lr_schedule=constant", "--model.min_lr_ratio=0.1"], "'constant' does not decay"),
        (["--optimizer=torch.optim.SGD", "--optimizer.lr=0.1"], "Option 'lr' is not accepted"),
        (["--optimizer=torch.optim.SGD", "--optimizer.weight_decay=0.1"], "Option 'weight_decay' is not accepted"),
        (["--optimizer=torch.optim.Rprop", "--model.weight_decay=0.01"], "Rprop has no weight decay"),
        (["--lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau"], "ReduceLROnPlateau needs a monitored"),
    ],
)
def test_optimizer_options_that_would_be_ignored_are_refused(tiny_bert_dir, sst2_dir, tmp_path, extra, message,
                                                             capsys):
    with pytest.raises((ValueError, SystemExit, ArgumentError)) as error:  # SparseFTCLI raises its parse errors
        fit_cli(*cli_args(tiny_bert_dir, sst2_dir, tmp_path, *extra))
    text = capsys.readouterr().err if isinstance(error.value, SystemExit) else str(error.value)
    assert re.search(re.escape(message), text), text


def test_builtin_schedules_with_warmup():
    factors = {kind: [lr_factor(step, 2, 6, kind) for step in range(6)] for kind in ("linear", "cosine", "constant")}
    assert factors["linear"] == pytest.approx([0, 0.5, 1, 0.75, 0.5, 0.25])
    assert factors["cosine"] == pytest.approx([0, 0.5, 1, 0.5 * (1 - 2**-0.5) + 2**-0.5, 0.5, 0.5 * (1 - 2**-0.5)])
    assert factors["constant"] == pytest.approx([0, 0.5, 1, 1, 1, 1])
    assert lr_factor(6, 2, 6, "linear", floor=0.1) == pytest.approx(0.1)


def test_dsee_restarts_a_user_chosen_optimizer_at_its_boundary(tmp_path):
    torch.manual_seed(0)
    config = tiny_config("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    module = SparseFTModule(config=config, num_labels=2, learning_rate=1e-2,
                            optimizer=functools.partial(torch.optim.SGD, momentum=0.9))
    strategy, trace = DSEE(sparsity=0.5, rank=2, num_sparse=4), OptimizerTrace()
    trainer = Trainer(max_steps=8, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path,
                      callbacks=[strategy, trace])
    trainer.fit(module, SyntheticClassificationData(size=32))
    assert strategy.stage == "retune" and strategy.boundary_step == 4
    assert len({row[1] for row in trace.rows[:4]}) == 1 and trace.rows[4][1] != trace.rows[3][1]  # a new optimizer
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD) and {g["momentum"] for g in optimizer.param_groups} == {0.9}
    assert {id(p) for p in strategy.update_parameters()} <= held(optimizer)
    # linear decay over 8 steps, restarted and stretched over the 4 left: factor 2, so s -> f(2s)
    assert [row[2][-1] for row in trace.rows[4:]] == pytest.approx([1e-2 * f for f in (1, .75, .5, .25)])


def test_export_reports_what_a_frozen_base_strategy_trained(tiny_bert_dir, sst2_dir, tmp_path):
    root = tmp_path / "run"
    main(["fit", *cli_args(tiny_bert_dir, sst2_dir, root, "--sparsity=pst", "--trainer.max_steps=2")])
    ckpt = last_checkpoint(root)
    module, _ = SparseFTModule.from_sparseft_checkpoint(ckpt)
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)  # PST factors and the head
    head = sum(p.numel() for name, p in module.named_parameters() if "classifier" in name)
    assert trained > 10 * head
    main(["export", f"--ckpt_path={ckpt}", f"--output_dir={tmp_path / 'exported'}"])
    report = json.loads((tmp_path / "exported" / "report.json").read_text())
    assert report["trainable_parameters"] == trained


def test_strategy_switched_on_the_command_line_starts_from_its_own_defaults(tiny_bert_dir, sst2_dir, tmp_path):
    config = tmp_path / "magnitude.yaml"
    config.write_text(
        "sparsity:\n  class_path: Magnitude\n  init_args:\n    sparsity: 0.7\n"
        "    schedule: {kind: cubic, initial_warmup: 0.1, final_warmup: 0.3}\n"
    )
    args = cli_args(tiny_bert_dir, sst2_dir, tmp_path)
    kept = SparseFTCLI(args=expand_strategy_names([*args, f"--config={config}", "--sparsity=magnitude"]), run=False)
    assert kept.config_init.sparsity.schedule.kind == "cubic"  # the same strategy keeps its settings
    with pytest.warns(UserWarning, match="--sparsity DSEE replaces Magnitude: it starts from its own defaults"):
        argv = expand_strategy_names([*args, f"--config={config}", "--sparsity", "dsee", "--sparsity.rank=4"])
    switched = SparseFTCLI(args=argv, run=False).config_init.sparsity
    defaults = DSEE()
    assert type(switched) is DSEE and switched.rank == 4
    assert switched.schedule == defaults.schedule and switched.schedule.kind == "one_shot"  # not the cubic one
    assert switched.final_sparsity == defaults.final_sparsity != 0.7


@pytest.mark.parametrize(("precision", "clip", "fused"), [("32-true", 1.0, True), ("bf16-mixed", None, True),
                                                          ("bf16-mixed", 1.0, False)])
def test_the_default_adamw_is_fused_unless_clipping_under_autocast(tmp_path, precision, clip, fused):
    """Lightning's mixed-precision plugin refuses to clip gradients for an optimizer that unscales them
    itself (the fused AdamW): such a run trains with the foreach AdamW instead of dying at its first step."""
    torch.manual_seed(0)
    module = SparseFTModule(config=tiny_config("bert"), num_labels=2)
    trainer = Trainer(max_steps=2, accelerator="cpu", precision=precision, gradient_clip_val=clip, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, SyntheticClassificationData(size=16))
    assert trainer.global_step == 2
    assert trainer.optimizers[0].defaults["fused"] is fused

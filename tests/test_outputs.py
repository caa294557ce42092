"""What a user looks at after one run: TensorBoard (hparams with the dev metric, learning rates,
sparsity pictures), the export (labels, model card, report.json with dev metric and units, file
permissions) and ``sparseft report`` on the checkpoint and on the export."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from transformers import pipeline

from sparseft.backbones.loading import load_backbone
from sparseft.cli.command import run_command
from sparseft.cli.report import measured_pattern
from sparseft.export.pretrained import export_pretrained
from sparseft.strategies import get_strategy
from sparseft.testing import SyntheticClassificationData, tiny_config
from sparseft.training.module import SparseFTModule
from tests.test_cli import fit_args, last_checkpoint, sst2_dir  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def fitted(tiny_bert_dir, sst2_dir, tmp_path_factory):  # noqa: F811
    """A 2:4 magnitude run on SST-2 rows, validated at steps 6 and 12, and its export."""
    root = tmp_path_factory.mktemp("report")
    extra = ("--trainer.val_check_interval=6", "--trainer.log_every_n_steps=1", "--sparsity.pattern=2:4",
             "--sparsity.schedule.kind=one_shot")
    run_command(fit_args(tiny_bert_dir, sst2_dir, root / "run", *extra))
    checkpoint = last_checkpoint(root / "run")
    umask = os.umask(0o022)
    try:
        run_command(["export", f"--ckpt_path={checkpoint}", f"--output_dir={root / 'exported'}"])
    finally:
        os.umask(umask)
    return root, checkpoint, root / "exported"


def read_events(root: Path) -> EventAccumulator:
    (events,) = root.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    return accumulator.Reload()


def logged_hparams(events: EventAccumulator) -> dict[str, object]:
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind")) for key, value in
            info.hparams.items()}


def test_tensorboard_has_hparams_with_the_dev_metric_learning_rates_and_pictures(fitted, tiny_bert_dir):
    root, _, _ = fitted
    events = read_events(root / "run")

    accuracy = {event.step: event.value for event in events.Scalars("val/accuracy")}
    hp_metric = {event.step: event.value for event in events.Scalars("hp_metric")}
    assert len(accuracy) == 2  # validations after steps 6 and 12
    assert hp_metric == pytest.approx(accuracy)  # the dev metric at the same steps, never Lightning's -1

    hparams = logged_hparams(events)
    assert hparams["sparsity/strategy"] == "magnitude" and hparams["sparsity/sparsity"] == 0.5
    assert hparams["sparsity/pattern"] == "2:4" and hparams["sparsity/schedule/kind"] == "one_shot"
    assert hparams["data/task"] == "sst2" and hparams["backbone"] == str(tiny_bert_dir)
    assert hparams["dev_metric"] == "val/accuracy"

    scalar_tags = events.Tags()["scalars"]
    assert {"lr/decay", "lr/no_decay"} <= set(scalar_tags)
    assert events.Scalars("lr/decay")[0].value == pytest.approx(1e-3)  # --model.learning_rate, step 0

    images = events.Tags()["images"]
    masks = [tag for tag in images if tag.startswith("masks/")]
    assert "sparsity/layers" in images and len(masks) == 3  # first, middle and last of 12 targets
    assert [image.step for image in events.Images("sparsity/layers")] == sorted(accuracy)


def evaluate(command: str, checkpoint: Path, sst2: Path, *extra: str) -> list[str]:
    """``sparseft <command>`` of ``checkpoint`` with the data options only; the lines it printed."""
    return [command, "--data=sparseft.datamodules.GLUEDataModule", "--data.task=sst2", f"--data.data_dir={sst2}",
            "--data.max_length=32", "--trainer.enable_progress_bar=false", f"--ckpt_path={checkpoint}", *extra]


def test_evaluations_take_the_strategy_from_the_checkpoint_and_write_beside_it(fitted, sst2_dir, capsys):  # noqa: F811
    root, checkpoint, _ = fitted
    run = checkpoint.parents[1]  # lightning_logs/version_0
    events = sorted(root.rglob("events.out.tfevents.*"))
    capsys.readouterr()
    # no --sparsity: the checkpoint's strategy and settings (2:4, one shot) are used, as its model options are
    run_command(evaluate("validate", checkpoint, sst2_dir))
    assert f"metrics written to {run / 'validate' / 'metrics.json'}" in capsys.readouterr().out
    assert set(json.loads((run / "validate" / "metrics.json").read_text())) == {"val/accuracy", "val/loss"}
    ran = yaml.safe_load((run / "validate" / "config.yaml").read_text())["sparsity"]["init_args"]
    assert ran["pattern"] == "2:4" and ran["schedule"]["kind"] == "one_shot"
    # the same strategy named, its settings left out: the checkpoint's too; a second evaluation gets its own folder
    run_command(evaluate("predict", checkpoint, sst2_dir, "--sparsity=magnitude"))
    run_command(evaluate("predict", checkpoint, sst2_dir))
    out = capsys.readouterr().out
    assert all(f"predictions written to {run / name / 'SST-2.tsv'}" in out for name in ("predict", "predict-2"))
    # no version_N beside the training run, no TensorBoard run (hp_metric -1) from an evaluation
    assert [path.name for path in run.parent.iterdir()] == ["version_0"]
    assert sorted(root.rglob("events.out.tfevents.*")) == events
    # settings given that differ are refused, saying what to drop, before anything is written
    refused = {"--sparsity.sparsity=0.3": r"settings differ from the checkpoint's: --sparsity.sparsity=0.3 "
                                          r"\(checkpoint: 0.5\).*drop --sparsity.sparsity$",
               "--sparsity=pst": "has sparsity strategy 'magnitude', but this run sets --sparsity pst: drop --sparsity"}
    for option, message in refused.items():
        with pytest.raises(ValueError, match=message):
            run_command(evaluate("test", checkpoint, sst2_dir, "--sparsity=magnitude", option))
    assert not (run / "test").exists()


def test_export_names_labels_and_reports_the_dev_metric_with_units(fitted):
    root, _, exported = fitted
    config = json.loads((exported / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    classify = pipeline("text-classification", model=str(exported))
    assert classify("a wonderful film")[0]["label"] in ("negative", "positive")  # not LABEL_1

    report = json.loads((exported / "report.json").read_text())
    last_validation = read_events(root / "run").Scalars("val/accuracy")[-1].value
    assert report["dev_metric"]["name"] == "val/accuracy" and report["dev_metric"]["step"] == 12
    assert report["dev_metric"]["value"] == pytest.approx(last_validation)
    assert report["training_steps"] == 12 and report["data"]["task"] == "sst2"
    numbers = {"target_sparsity", "target_weights", "trainable_parameters", "total_parameters",
               "linear_flops_per_token", "remaining_weights", "layers"}
    assert numbers <= set(report["units"])
    assert "FLOPs per token" in report["units"]["linear_flops_per_token"]


def test_export_writes_a_model_card(fitted):
    _, _, exported = fitted
    card = (exported / "README.md").read_text()
    report = json.loads((exported / "report.json").read_text())
    assert "magnitude (`sparseft.strategies.magnitude.Magnitude`)" in card and 'pattern="2:4"' in card
    assert "50.00% of 16,384 weights are zero" in card
    assert "task `sst2`" in card and "12 optimizer steps" in card
    assert f"val/accuracy = {report['dev_metric']['value']:.4f} (measured after step 12)" in card
    assert "0 `negative`, 1 `positive`" in card
    assert f'AutoModelForSequenceClassification.from_pretrained("{exported}")' in card


def test_exported_files_are_readable_by_others(fitted):
    _, _, exported = fitted
    modes = {path.name: path.stat().st_mode & 0o777 for path in exported.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "report.json"} <= set(modes)
    assert all(mode == 0o644 for mode in modes.values()), modes  # umask 022; transformers stages weights at 0600


def test_export_from_python_without_a_run_has_a_card_without_run_facts(tmp_path):
    model = load_backbone("sequence-classification", config=tiny_config("bert"), num_labels=2)
    report = export_pretrained(model, tmp_path / "plain")
    card = (tmp_path / "plain" / "README.md").read_text()
    assert "none (dense fine-tuning)" in card and "dev metric" not in card and "labels" not in card
    assert report["units"]["target_sparsity"].startswith("fraction")


def table_rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("bert.", "total"))}


def test_report_prints_the_table_and_writes_the_figures(fitted, capsys):
    _, checkpoint, exported = fitted
    capsys.readouterr()
    run_command(["report", str(checkpoint)])
    from_checkpoint = capsys.readouterr().out
    rows = table_rows(from_checkpoint)
    assert len(rows) == 13  # 12 targets and the total
    assert rows["bert.encoder.layer.0.intermediate.dense"] == ["[64,", "32]", "1,024", "50.00%", "2:4"]
    assert rows["total"][:3] == ["16,384", "8,192", "50.00%"]
    assert "val/accuracy" in from_checkpoint.splitlines()[0]

    figures = checkpoint.with_name(f"{checkpoint.stem}-report")
    names = sorted(path.name for path in figures.iterdir())
    assert names == ["mask-0.attention.self.query.png", "mask-1.attention.self.query.png",
                     "mask-1.output.dense.png", "sparsity.png"]
    with Image.open(figures / "sparsity.png") as image:
        assert image.format == "PNG" and image.height > 12 * 16  # a row per layer
    with Image.open(figures / "mask-0.attention.self.query.png") as image:
        assert min(image.size) > 512  # a [32, 32] mask, 16 px a weight, with its labels and colour bar

    run_command(["report", str(exported), f"--output_dir={exported.parent / 'figures'}"])
    assert table_rows(capsys.readouterr().out) == rows  # the export measures what the checkpoint held
    assert len(list((exported.parent / "figures").glob("*.png"))) == 4

    compressed = exported.parent / "compressed"
    run_command(["export", f"--ckpt_path={checkpoint}", f"--output_dir={compressed}", "--format=compressed"])
    capsys.readouterr()
    run_command(["report", str(compressed), f"--output_dir={exported.parent / 'figures-compressed'}"])
    assert table_rows(capsys.readouterr().out) == rows  # bitmask + values decode to the same weights


def test_report_never_overwrites_silently(fitted, tmp_path):
    _, checkpoint, _ = fitted
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path} exists and is not empty")):
        run_command(["report", str(checkpoint), f"--output_dir={tmp_path}"])
    run_command(["report", str(checkpoint), f"--output_dir={tmp_path}", "--overwrite=true"])
    assert (tmp_path / "sparsity.png").is_file() and (tmp_path / "notes.txt").read_text() == "mine"


def test_report_refuses_a_directory_that_is_not_an_export(tmp_path):
    with pytest.raises(ValueError, match="has no report.json"):
        run_command(["report", str(tmp_path), f"--output_dir={tmp_path / 'out'}"])


def test_measured_pattern_names_n_m_and_zero_rows_and_columns():
    two_four = torch.tensor([[1.0, 0, 2, 0, 0, 3, 0, 4], [0, 1, 0, 2, 3, 0, 4, 0]])
    assert measured_pattern(two_four) == "2:4"
    rows = torch.randn(8, 6) + 10
    rows[[1, 5]] = 0
    rows[:, 0] = 0
    assert measured_pattern(rows) == "2/8 rows zero, 1/6 columns zero"
    assert measured_pattern(torch.randn(4, 8) + 10) == "-"


def test_report_of_an_s2ft_checkpoint_lists_its_slice_layers(tmp_path, capsys):
    module = SparseFTModule(config=tiny_config("bert"), num_labels=2)
    trainer = Trainer(max_steps=2, limit_val_batches=0, accelerator="cpu", logger=False,
                      callbacks=[get_strategy("s2ft")()], enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, SyntheticClassificationData(size=16))
    trainer.save_checkpoint(tmp_path / "s2ft.ckpt")
    capsys.readouterr()
    run_command(["report", str(tmp_path / "s2ft.ckpt")])
    rows = table_rows(capsys.readouterr().out)
    assert sorted(rows) == ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense",
                            "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.output.dense", "total"]

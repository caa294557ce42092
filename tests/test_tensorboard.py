"""TensorBoard contents of a run (hparams with the dev metric, learning rates, sparsity pictures) and
the figures of :mod:`sparseft.plots` they are drawn with."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from sparseft.cli import main
from sparseft.module import SparseFTModule
from sparseft.plots import BAR, KEPT_COLOUR, PRUNED_COLOUR, heatmap_layers, mask_heatmap, sparsity_bar_chart
from sparseft.strategies import get_strategy
from sparseft.testing import SyntheticClassificationData, tiny_config
from tests.test_cli import fit_args, sst2_dir  # noqa: F401  (fixture)


def read_events(root: Path) -> EventAccumulator:
    (events,) = root.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    return accumulator.Reload()


def logged_hparams(events: EventAccumulator) -> dict[str, object]:
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind")) for key, value in
            info.hparams.items()}


def test_tensorboard_has_hparams_with_the_dev_metric_learning_rates_and_pictures(
    tiny_bert_dir, sst2_dir, tmp_path  # noqa: F811
):
    root = tmp_path / "run"
    main(fit_args(tiny_bert_dir, sst2_dir, root, "--trainer.val_check_interval=6", "--trainer.log_every_n_steps=1"))
    events = read_events(root)

    accuracy = {event.step: event.value for event in events.Scalars("val/accuracy")}
    hp_metric = {event.step: event.value for event in events.Scalars("hp_metric")}
    assert len(accuracy) == 2  # validations after steps 6 and 12
    assert hp_metric == pytest.approx(accuracy)  # the dev metric at the same steps, never Lightning's -1

    hparams = logged_hparams(events)
    assert hparams["sparsity/strategy"] == "magnitude" and hparams["sparsity/sparsity"] == 0.5
    assert hparams["sparsity/schedule/kind"] == "cubic"
    assert hparams["data/task"] == "sst2" and hparams["backbone"] == str(tiny_bert_dir)
    assert hparams["dev_metric"] == "val/accuracy"

    scalar_tags = events.Tags()["scalars"]
    assert {"lr/decay", "lr/no_decay"} <= set(scalar_tags)
    assert events.Scalars("lr/decay")[0].value == pytest.approx(1e-3)  # --model.learning_rate, step 0

    images = events.Tags()["images"]
    masks = [tag for tag in images if tag.startswith("masks/")]
    assert "sparsity/layers" in images and len(masks) == 3  # first, middle and last of 12 targets
    assert [image.step for image in events.Images("sparsity/layers")] == sorted(accuracy)


@pytest.mark.parametrize("logger", ["none", "csv"])
def test_runs_without_tensorboard_log_learning_rates_and_do_not_crash(tmp_path, logger):
    module = SparseFTModule(config=tiny_config("bert"), num_labels=2, learning_rate=1e-3)
    csv_logger = CSVLogger(tmp_path) if logger == "csv" else False
    strategy = get_strategy("magnitude")(sparsity=0.5)
    trainer = Trainer(max_steps=4, val_check_interval=2, log_every_n_steps=1, accelerator="cpu", logger=csv_logger,
                      callbacks=[strategy], enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, SyntheticClassificationData(size=32))
    assert module.dev_metric["name"] == "val/accuracy" and module.dev_metric["step"] == 4
    if logger == "csv":
        (metrics,) = tmp_path.rglob("metrics.csv")
        with metrics.open() as file:
            columns = next(csv.reader(file))
        assert "lr/decay" in columns and "hp_metric" not in columns


def test_bar_chart_bars_are_as_long_as_the_sparsity():
    image = sparsity_bar_chart(["layer.0.q", "layer.0.k"], [0.25, 1.0], "title")
    bar_pixels = np.all(image == np.array(BAR, dtype=np.uint8), axis=-1)
    rows = [row for row in bar_pixels if row.any()]
    lengths = sorted({int(row.sum()) for row in rows})
    assert len(lengths) == 2 and lengths[1] == pytest.approx(4 * lengths[0], rel=0.02)


def test_heatmap_shows_kept_rows_dark_and_pruned_rows_light():
    mask = torch.ones(8, 8)
    mask[:4] = 0  # the first four output units pruned
    image = mask_heatmap(mask, "title", min_side=64)
    kept = np.all(image == KEPT_COLOUR.astype(np.uint8), axis=-1)
    pruned = np.all(image == PRUNED_COLOUR.astype(np.uint8), axis=-1)
    assert kept.sum() == pruned.sum() == 32 * 64  # 8x8 cells enlarged 8 times, half and half
    assert np.argwhere(pruned)[:, 0].max() < np.argwhere(kept)[:, 0].min()  # pruned rows above kept ones


def test_heatmaps_go_to_the_first_middle_and_last_layer():
    assert heatmap_layers(12) == [0, 6, 11]
    assert heatmap_layers(2) == [0, 1]

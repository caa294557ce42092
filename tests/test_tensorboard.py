"""Runs without a TensorBoard logger, and the figures of :mod:`sparseft.training.plots` that TensorBoard and
``sparseft report`` show (a run's TensorBoard contents: tests/test_outputs.py)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sparseft.strategies import get_strategy
from sparseft.testing import SyntheticClassificationData, tiny_config
from sparseft.training.module import SparseFTModule
from sparseft.training.plots import BAR, KEPT_COLOUR, PRUNED_COLOUR, heatmap_layers, mask_heatmap, sparsity_bar_chart


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
    heatmap = mask_heatmap(mask, "title", min_side=64, min_short_side=64)
    left, top, right, bottom = heatmap.boxes["cells"]
    cells = heatmap.image[top:bottom, left:right]
    kept = np.all(cells == KEPT_COLOUR.astype(np.uint8), axis=-1)
    pruned = np.all(cells == PRUNED_COLOUR.astype(np.uint8), axis=-1)
    assert kept.sum() == pruned.sum() == 32 * 64  # 8x8 cells enlarged 8 times, half and half
    assert np.argwhere(pruned)[:, 0].max() < np.argwhere(kept)[:, 0].min()  # pruned rows above kept ones


@pytest.mark.parametrize("shape", [(384, 384), (1536, 384), (32, 64)])  # MiniLM's attention and FFN, tiny BERT's
def test_heatmap_is_large_enough_to_read_with_axis_labels_and_a_kept_pruned_colour_bar(shape):
    heatmap = mask_heatmap(torch.rand(shape) > 0.5, "bert.encoder.layer.0.intermediate.dense")
    left, top, right, bottom = heatmap.boxes["cells"]
    assert max(right - left, bottom - top) >= 512 and min(right - left, bottom - top) >= 192  # was 192 and 48
    assert (bottom - top) / (right - left) == pytest.approx(shape[0] / shape[1])  # the matrix's aspect
    assert {"kept", "pruned", f"input features (columns 0-{shape[1] - 1})",
            f"output units (rows 0-{shape[0] - 1})"} <= set(heatmap.texts)
    bar_left, bar_top, bar_right, bar_bottom = heatmap.boxes["colour_bar"]
    assert bar_left >= right and (bar_top, bar_bottom) == (top, bottom)  # beside the cells, as tall
    legend = heatmap.image[bar_top + 1:bar_bottom - 1, (bar_left + bar_right) // 2].astype(float)
    assert np.abs(legend[0] - KEPT_COLOUR).max() < 4 and np.abs(legend[-1] - PRUNED_COLOUR).max() < 4
    assert np.all(np.diff(legend.sum(-1)) >= 0)  # from kept (dark) down to pruned (light)


def test_heatmaps_go_to_the_first_middle_and_last_layer():
    assert heatmap_layers(12) == [0, 6, 11]
    assert heatmap_layers(2) == [0, 1]


def test_a_fit_without_validation_still_shows_its_hyperparameters(tmp_path):
    module = SparseFTModule(config=tiny_config("bert"), num_labels=2)
    trainer = Trainer(max_steps=2, limit_val_batches=0, accelerator="cpu", logger=TensorBoardLogger(tmp_path),
                      callbacks=[get_strategy("magnitude")(sparsity=0.5)], enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, SyntheticClassificationData(size=16))
    (events,) = tmp_path.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events)).Reload()
    assert "_hparams_/session_start_info" in accumulator.PluginTagToContent("hparams")
    assert [math.isnan(event.value) for event in accumulator.Scalars("hp_metric")] == [True]  # not -1

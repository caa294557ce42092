"""``TensorBoardSummary``: what a TensorBoard user looks for beyond Lightning's scalars.

* HPARAMS: the module's hyperparameters, the data (``data/...``), the strategy with its settings
  (``sparsity/strategy``, ``sparsity/<argument>``) and the dev metric's name (``dev_metric``);
  ``hp_metric`` is the dev metric's value at every validation (``SparseFTModule.dev_metric``), not
  Lightning's ``-1`` placeholder, which is turned off.
* ``lr/<group>``: the learning rate of every optimizer parameter group (``decay``, ``no_decay``,
  ``<strategy>_<i>``), for any logger.
* IMAGES, at every validation (not every step: drawing costs milliseconds): ``sparsity/layers``,
  the measured sparsity of every target layer as one bar chart, and ``masks/<layer>``, heat-maps of
  the first, middle and last target's mask; the step slider shows them over training.

Hyperparameters and images go only to TensorBoard loggers; without one (``logger: false``, CSV)
they are skipped. ``SparseFTModule.configure_callbacks`` adds this callback to every run.

Runs on: ``on_fit_start`` (placeholder off), ``on_train_batch_start`` (learning rates),
``on_validation_end`` (hparams once, ``hp_metric``, images), ``on_train_end`` (hparams of a
fit that never validated).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn

from sparseft.sparse.parametrize import sparse_layers
from sparseft.strategies.base import SparsityStrategy
from sparseft.training.plots import heatmap_layers, mask_heatmap, short_names, sparsity_bar_chart
from sparseft.training.run_summary import describe_data


def tensorboard_loggers(trainer: Trainer) -> list[TensorBoardLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def logged_step(trainer: Trainer) -> int:
    """The step Lightning writes this moment's logged values at (optimizer steps taken, counted as
    Lightning's own ``LearningRateMonitor`` counts them), so pictures and ``hp_metric`` line up
    with ``val/...`` in TensorBoard."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def run_hyperparameters(base: dict[str, Any], trainer: Trainer, dev_metric: str | None) -> dict[str, Any]:
    """``base`` (what Lightning logged: the module's hyperparameters) with the data, the strategies'
    names and constructor arguments and the dev metric's name."""
    strategies = [callback for callback in trainer.callbacks if isinstance(callback, SparsityStrategy)]
    params = dict(base)
    params.update({f"data/{key}": value for key, value in describe_data(trainer.datamodule).items()})
    params["sparsity/strategy"] = ", ".join(strategy.strategy_name for strategy in strategies) or "none"
    for strategy in strategies:
        params.update({f"sparsity/{key}": value for key, value in strategy.describe()["init_args"].items()})
    params["dev_metric"] = dev_metric or "none"
    return params


class TensorBoardSummary(Callback):
    """Hyperparameters with the dev metric, learning rates and sparsity pictures for TensorBoard
    (see the module docstring for what is logged).

    Runs on: ``on_fit_start``, ``on_train_batch_start``, ``on_validation_end``, ``on_train_end``.
    """

    def __init__(self) -> None:
        self._hparams_written = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._hparams_written = False
        for logger in tensorboard_loggers(trainer):
            # the constructor's default_hp_metric: no "-1" session now; ours, with the metric, comes later
            logger._default_hp_metric = False

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        for optimizer in trainer.optimizers:
            for index, group in enumerate(optimizer.param_groups):
                pl_module.log(f"lr/{group.get('name', f'group_{index}')}", float(group["lr"]))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not tensorboard_loggers(trainer):
            return
        dev = getattr(pl_module, "dev_metric", None)
        if dev is not None and dev["step"] == trainer.global_step:
            self._log_hp_metric(trainer, dev)
        if trainer.is_global_zero:
            self._log_images(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._hparams_written:  # no validation ran: the hyperparameters, with no metric value
            self._log_hp_metric(trainer, {"name": None, "value": float("nan")})

    def _log_hp_metric(self, trainer: Trainer, dev: dict[str, Any]) -> None:
        step = logged_step(trainer)
        for logger in tensorboard_loggers(trainer):
            if self._hparams_written or trainer.state.fn != TrainerFn.FITTING:
                logger.log_metrics({"hp_metric": dev["value"]}, step=step)
            else:
                params = run_hyperparameters(logger.hparams, trainer, dev["name"])
                logger.log_hyperparams(params, metrics={"hp_metric": dev["value"]}, step=step)
        self._hparams_written = trainer.state.fn == TrainerFn.FITTING

    @staticmethod
    def _log_images(trainer: Trainer, pl_module: LightningModule) -> None:
        layers = sparse_layers(getattr(pl_module, "model", pl_module))
        if not layers:
            return
        trained = f"step {trainer.global_step}"
        names = [layer.name for layer in layers]
        sparsities = [1.0 - float(layer.mask.count_nonzero()) / layer.mask.numel() for layer in layers]
        images = {"sparsity/layers": sparsity_bar_chart(names, sparsities, f"measured sparsity per layer, {trained}")}
        labels = short_names(names)
        for index in heatmap_layers(len(layers)):
            images[f"masks/{labels[index]}"] = mask_heatmap(layers[index].mask, f"{names[index]}, {trained}").image
        for logger in tensorboard_loggers(trainer):
            for tag, image in images.items():
                logger.experiment.add_image(tag, image, logged_step(trainer), dataformats="HWC")

"""The optimizer and learning-rate schedule of a ``SparseFTModule``, built from its parameter groups.

Strategies attach their tensors (LoRA factors, scores, sparse values) in ``setup``, after the
module exists, so the optimizer is built in ``configure_optimizers`` from
``SparseFTModule.param_groups()``: the strategies' groups (with their own ``lr`` and
``weight_decay``) and the module's decay / no-decay groups. The optimizer class is AdamW
(``adam_betas``, ``adam_epsilon``) unless a factory is given (``--optimizer`` on the command
line, any ``torch.optim.Optimizer``); it always receives ``learning_rate`` as its ``lr``.
The default AdamW is torch's fused kernel wherever it runs (CPU and CUDA floating-point
parameters): one pass per tensor instead of a dozen ``foreach`` passes, 4x faster on this CPU, and
its time does not grow with zeros (``foreach``'s ``sqrt`` of the second moments took 1.6x longer
when 90% of them were 0, as a masked model's pruned weights' are). A run that clips gradients under
Lightning's mixed-precision plugin gets the ``foreach`` one: that plugin refuses to clip for an
optimizer that unscales gradients itself (:func:`clips_under_autocast`).

The schedule is stepped every optimizer step: a linear warm-up over ``warmup_ratio`` of the steps
(``step / warm-up``, 0 at the first step, as transformers' ``get_*_schedule_with_warmup``), then
``linear`` decay, ``cosine`` decay (both to ``min_lr_ratio`` of the peak) or ``constant``; or a
factory of any ``torch.optim.lr_scheduler.LRScheduler`` (``--lr_scheduler``) in its place.

Options that would be accepted and then not used are refused (:func:`check_options`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from sparseft.strategies.base import check_learning_rates

OptimizerFactory = Callable[[Iterable], Optimizer]
LRSchedulerFactory = Callable[[Optimizer], LRScheduler]

LR_SCHEDULES = ("linear", "cosine", "constant")
ADAMW_EPSILON = 1e-8
ADAMW_BETAS = (0.9, 0.999)


def check_options(
    optimizer: OptimizerFactory | None, lr_scheduler: LRSchedulerFactory | None, *, adam_epsilon: float | None,
    adam_betas: tuple[float, float] | None, lr_schedule: str | None, warmup_ratio: float, min_lr_ratio: float,
    learning_rate: float | None = None,
) -> None:
    """Refuse, with the fix, any option the chosen optimizer or schedule would not use, and values no
    schedule can follow: a negative learning rate (torch refuses it only once the run has started) and a
    warm-up outside [0, 1) of the run (1.5 never reaches the learning rate; -0.1 would run as 0)."""
    check_learning_rates("model", learning_rate=learning_rate)
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(
            f"--model.warmup_ratio is {warmup_ratio}: it is the fraction of the optimizer steps spent warming up "
            "the learning rate and must be in [0, 1) (e.g. 0.06)"
        )
    if lr_schedule is not None and lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {lr_schedule!r}; use one of {', '.join(LR_SCHEDULES)}")
    adam = {"adam_epsilon": adam_epsilon, "adam_betas": adam_betas}
    if optimizer is not None and any(value is not None for value in adam.values()):
        given = ", ".join(f"model.{key}" for key, value in adam.items() if value is not None)
        raise ValueError(
            f"{given} configure the default AdamW, but --optimizer chooses another: set them on the optimizer "
            "(e.g. --optimizer.betas, --optimizer.eps) and remove them from the model"
        )
    schedule = {"lr_schedule": lr_schedule, "warmup_ratio": warmup_ratio or None, "min_lr_ratio": min_lr_ratio or None}
    if lr_scheduler is not None and any(value is not None for value in schedule.values()):
        given = ", ".join(f"model.{key}" for key, value in schedule.items() if value is not None)
        raise ValueError(
            f"{given} shape the built-in learning-rate schedule, but --lr_scheduler replaces it: "
            "remove them, or remove --lr_scheduler"
        )
    if lr_schedule == "constant" and min_lr_ratio:
        raise ValueError("min_lr_ratio is the end of a decay; lr_schedule 'constant' does not decay")


def build_optimizer(
    groups: list[dict[str, Any]], learning_rate: float, factory: OptimizerFactory | None = None,
    adam_epsilon: float | None = None, adam_betas: tuple[float, float] | None = None, fuse: bool = True,
) -> Optimizer:
    """AdamW over ``groups`` (fused where :func:`fused_supported` and ``fuse``), or
    ``factory(groups, lr=learning_rate)``."""
    if factory is None:
        betas = tuple(adam_betas) if adam_betas is not None else ADAMW_BETAS
        eps = adam_epsilon if adam_epsilon is not None else ADAMW_EPSILON
        fused = fuse and fused_supported(groups)
        return torch.optim.AdamW(groups, lr=learning_rate, eps=eps, betas=betas, fused=fused)
    optimizer = factory(groups, lr=learning_rate)
    decayed = any(group.get("weight_decay") for group in groups)
    if decayed and "weight_decay" not in optimizer.defaults:
        raise ValueError(
            f"{type(optimizer).__name__} has no weight decay, but weight_decay is set for some parameters "
            "(model.weight_decay or the strategy's): set it to 0 or choose another optimizer"
        )
    return optimizer


def clips_under_autocast(trainer: Any) -> bool:
    """Whether ``trainer`` clips gradients under Lightning's mixed-precision plugin (``16-mixed``,
    ``bf16-mixed``), which refuses to clip for an optimizer that unscales gradients itself, as the fused
    AdamW does: such a run gets the ``foreach`` AdamW."""
    return bool(getattr(trainer, "gradient_clip_val", None)) and isinstance(
        getattr(trainer, "precision_plugin", None), MixedPrecision)


def fused_supported(groups: list[dict[str, Any]]) -> bool:
    """Whether torch's fused AdamW takes every parameter of ``groups``: floating point, on the CPU or a
    CUDA device, and either all sharded (FSDP2 ``DTensor``) or none (the fused kernel refuses a mix, which
    FSDP2 gives when it leaves empty tensors unsharded: S²FT's layers with no slice); and at least one."""
    parameters = [parameter for group in groups for parameter in group["params"]]
    sharded = {isinstance(parameter, DTensor) for parameter in parameters}
    return len(sharded) == 1 and all(
        parameter.is_floating_point() and parameter.device.type in ("cpu", "cuda") for parameter in parameters
    )


def lr_factor(step: float, warmup: int, total: int, schedule: str | None = "linear", floor: float = 0.0) -> float:
    """The built-in schedule's multiplier of the peak learning rate at optimizer step ``step``."""
    if step < warmup:  # transformers' get_linear_schedule_with_warmup: 0 at step 0
        return step / warmup
    if schedule == "constant":
        return 1.0
    remaining = max(0.0, (total - step) / max(1, total - warmup))
    decay = 0.5 * (1.0 - math.cos(math.pi * remaining)) if schedule == "cosine" else remaining
    return floor + (1.0 - floor) * decay


def build_lr_scheduler(
    optimizer: Optimizer, total: int, warmup: int, factory: LRSchedulerFactory | None = None,
    schedule: str | None = "linear", floor: float = 0.0,
) -> LRScheduler:
    """``factory(optimizer)``, or the built-in schedule as a ``LambdaLR`` (which DSEE can stretch)."""
    if factory is None:
        def factor(step: int) -> float:  # a plain function: LambdaLR does not checkpoint it
            return lr_factor(step, warmup, total, schedule, floor)

        return LambdaLR(optimizer, factor)
    scheduler = factory(optimizer)
    if isinstance(scheduler, ReduceLROnPlateau):
        raise ValueError(
            "ReduceLROnPlateau needs a monitored metric and steps per validation; sparseft steps the "
            "learning-rate schedule every optimizer step: choose another --lr_scheduler"
        )
    return scheduler

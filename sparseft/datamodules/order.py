"""The training order: shuffled per epoch from a seed, sharded per process, resumable mid-epoch.

Lightning 2.6 checkpoints a *dataloader's* state only when the loader has ``state_dict`` /
``load_state_dict``, and it drops that state whenever ``trainer.estimated_stepping_batches`` is
read before the restore (Lightning issue #20550) — which every sparseft run does (the LR
schedule and the sparsity schedule need the total). The datamodule's own ``state_dict`` is
restored before any dataloader is built, so the position lives there instead:

* the order of epoch ``e`` is a pure function of ``(seed, e)``; Lightning calls ``set_epoch``
  at every epoch start (as it does for ``DistributedSampler``), so a resumed run shuffles its
  later epochs exactly as an uninterrupted one, with nothing saved;
* with several processes the sampler shards that order itself, process ``r`` of ``R`` taking
  every ``R``-th example from ``r`` (so step ``i``'s batches together are the ``i``-th block of
  ``R × batch_size`` examples of the order). It is a ``DistributedSampler``, which Lightning
  leaves in place instead of re-shuffling it through its ``DistributedSamplerWrapper``;
* a checkpoint records how many batches of the running epoch each process has trained (the
  same count on every process) and how many processes shared the order; the first pass over
  that epoch after a resume starts at the next batch of the process's own shard;
* with loader workers, the sampler is read when the first batch is asked for
  (:class:`TrainingLoader`), not when Lightning calls ``iter()`` on the loader, which it does
  before it has worked out which epoch a resumed run is in.

A datamodule holds a :class:`TrainingOrder`, builds its training loader with
:meth:`TrainingOrder.sampler` and :class:`TrainingLoader`, and forwards ``state_dict`` /
``load_state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler


def data_parallel(trainer: Trainer | None) -> tuple[int, int]:
    """``(processes sharing the data, this process's index among them)``: what Lightning would hand
    a ``DistributedSampler`` (the data-parallel group under model-parallel strategies), else ``(1, 0)``."""
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
    if not kwargs:
        return 1, 0
    return int(kwargs["num_replicas"]), int(kwargs["rank"])


class EpochShuffleSampler(DistributedSampler):
    """This process's share of a permutation of ``range(dataset_size)`` per epoch, seeded by ``seed + epoch``.

    The epoch's order is padded, as ``DistributedSampler`` pads, by repeating its start until every
    process has ``ceil(dataset_size / replicas)`` examples; process ``rank`` takes positions
    ``rank, rank + replicas, ...``. With one process it is the whole order.

    Args:
        dataset_size: number of examples.
        seed: seed of epoch 0's order; epoch ``e`` uses ``seed + e``.
        start: ``(epoch, sample)``: the first pass over that epoch begins at that position of this
            process's shard (a resume; past the end, the pass is empty and the loop moves on).
        epoch_of: the running epoch, read when a pass begins (the trainer's ``current_epoch``);
            without it, the epoch of the last ``set_epoch`` call.
        replicas: processes sharing the order.
        rank: this process's index among them.
    """

    def __init__(
        self, dataset_size: int, seed: int, start: tuple[int, int] | None = None,
        epoch_of: Callable[[], int] | None = None, replicas: int = 1, rank: int = 0,
    ) -> None:
        # ``range`` stands in for the dataset: DistributedSampler reads only its length
        super().__init__(range(dataset_size), num_replicas=replicas, rank=rank, shuffle=True, seed=seed)
        self.dataset_size, self._start, self.epoch_of = dataset_size, start, epoch_of
        self.epoch = start[0] if start else 0

    def set_epoch(self, epoch: int) -> None:
        # Lightning passes its count of *processed* epochs, which runs one ahead of the epoch being
        # trained after a resume from an epoch-end checkpoint; ``epoch_of`` is preferred when given
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """The full order of ``epoch``, before sharding."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_size, generator=generator).tolist()

    def shard(self, epoch: int) -> list[int]:
        """This process's share of ``epoch``'s order (all of it with one process)."""
        order = self.order(epoch)
        padded = (order * math.ceil(self.total_size / len(order)))[: self.total_size]
        return padded[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch_of() if self.epoch_of is not None else self.epoch
        offset = 0
        if self._start is not None and self._start[0] == epoch:
            offset, self._start = self._start[1], None  # a resume applies once, to its own epoch
        return iter(self.shard(epoch)[offset:])

    def __len__(self) -> int:
        # the full share even when resuming: Lightning counts the processed batches itself
        return self.num_samples


class _StartOnFirstBatch:
    """An iterator that builds the loader's iterator (starting its workers) when the first batch is asked for."""

    def __init__(self, start: Callable[[], Iterator[Any]]) -> None:
        self._start: Callable[[], Iterator[Any]] | None = start
        self._iterator: Iterator[Any] | None = None

    def __iter__(self) -> _StartOnFirstBatch:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            assert self._start is not None
            self._iterator, self._start = self._start(), None
        return next(self._iterator)


class TrainingLoader(DataLoader):
    """The training ``DataLoader``; with workers, its sampler is read at the first batch, not at ``iter()``.

    With ``num_workers > 0`` torch's iterator hands the workers their first indices as soon as it is
    created. Lightning creates it when it sets up the fit loop, before a resumed run's epoch counter
    reaches the epoch it trains (after an epoch-end checkpoint), so the sampler would shuffle for the
    wrong epoch. Deferring the creation to the first batch makes the sampler read the epoch at the
    same moment as without workers (where torch's batch sampler is lazy), whatever the worker count.
    """

    def __iter__(self) -> Iterator[Any]:
        if self.num_workers == 0:
            return super().__iter__()
        return _StartOnFirstBatch(super().__iter__)


class TrainingOrder:
    """What a datamodule keeps to shuffle, shard and resume its training split.

    Args:
        seed: seed of the per-epoch order (``data.seed``).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._resume: dict[str, int] | None = None

    def sampler(self, num_samples: int, batch_size: int, trainer: Trainer | None) -> EpochShuffleSampler:
        """The training sampler of this process; after a restore, positioned at the checkpoint's batch."""
        replicas, rank = data_parallel(trainer)
        start = None
        if self._resume is not None:
            epoch, batches = self._resume["epoch"], self._resume["batches"]
            if batches and "replicas" not in self._resume and replicas > 1:
                rank_zero_warn("sparseft: the checkpoint does not record how its processes shared the data "
                               "(written before they did); the running epoch's order starts over")
            else:
                start = (epoch, batches * batch_size)
            self._resume = None
        epoch_of = (lambda: trainer.current_epoch) if trainer is not None else None
        return EpochShuffleSampler(num_samples, self.seed, start, epoch_of, replicas, rank)

    @staticmethod
    def state_dict(trainer: Trainer | None) -> dict[str, int]:
        """The running epoch, how many of its batches the training loop has processed (in each process)
        and how many processes share the data. A checkpoint written at an epoch's end records all the
        batches: should Lightning resume in that epoch, the pass is empty and the next epoch starts,
        instead of an extra batch being trained."""
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        return {"epoch": trainer.current_epoch, "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed,
                "replicas": data_parallel(trainer)[0]}

    def load_state_dict(self, state: dict[str, Any] | None, trainer: Trainer | None = None) -> None:
        """Keep the position for the next training sampler; when fitting with ``trainer``, refuse a
        checkpoint whose data was shared by another number of processes (its position is per process)."""
        self._resume = dict(state) if state else None
        if self._resume is None or trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return
        saved, replicas = self._resume.get("replicas"), data_parallel(trainer)[0]
        if saved is not None and saved != replicas:
            raise ValueError(
                f"--ckpt_path {trainer.ckpt_path}: written by a run whose data was shared by {saved} process(es), "
                f"this run has {replicas}; a resume continues each process's share of the data, so resume with "
                f"{saved} (--trainer.devices x --trainer.num_nodes)"
            )

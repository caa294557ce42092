"""The training order: shuffled per epoch from a seed, resumable mid-epoch.

Lightning 2.6 checkpoints a *dataloader's* state only when the loader has ``state_dict`` /
``load_state_dict``, and it drops that state whenever ``trainer.estimated_stepping_batches`` is
read before the restore (Lightning issue #20550) — which every sparseft run does (the LR
schedule and the sparsity schedule need the total). The datamodule's own ``state_dict`` is
restored before any dataloader is built, so the position lives there instead:

* the order of epoch ``e`` is a pure function of ``(seed, e)``; Lightning calls ``set_epoch``
  at every epoch start (as it does for ``DistributedSampler``), so a resumed run shuffles its
  later epochs exactly as an uninterrupted one, with nothing saved;
* a checkpoint records how many batches of the running epoch the training loop has processed;
  the first pass over that epoch after a resume starts at the next batch.

A datamodule holds a :class:`TrainingOrder` and forwards its ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(num_samples)`` per epoch, seeded by ``seed + epoch``.

    Args:
        num_samples: dataset size.
        seed: seed of epoch 0's order; epoch ``e`` uses ``seed + e``.
        start: ``(epoch, sample)``: the first pass over that epoch begins at that sample (a resume;
            past the end, the pass is empty and the loop moves on to the next epoch).
        epoch_of: the running epoch, read when a pass begins (the trainer's ``current_epoch``);
            without it, the epoch of the last ``set_epoch`` call.
    """

    def __init__(
        self, num_samples: int, seed: int, start: tuple[int, int] | None = None,
        epoch_of: Callable[[], int] | None = None,
    ) -> None:
        self.num_samples, self.seed, self._start, self.epoch_of = num_samples, seed, start, epoch_of
        self.epoch = start[0] if start else 0

    def set_epoch(self, epoch: int) -> None:
        # Lightning passes its count of *processed* epochs, which runs one ahead of the epoch being
        # trained after a resume from an epoch-end checkpoint; ``epoch_of`` is preferred when given
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """The full order of ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch_of() if self.epoch_of is not None else self.epoch
        offset = 0
        if self._start is not None and self._start[0] == epoch:
            offset, self._start = self._start[1], None  # a resume applies once, to its own epoch
        return iter(self.order(epoch)[offset:])

    def __len__(self) -> int:
        # the full epoch even when resuming: Lightning counts the processed batches itself
        return self.num_samples


class TrainingOrder:
    """What a datamodule keeps to shuffle and resume its training split.

    Args:
        seed: seed of the per-epoch order (``data.seed``).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._resume: dict[str, int] | None = None

    def sampler(self, num_samples: int, batch_size: int, trainer: Trainer | None) -> EpochShuffleSampler:
        """The training sampler; after a restore, positioned at the checkpoint's batch."""
        start = None
        if self._resume is not None:
            epoch, batches = self._resume["epoch"], self._resume["batches"]
            self._resume = None
            if batches and trainer is not None and trainer.world_size > 1:
                rank_zero_warn(
                    "sparseft: a mid-epoch resume with several processes starts the epoch's order over "
                    "(Lightning shards the order itself); resume from an epoch-end checkpoint for an exact run"
                )
            else:
                start = (epoch, batches * batch_size)
        epoch_of = (lambda: trainer.current_epoch) if trainer is not None else None
        return EpochShuffleSampler(num_samples, self.seed, start, epoch_of)

    @staticmethod
    def state_dict(trainer: Trainer | None) -> dict[str, int]:
        """The running epoch and how many of its batches the training loop has processed. A checkpoint
        written at an epoch's end records all of them: should Lightning resume in that epoch, the
        pass is empty and the next epoch starts, instead of an extra batch being trained."""
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        return {"epoch": trainer.current_epoch, "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self._resume = dict(state) if state else None

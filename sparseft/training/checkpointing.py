"""What ``sparseft fit`` adds so that an interrupted run can always be resumed.

* :func:`fit_checkpoint_callbacks`: a checkpoint of the last state at the end of every fit, and
  one on an exception or Ctrl-C (Lightning's ``ModelCheckpoint(save_last=True,
  save_on_exception=True)``), whether or not a validation ever ran.
* :class:`LastIsNewest`: ``last.ckpt`` is the final state of every finished fit and the newest
  state after a resume. Lightning saves "last" only when another save triggers: with a user
  ``ModelCheckpoint(every_n_train_steps=7)`` a 30-step fit's ``last.ckpt`` was step 28, and
  ``export`` of it exported step 28. And a resume from a checkpoint that did not record
  ``last.ckpt`` as its own (a top-k or a manual one) wrote ``last-v1.ckpt`` beside a stale
  ``last.ckpt``, so ``--ckpt_path last.ckpt`` silently lost steps. And where the best checkpoint is of
  the final step too, ``last.ckpt`` becomes a link to it: two copies of the same state (283 MB each for
  MiniLM) are one file. A resumed run replaces the link by a file when it saves (:class:`SideBySideCheckpointIO`
  renames over the link, not through it).
* :class:`SideBySideCheckpointIO`: Lightning writes a checkpoint through an fsspec transaction,
  whose local files are staged with ``tempfile.mkstemp()`` in the system temporary directory;
  a kill mid-write leaves that partial file behind (hundreds of MB for a real model), and on
  another filesystem the final move is a copy. This writes ``.<name>.partial`` next to the
  target and renames it over the target, so a checkpoint is whole or absent, and a partial file
  stays in the run's own folder, replaced by the next save of that checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint


def fit_checkpoint_callbacks(configured: list[Any], enabled: bool = True) -> list[Callback]:
    """The checkpoint callbacks to add to a fit whose trainer has ``configured`` callbacks.

    Without a configured ``ModelCheckpoint``: one with ``save_last`` and ``save_on_exception`` (it
    takes the place of Lightning's default one). With some: the first one gets ``save_last`` and
    ``save_on_exception`` unless one of them has it already. Nothing when checkpointing is off.
    """
    if not enabled:
        return []
    checkpoints = [callback for callback in configured if isinstance(callback, ModelCheckpoint)]
    if not checkpoints:
        return [ModelCheckpoint(save_last=True, save_on_exception=True), LastIsNewest()]
    if not any(checkpoint.save_last for checkpoint in checkpoints):
        checkpoints[0].save_last = True
    if not any(checkpoint.save_on_exception for checkpoint in checkpoints):
        checkpoints[0].save_on_exception = True
    return [LastIsNewest()]


class LastIsNewest(Callback):
    """Keeps ``last.ckpt`` the newest state: the final one of a finished fit, overwritten (not versioned
    as ``last-v1.ckpt``) when a resumed run saves (see the module docstring).

    Runs on: ``on_train_start`` (a resumed run takes over the existing ``last.ckpt``) and
    ``on_train_end`` (saves the final state where no save happened at the last step, or links it to the best
    checkpoint when that one is of the last step).
    """

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.ckpt_path is None:  # a fresh run keeps Lightning's versioning of another run's files
            return
        for checkpoint in _last_savers(trainer):
            path = checkpoint.format_checkpoint_name(checkpoint._monitor_candidates(trainer),
                                                     checkpoint.CHECKPOINT_NAME_LAST)
            if checkpoint.file_exists(path, trainer):
                checkpoint.last_model_path = path  # Lightning versions any other existing name

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for checkpoint in _last_savers(trainer):
            if checkpoint._last_global_step_saved != trainer.global_step:
                checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))
            if trainer.is_global_zero:
                link_if_same_step(checkpoint.last_model_path, checkpoint.best_model_path)
        trainer.strategy.barrier()


def link_if_same_step(last: str, best: str) -> bool:
    """Replace the file ``last`` by a relative symbolic link to ``best`` when both are checkpoint files of the
    same optimizer step (read from their metadata; the weights are memory-mapped, not read). Whether it did."""
    last_path, best_path = Path(last or ""), Path(best or "")
    if not (last and best and last_path.is_file() and best_path.is_file()) or last_path.is_symlink():
        return False
    if last_path.resolve() == best_path.resolve() or _global_step(last_path) != _global_step(best_path):
        return False
    staged = last_path.with_name(f".{last_path.name}.link")
    staged.unlink(missing_ok=True)
    try:
        staged.symlink_to(os.path.relpath(best_path, last_path.parent))
    except OSError:  # no symbolic links here (Windows without the privilege): keep the copy
        return False
    os.replace(staged, last_path)  # atomically: last.ckpt is a whole file or the link, never absent
    return True


def _global_step(path: Path) -> int | None:
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("global_step")


def _last_savers(trainer: Trainer) -> list[ModelCheckpoint]:
    return [callback for callback in trainer.checkpoint_callbacks
            if isinstance(callback, ModelCheckpoint) and callback.save_last]


class SideBySideCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that stages a local checkpoint next to its target, then renames it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # remote: fsspec's transaction
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def with_checkpoint_io(plugins: Any) -> list[Any]:
    """``plugins`` with :class:`SideBySideCheckpointIO` added, unless a checkpoint IO is configured."""
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [] if plugins is None else [plugins]
    if any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        return plugins
    return [*plugins, SideBySideCheckpointIO()]

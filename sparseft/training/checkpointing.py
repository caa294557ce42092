"""What ``sparseft fit`` adds so that an interrupted run can always be resumed.

* :func:`fit_checkpoint_callbacks`: a checkpoint of the last state at the end of every fit, and
  one on an exception or Ctrl-C (Lightning's ``ModelCheckpoint(save_last=True,
  save_on_exception=True)``), whether or not a validation ever ran.
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
        return [ModelCheckpoint(save_last=True, save_on_exception=True)]
    if not any(checkpoint.save_last for checkpoint in checkpoints):
        checkpoints[0].save_last = True
    if not any(checkpoint.save_on_exception for checkpoint in checkpoints):
        checkpoints[0].save_on_exception = True
    return []


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

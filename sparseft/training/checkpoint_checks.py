"""Read a checkpoint, a file or a sharded (FSDP2) directory, and refuse, in one line, one that is not
sparseft's or does not fit the run loading it.

Without these, ``sparseft export`` on another program's checkpoint fails with
``KeyError: 'hyper_parameters'``, and resuming a checkpoint trained with other targets or for
another task fails with torch's list of every missing key and mismatched size.

Under ``--trainer.strategy fsdp2`` Lightning writes each checkpoint as a directory: every rank's
shards (``torch.distributed.checkpoint``) and ``meta.pt`` with everything else (hyperparameters,
callback and strategy state, loops). :func:`load_checkpoint` reads either form as one dictionary.

``torch.save`` writes a zip archive whose members carry CRC-32 checksums, but ``torch.load`` does not
check them: a checkpoint with bytes changed on disk loaded with mangled weights and the run went on.
:func:`check_checkpoint_file` reads every member against its checksum (and refuses an empty or
truncated file) before anything loads it: resume, export, report and the model options a run takes
from ``--ckpt_path``.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

#: the file of a sharded checkpoint directory that holds everything but the model and optimizer states
SHARDED_METADATA_FILE = "meta.pt"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint directory written under FSDP2 (shards and ``meta.pt``)."""
    path = Path(path)
    return path.is_dir() and (path / SHARDED_METADATA_FILE).is_file() and (path / ".metadata").is_file()


def is_checkpoint_path(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint file or a sharded checkpoint directory."""
    return Path(path).is_file() or is_sharded_checkpoint(path)


#: files whose every zip member matched its checksum, by (path, size, modification time): one check per
#: file and version, though a command reads the checkpoint several times (options, weights, summary)
_VERIFIED: set[tuple[str, int, int]] = set()


def check_checkpoint_file(path: str | Path) -> None:
    """Refuse, in one line naming it, a checkpoint file that is empty, truncated or corrupted.

    A sharded (FSDP2) directory's ``meta.pt`` is checked (its shards are not zip archives). A file that
    is no zip archive is refused too: ``torch.save`` and Lightning have written zip archives since
    torch 1.6.

    Raises:
        ValueError: the file is empty, not a zip archive (truncated: the archive's directory is at its
            end), or a member's bytes do not match its CRC-32 (changed after it was written).
    """
    file = Path(path) / SHARDED_METADATA_FILE if is_sharded_checkpoint(path) else Path(path)
    if not file.is_file():
        return
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    fix = "give another checkpoint (e.g. an earlier one in the same checkpoints/ folder)"
    if stat.st_size == 0:
        raise ValueError(f"--ckpt_path {file} is empty (0 bytes): its write was interrupted; {fix}")
    if not zipfile.is_zipfile(file):
        raise ValueError(f"--ckpt_path {file}: not a readable PyTorch checkpoint (no zip directory at its end: "
                         f"truncated, or not written by torch.save); {fix}")
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise ValueError(f"--ckpt_path {file} is corrupted or truncated ({error}); {fix}") from error
    if bad is not None:
        raise ValueError(f"--ckpt_path {file} is corrupted: its member {bad} does not match its CRC checksum "
                         f"(the bytes changed after it was written); {fix}")
    _VERIFIED.add(key)


def load_checkpoint(path: str | Path, tensors: bool = True) -> dict[str, Any]:
    """A checkpoint on the CPU as one dictionary: a ``.ckpt`` file, or a sharded directory with its
    shards joined into whole tensors (the model's and the optimizer's; the whole state must fit in CPU
    memory). ``tensors=False`` reads a directory's ``meta.pt`` only and memory-maps a file: for the
    hyperparameters and strategy settings without reading the weights. The file is checked first
    (:func:`check_checkpoint_file`)."""
    check_checkpoint_file(path)
    if not is_sharded_checkpoint(path):
        return torch.load(path, map_location="cpu", weights_only=False, mmap=not tensors)
    if not tensors:
        return torch.load(Path(path) / SHARDED_METADATA_FILE, map_location="cpu", weights_only=False)
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    return _load_distributed_checkpoint(Path(path))


def read_checkpoint(path: str | Path, required: tuple[str, ...]) -> dict[str, Any]:
    """Load a checkpoint (file or sharded directory) on the CPU and check it has the ``required``
    top-level entries.

    Raises:
        FileNotFoundError: ``path`` is neither a file nor a sharded checkpoint directory.
        ValueError: the file is not a PyTorch checkpoint, is empty, truncated or corrupted, or lacks a
            required entry (not sparseft's).
    """
    if not is_checkpoint_path(path):
        raise FileNotFoundError(f"--ckpt_path {path}: no such file; give a checkpoint written by sparseft fit")
    check_checkpoint_file(path)
    try:
        checkpoint = load_checkpoint(path)
    except Exception as error:  # torch raises several types for a file that is no checkpoint
        raise ValueError(
            f"--ckpt_path {path}: not a readable PyTorch checkpoint ({type(error).__name__}); give a .ckpt "
            "written by sparseft fit"
        ) from error
    missing = [key for key in required if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ValueError(
            f"--ckpt_path {path}: not a checkpoint written by sparseft fit (it has no {', '.join(missing)}); "
            "export a checkpoint from a sparseft run's checkpoints/ folder"
        )
    return checkpoint


def shape_mismatch(saved: Mapping[str, Any], expected: Mapping[str, torch.Tensor]) -> ValueError | None:
    """The one-line reason tensors that a checkpoint's ``state_dict`` and the model's (``expected``) both
    have differ in shape (another task's head, another model's sizes), or None."""
    sizes = [(key, tuple(saved[key].shape), tuple(tensor.shape)) for key, tensor in expected.items()
             if key in saved and isinstance(saved[key], torch.Tensor) and saved[key].shape != tensor.shape]
    if not sizes:
        return None
    key, theirs, ours = sizes[0]
    return ValueError(
        f"--ckpt_path: {key} is {list(theirs)} in the checkpoint but {list(ours)} in this run ({len(sizes)} "
        "tensors differ): it was trained for another task or model; use the data.task and model options it was "
        "trained with, or start a new run"
    )


def state_mismatch(saved: Mapping[str, Any], expected: Mapping[str, torch.Tensor]) -> ValueError | None:
    """The one-line reason a checkpoint's ``state_dict`` does not fit the model's (``expected``), or None."""
    sizes = shape_mismatch(saved, expected)
    if sizes:
        return sizes
    missing = [key for key in expected if key not in saved]
    unexpected = [key for key in saved if key not in expected]
    if not missing and not unexpected:
        return None
    examples = "; ".join(f"{what} {keys[0]} ({len(keys)} in all)" for what, keys in
                         (("missing", missing), ("not in this run", unexpected)) if keys)
    return ValueError(
        f"--ckpt_path: the checkpoint's tensors differ from this run's ({examples}): it was trained with other "
        "sparsity options (targets, strategy, rank); resume with the options it was trained with"
    )

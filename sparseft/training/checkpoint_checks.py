"""Refuse, in one line, a checkpoint that is not sparseft's or does not fit the run loading it.

Without these, ``sparseft export`` on another program's checkpoint fails with
``KeyError: 'hyper_parameters'``, and resuming a checkpoint trained with other targets or for
another task fails with torch's list of every missing key and mismatched size.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def read_checkpoint(path: str | Path, required: tuple[str, ...]) -> dict[str, Any]:
    """Load a checkpoint on the CPU and check it has the ``required`` top-level entries.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is not a PyTorch checkpoint, or lacks a required entry (not sparseft's).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"--ckpt_path {path}: no such file; give a checkpoint written by sparseft fit")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
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


def state_mismatch(saved: Mapping[str, Any], expected: Mapping[str, torch.Tensor]) -> ValueError | None:
    """The one-line reason a checkpoint's ``state_dict`` does not fit the model's (``expected``), or None."""
    sizes = [(key, tuple(saved[key].shape), tuple(tensor.shape)) for key, tensor in expected.items()
             if key in saved and isinstance(saved[key], torch.Tensor) and saved[key].shape != tensor.shape]
    if sizes:
        key, theirs, ours = sizes[0]
        return ValueError(
            f"--ckpt_path: {key} is {list(theirs)} in the checkpoint but {list(ours)} in this run ({len(sizes)} "
            "tensors differ): it was trained for another task or model; use the data.task and model options it was "
            "trained with, or start a new run"
        )
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

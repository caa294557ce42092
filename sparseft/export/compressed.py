"""Write an export's weights in sparseft's compressed layout and load such an export.

``export_pretrained(..., weight_format="compressed")`` (``sparseft export --format
compressed``) lets ``save_pretrained`` write the model as usual, then re-encodes the
safetensors it wrote into one file where each sparse tensor is a packed bitmask and its
non-zero values (the layout is specified in :mod:`sparseft.export.compressed_modeling`, which
is copied beside the weights as remote code). The maintained formats for this are gone:
compressed-tensors removed its sparse compressors (it keeps only their config classes) and
transformers 5 has no ``sparsity_config`` handling, so no maintained library reads such files.

The export loads back two ways, both giving the standard architecture with the same weights:
``AutoModelFor....from_pretrained(path, trust_remote_code=True)`` with no sparseft installed,
or :func:`load_compressed` here, which uses no remote code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import cached_file

from sparseft.export import compressed_modeling
from sparseft.export.compressed_modeling import (
    HUB_KWARGS,
    WEIGHTS_FILE,
    compressed_load_kwargs,
    encode_state_dict,
    worth_compressing,
)
from sparseft.export.shrink import write_remote_code_

WEIGHT_FORMATS = ("dense", "compressed")
REMOTE_CODE_FILE = "modeling_sparseft_compressed.py"


def check_weight_format(weight_format: str, shrink: bool) -> None:
    """Refuse an unknown format, and compression of a structured (shrunk) export."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"unknown export format {weight_format!r}; use one of {', '.join(WEIGHT_FORMATS)}")
    if weight_format == "compressed" and shrink:
        raise ValueError(
            "--format compressed stores the zeros of unstructured and N:M sparsity, but this strategy prunes "
            "whole heads / FFN channels, which export removes physically (a smaller dense model): "
            "use --format dense"
        )


def check_compressible(model: nn.Module, target_names: list[str]) -> None:
    """Refuse ``--format compressed`` when no target layer's merged weight has enough zeros to be stored
    as a bitmask (S²FT's merged weights are dense; a model with no target layers has nothing pruned):
    the result would be a directory as large that needs ``trust_remote_code`` for nothing (all-zero
    biases alone do not count). Called before anything is written."""
    if not any(worth_compressing(model.get_submodule(name).weight) for name in target_names):
        raise ValueError("--format compressed: no target layer's weight has enough zeros to be stored as a bitmask "
                         "(nothing would be compressed): use --format dense")


def add_compressed_code_(model: nn.Module, output_dir: str | Path) -> None:
    """Write the remote code that reads the compressed file and point the config's ``auto_map`` at it
    (the model's class and its base model's, for ``AutoModel`` and the ``feature-extraction`` pipeline)."""
    write_remote_code_(model, Path(output_dir, REMOTE_CODE_FILE), compressed_modeling, "Compressed",
                       "compressed_class")


def compress_saved_weights_(output_dir: str | Path) -> dict[str, Any]:
    """Replace the safetensors ``save_pretrained`` wrote in ``output_dir`` by one compressed file.

    Returns the sizes for the report: ``bytes`` of the compressed file, ``dense_bytes`` of the
    files it replaces and ``compressed_tensors``, how many tensors are stored as bitmask + values.
    """
    output_dir = Path(output_dir)
    saved = sorted(output_dir.glob("model*.safetensors"))
    saved = [path for path in saved if path.name != WEIGHTS_FILE]
    if not saved:
        raise ValueError(f"no safetensors weights in {output_dir} to compress")
    state_dict = {}
    for path in saved:
        state_dict.update(load_file(path))
    tensors, metadata = encode_state_dict(state_dict)
    save_file(tensors, output_dir / WEIGHTS_FILE, metadata=metadata)
    dense_bytes = sum(path.stat().st_size for path in saved)
    for path in [*saved, output_dir / "model.safetensors.index.json"]:
        path.unlink(missing_ok=True)
    return {
        "format": "compressed",
        "file": WEIGHTS_FILE,
        "bytes": (output_dir / WEIGHTS_FILE).stat().st_size,
        "dense_bytes": dense_bytes,
        "compressed_tensors": sum(name.endswith(".bitmask") for name in tensors),
        "load_with": "from_pretrained(path, trust_remote_code=True) or sparseft.load_compressed(path)",
    }


def load_compressed(path: str | Path, model_class: type | None = None, **kwargs: Any) -> nn.Module:
    """Load a compressed export as its standard transformers class, without remote code.

    Args:
        path: the export directory (or a hub repository holding one).
        model_class: the class to build, e.g. ``BertForSequenceClassification``; by default the
            one recorded in the config's ``architectures``.
        kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    hub = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
    if cached_file(str(path), WEIGHTS_FILE, _raise_exceptions_for_missing_entries=False, **hub) is None:
        raise ValueError(f"{path} holds no {WEIGHTS_FILE}: not a compressed export "
                         "(a dense export loads with a plain from_pretrained)")
    if model_class is None:
        config = transformers.AutoConfig.from_pretrained(path, **hub)
        architectures = getattr(config, "architectures", None) or []
        if not architectures or not hasattr(transformers, architectures[0]):
            raise ValueError(f"{path}: config.json names no transformers model class (architectures: "
                             f"{architectures}); pass model_class=")
        model_class = getattr(transformers, architectures[0])
    return model_class.from_pretrained(None, **compressed_load_kwargs(str(path), model_class, kwargs))

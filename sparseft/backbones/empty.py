"""A backbone without its weights, and its checkpoint read one piece at a time.

Sharded loading (FSDP2, :mod:`sparseft.training.sharding`) builds the model with every parameter on
the meta device (a shape, no storage), shards it, and only then gives each process storage for its
own rows, read from the checkpoint: no process ever holds the whole backbone. Buffers stay real:
they are small, and the non-persistent ones (LLaMA's rotary frequencies, BERT's position ids) are
computed when the model is built and are in no checkpoint.

:class:`CheckpointTensors` reads a Hugging Face model directory's ``safetensors`` files (one file or
an index of several) by key and row range without reading the rest: a row range of a row-major
tensor is one contiguous byte range, read with plain file reads straight into its tensor (no memory
map, whose touched pages would count as the process's resident memory); ``pytorch_model.bin`` files
are memory-mapped, so slicing them reads only the pages sliced.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel

SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
PARAMETRIZED_SUFFIX = ".parametrizations.weight.original"


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside, every parameter a module registers is moved to the meta device as it is registered:
    the module's initialisation then runs on shapes only (no storage, no random numbers), while its
    buffers are real."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_backbone(model_class: Any, directory: str | Path, config_kwargs: dict[str, Any]) -> PreTrainedModel:
    """``model_class`` built from the configuration in ``directory`` with its parameters on the meta device
    (buffers real, on the CPU), in training mode; :class:`CheckpointTensors` fills it later."""
    config = AutoConfig.from_pretrained(directory, **config_kwargs)
    with torch.device("cpu"), parameters_on_meta():  # cpu: also inside a meta-device context (Lightning's)
        return model_class.from_config(config).train()


class CheckpointTensors:
    """The tensors of a model directory's weight files, read by key and index without loading the rest.

    Use as a context manager (it keeps the files open)::

        with CheckpointTensors(directory) as checkpoint:
            rows = checkpoint.read("model.layers.0.mlp.up_proj.weight", (slice(0, 128),))
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._files = weight_files(self.directory)
        self._stack = ExitStack()
        self._tensors: dict[str, StoredTensor | torch.Tensor] = {}

    def __enter__(self) -> CheckpointTensors:
        for path in self._files:
            if path.suffix == ".safetensors":
                handle = self._stack.enter_context(path.open("rb"))
                self._tensors.update(safetensors_entries(handle))
            else:  # memory-mapped: slicing reads only the pages sliced
                self._tensors.update(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._tensors.clear()

    def keys(self) -> set[str]:
        return set(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        """``tensor[index]`` of the stored tensor ``key`` as a new tensor, reading only its rows ``index[0]``."""
        stored = self._tensors[key]
        if isinstance(stored, torch.Tensor):
            return stored[index].clone()
        return stored.read_rows(index[0] if index else slice(None))[(slice(None), *index[1:])]


    def key_of(self, name: str, base_model_prefix: str) -> str | None:
        """The stored key of the model's parameter ``name`` (a parametrized ``weight`` by its plain name); a
        checkpoint of the bare base model (``BertModel`` for ``BertForSequenceClassification``) stores it
        without the ``<base_model_prefix>.`` the task model adds, and the reverse. None: not stored."""
        name = name.replace(PARAMETRIZED_SUFFIX, ".weight")
        prefix = f"{base_model_prefix}." if base_model_prefix else ""
        candidates = [name]
        if prefix:
            candidates.append(name[len(prefix):] if name.startswith(prefix) else prefix + name)
        return next((key for key in candidates if key in self._tensors), None)


#: safetensors' dtype names
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor's bytes lie in an open safetensors file (row-major, so rows are contiguous)."""

    file: BinaryIO
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    def read_rows(self, rows: slice) -> torch.Tensor:
        """Rows ``rows`` (along the first dimension) read from the file straight into a new tensor: plain reads,
        no memory map, so a process's resident memory grows by what it keeps, not by the pages it touched."""
        start, stop, step = rows.indices(self.shape[0] if self.shape else 1)
        if step != 1:
            raise ValueError(f"rows {rows} of a stored tensor: only contiguous ranges are read")
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        buffer = torch.empty(max(stop - start, 0) * row_bytes, dtype=torch.uint8)
        self.file.seek(self.offset + start * row_bytes)
        if self.file.readinto(buffer.numpy()) != buffer.numel():
            raise ValueError(f"{self.file.name}: the file ends inside a tensor (truncated?)")
        return buffer.view(self.dtype).view(max(stop - start, 0), *self.shape[1:]) if self.shape else \
            buffer.view(self.dtype).view(())


def safetensors_entries(file: BinaryIO) -> dict[str, StoredTensor]:
    """The tensors an open safetensors file holds, from its header: an 8-byte little-endian length, then that
    many bytes of JSON naming each tensor's dtype, shape and byte range after the header."""
    header_length = int.from_bytes(file.read(8), "little")
    header = json.loads(file.read(header_length))
    start = 8 + header_length
    return {key: StoredTensor(file, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]),
                              start + entry["data_offsets"][0])
            for key, entry in header.items() if key != "__metadata__"}


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face model directory: safetensors where there are any (one file or the
    files its index names), else PyTorch pickles.

    Raises:
        FileNotFoundError: the directory has neither.
    """
    for single, index in (SAFETENSORS_FILES, PICKLE_FILES):
        if (directory / index).is_file():
            names = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
            return [directory / name for name in names]
        if (directory / single).is_file():
            return [directory / single]
    raise FileNotFoundError(
        f"{directory} has no model.safetensors or pytorch_model.bin (nor their index) to read the backbone from"
    )

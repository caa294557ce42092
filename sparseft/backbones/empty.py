"""A backbone without its weights, and its checkpoint read one piece at a time.

Sharded loading (FSDP2, :mod:`sparseft.training.sharding`) builds the model with every parameter on
the meta device (a shape, no storage), shards it, and only then gives each process storage for its
own rows, read from the checkpoint: no process ever holds the whole backbone. Buffers stay real:
they are small, and the non-persistent ones (LLaMA's rotary frequencies, BERT's position ids) are
computed when the model is built and are in no checkpoint.

:class:`CheckpointTensors` reads a Hugging Face model directory's ``safetensors`` files (one file or
an index of several) by key and row range without reading the rest; ``pytorch_model.bin`` files are
memory-mapped, so slicing them reads only the pages sliced.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
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


def has_meta_parameters(model: nn.Module) -> bool:
    """Whether some parameter of ``model`` has no storage yet (built by :func:`empty_backbone`)."""
    return any(_local(parameter).is_meta for parameter in model.parameters())


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


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
        self._open: dict[Path, Any] = {}
        self._file_of: dict[str, Path] = {}

    def __enter__(self) -> CheckpointTensors:
        for path in self._files:
            if path.suffix == ".safetensors":
                handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
                keys = list(handle.keys())
            else:
                handle = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                keys = list(handle)
            self._open[path] = handle
            self._file_of.update(dict.fromkeys(keys, path))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._open.clear()

    def keys(self) -> set[str]:
        return set(self._file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        handle = self._open[self._file_of[key]]
        if isinstance(handle, dict):
            return tuple(handle[key].shape)
        return tuple(handle.get_slice(key).get_shape())

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        """``tensor[index]`` of the stored tensor ``key``, reading only that part where the format allows."""
        handle = self._open[self._file_of[key]]
        if isinstance(handle, dict):
            return handle[key][index].clone()
        return handle.get_slice(key)[index]

    def key_of(self, name: str, base_model_prefix: str) -> str | None:
        """The stored key of the model's parameter ``name`` (a parametrized ``weight`` by its plain name); a
        checkpoint of the bare base model (``BertModel`` for ``BertForSequenceClassification``) stores it
        without the ``<base_model_prefix>.`` the task model adds, and the reverse. None: not stored."""
        name = name.replace(PARAMETRIZED_SUFFIX, ".weight")
        prefix = f"{base_model_prefix}." if base_model_prefix else ""
        candidates = [name]
        if prefix:
            candidates.append(name[len(prefix):] if name.startswith(prefix) else prefix + name)
        return next((key for key in candidates if key in self._file_of), None)


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

"""sparseft's compressed weight file: a bitmask and the non-zero values per sparse tensor.

A sparse export stores every weight whose zeros make it cheaper that way as two safetensors
entries instead of one, in ``model.sparseft-bitmask.safetensors``:

* ``<name>.bitmask``: uint8 ``[ceil(numel / 8)]``, the tensor's non-zero pattern in row-major
  order, packed 8 entries per byte with the *first* entry in the *least significant* bit
  (``numpy.packbits(weight.ravel() != 0, bitorder="little")``); the last byte is zero-padded;
* ``<name>.values``: ``[nnz]`` in the tensor's own dtype, the non-zero entries in the same order.

Every other tensor is stored as it is, under its own name. The header metadata holds
``sparseft_format`` (``bitmask-v1``) and ``sparseft_shapes``, a JSON object mapping each
compressed tensor's name to its shape; names not in it are plain tensors. Exports written since
issue 25 also hold ``sparseft_digests``: for every state-dict entry its dtype and the SHA-256 of
its stored bytes (``.bitmask`` then ``.values`` for a compressed tensor), because a flipped or
moved mask bit that keeps the bit count, values re-stored in another dtype, or a name dropped
from ``sparseft_shapes`` (its weight then randomly initialised) all decode without any other
error. Both loaders check them and refuse, naming the tensor, a digest or dtype that differs, an
entry missing or left over; files without digests (older exports) still load, with the checks
that need none (bit count, mask length and dtype, values floating point, no leftover pair). A tensor is
compressed when that is smaller: ``ceil(numel/8) + nnz·itemsize < numel·itemsize``, i.e. more
than 1/(8·itemsize) of it is zero (3.2% in float32). At 2:4 this costs the same bytes as
compact values plus 2-bit positions (half the values and one bit per entry either way), and
fewer when a group holds fewer than two non-zeros, so 2:4 needs no layout of its own.

Since transformers cannot read this file, the export's ``config.json`` maps its auto classes
(``auto_map``) to a subclass built by :func:`compressed_class` in this file, copied beside the
weights as ``modeling_sparseft_compressed.py``; ``from_pretrained(path, trust_remote_code=True)``
then decodes the file into an ordinary state dict and builds the standard architecture from it.
A plain ``from_pretrained`` without remote code finds no ``model.safetensors`` and refuses.

This file must stay self-contained: it may import only torch, safetensors and transformers.
"""

import contextlib
import hashlib
import json
import math
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import GenerationConfig
from transformers.utils import cached_file

WEIGHTS_FILE = "model.sparseft-bitmask.safetensors"
FORMAT_KEY, FORMAT = "sparseft_format", "bitmask-v1"
SHAPES_KEY = "sparseft_shapes"
DIGESTS_KEY = "sparseft_digests"
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int64)


def pack_bitmask(keep: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor, flattened row-major, 8 per byte, first entry in the lowest bit."""
    flat = keep.reshape(-1).to(torch.int64)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(1).to(torch.uint8)


def unpack_bitmask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` bits of ``packed`` as a flat bool tensor (inverse of :func:`pack_bitmask`)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & 1).reshape(-1)[:numel].bool()


def bitmask_bytes(numel: int, nonzero: int, itemsize: int) -> int:
    """Bytes of one tensor in this layout: the packed mask and the non-zero values."""
    return math.ceil(numel / 8) + nonzero * itemsize


def encode_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of the compressed file for a dense ``state_dict``."""
    tensors, shapes, digests = {}, {}, {}
    for name, tensor in state_dict.items():
        if worth_compressing(tensor):
            keep = tensor != 0
            stored = [pack_bitmask(keep), tensor[keep].contiguous()]
            tensors[f"{name}.bitmask"], tensors[f"{name}.values"] = stored
            shapes[name] = list(tensor.shape)
        else:
            stored = [tensor.contiguous()]
            tensors[name] = stored[0]
        digests[name] = {"dtype": str(tensor.dtype).removeprefix("torch."), "sha256": digest(stored)}
    return tensors, {"format": "pt", FORMAT_KEY: FORMAT, SHAPES_KEY: json.dumps(shapes),
                     DIGESTS_KEY: json.dumps(digests)}


def worth_compressing(tensor: torch.Tensor) -> bool:
    """Whether a bitmask and the non-zero values take fewer bytes than ``tensor`` as it is."""
    if not tensor.is_floating_point():
        return False
    nonzero = int(tensor.count_nonzero())
    return bitmask_bytes(tensor.numel(), nonzero, tensor.element_size()) < tensor.numel() * tensor.element_size()


def digest(stored: list[torch.Tensor]) -> str:
    """SHA-256 (hex) of the bytes of ``stored``, in order: what one state-dict entry occupies in the file."""
    sha = hashlib.sha256()
    for tensor in stored:
        sha.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return sha.hexdigest()


def decode_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """The dense state dict of a compressed file's ``tensors`` and header ``metadata``."""
    if metadata.get(FORMAT_KEY) != FORMAT:
        raise ValueError(f"not a sparseft compressed weight file: {FORMAT_KEY} is {metadata.get(FORMAT_KEY)!r}, "
                         f"expected {FORMAT!r}")
    shapes = json.loads(metadata[SHAPES_KEY])
    digests = json.loads(metadata[DIGESTS_KEY]) if DIGESTS_KEY in metadata else None
    stored = {name: [tensor] for name, tensor in tensors.items() if name not in _pair_names(shapes)}
    leftover = sorted(name[: -len(".bitmask")] for name in stored
                      if name.endswith(".bitmask") and f"{name[: -len('.bitmask')]}.values" in stored)
    if leftover:
        raise ValueError(f"corrupt compressed tensor {leftover[0]}: its .bitmask and .values are in the file but "
                         f"the name is not in {SHAPES_KEY} (it would load randomly initialised)")
    state_dict = {}
    for name, shape in shapes.items():
        pair = [tensors.get(f"{name}.bitmask"), tensors.get(f"{name}.values")]
        keep = _checked_keep_mask(name, shape, *pair)
        stored[name] = pair
        dense = pair[1].new_zeros(keep.numel())
        dense[keep] = pair[1]
        state_dict[name] = dense.view(shape)
    if digests is not None:
        _check_digests(digests, stored)
    return {name: state_dict[name] if name in state_dict else parts[0] for name, parts in stored.items()}


def _pair_names(shapes: dict[str, Any]) -> set[str]:
    return {f"{name}.{part}" for name in shapes for part in ("bitmask", "values")}


def _checked_keep_mask(name: str, shape: list[int], bitmask: torch.Tensor | None,
                       values: torch.Tensor | None) -> torch.Tensor:
    """The unpacked keep-mask of a compressed entry, refusing one whose mask or values are missing, of
    the wrong dtype or of lengths that disagree."""
    numel = math.prod(shape)
    if bitmask is None or values is None:
        raise ValueError(f"corrupt compressed tensor {name}: its .bitmask or .values is missing")
    if bitmask.dtype != torch.uint8 or bitmask.numel() != math.ceil(numel / 8):
        raise ValueError(f"corrupt compressed tensor {name}: bitmask of {bitmask.numel()} {bitmask.dtype}, expected "
                         f"{math.ceil(numel / 8)} uint8 for shape {shape}")
    if not values.is_floating_point():
        raise ValueError(f"corrupt compressed tensor {name}: values are {values.dtype}, not floating point")
    keep = unpack_bitmask(bitmask, numel)
    if int(keep.sum()) != values.numel():
        raise ValueError(f"corrupt compressed tensor {name}: {int(keep.sum())} mask bits, {values.numel()} values")
    return keep


def _check_digests(digests: dict[str, dict[str, str]], stored: dict[str, list[torch.Tensor]]) -> None:
    """Refuse entries missing from or added to the file, and any whose dtype or bytes changed since export."""
    for name in sorted(set(digests) ^ set(stored)):
        where = "missing from the file" if name in digests else "not in the export's digests"
        raise ValueError(f"corrupt compressed tensor {name}: {where}")
    for name, parts in stored.items():
        dtype = str(parts[-1].dtype).removeprefix("torch.")
        if dtype != digests[name]["dtype"]:
            raise ValueError(f"corrupt compressed tensor {name}: stored as {dtype}, exported as "
                             f"{digests[name]['dtype']}")
        if digest(parts) != digests[name]["sha256"]:
            raise ValueError(f"corrupt compressed tensor {name}: its bytes differ from the export's SHA-256 "
                             "(the file was changed or damaged after export)")


def read_metadata(path: str) -> dict[str, str]:
    """The header metadata of a safetensors file."""
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        return json.loads(file.read(header_size)).get("__metadata__", {})


def compressed_load_kwargs(path: Any, model_class: type, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """``from_pretrained(None, **result)`` arguments that load the compressed export at ``path``:
    ``kwargs`` plus the config, the decoded ``state_dict`` and the generation config. None when
    ``path`` holds no compressed file (a dense re-save of a loaded model, say)."""
    hub = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
    weights = cached_file(path, WEIGHTS_FILE, _raise_exceptions_for_missing_entries=False, **hub)
    if weights is None:
        return None
    kwargs = dict(kwargs)
    kwargs["state_dict"] = decode_state_dict(load_file(weights), read_metadata(weights))
    if kwargs.get("config") is None:
        kwargs["config"] = model_class.config_class.from_pretrained(path, **hub)
    if "generation_config" not in kwargs and model_class.can_generate():
        with contextlib.suppress(OSError):  # no generation_config.json: defaults apply, as in a plain load
            kwargs["generation_config"] = GenerationConfig.from_pretrained(path, **hub)
    return kwargs


def compressed_class(base: type) -> type:
    """A subclass of the model class ``base`` whose ``from_pretrained`` reads the compressed file."""

    def from_pretrained(cls: type, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        load = base.from_pretrained.__func__
        compressed = compressed_load_kwargs(pretrained_model_name_or_path, cls, kwargs)
        if compressed is None:
            return load(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        return load(cls, None, *model_args, **compressed)

    name = f"Compressed{base.__name__}"
    namespace = {"from_pretrained": classmethod(from_pretrained), "__module__": __name__, "__qualname__": name}
    return type(name, (base,), namespace)

"""S²FT updates as small structured adapters: original indices, the update and the original values.

An adapter holds, per layer, the axis (``columns`` / ``rows`` of the ``[out, in]`` view), the
indices in the *base model's* order (nothing is permuted), ``Δ`` and the base values ``W0``
at those indices. Applying writes ``W0[slice] + Δ``, the very sum the merged export computes,
so an applied adapter equals the merged model bit for bit. Removing writes the stored ``W0``
back: ``(W0 + Δ) − Δ`` is not ``W0`` in floating point in general, a stored copy is.

Adapters trained on disjoint selections compose (S²FT's "fusion"): their slices never touch
the same weight. An overlapping one is refused, both by the model's record of what is applied
and by checking that the weights under the slice still hold the adapter's base values.

Files are safetensors: ``<layer>.index``, ``<layer>.delta``, ``<layer>.base`` and the axes in
the metadata. PEFT has no S²FT, so this format is sparseft's own; LoRA-type updates are written in
PEFT's format instead (:mod:`sparseft.export.peft`), and :func:`prepare_adapter` picks the one a
model's update has.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparseft.export.peft import extract_peft_adapter, save_peft_adapter
from sparseft.export.pretrained import check_export_target, make_readable_, staged_directory
from sparseft.sparse.layers import as_out_in, is_transposed
from sparseft.sparse.slices import sliced_layers

Adapter = dict[str, dict[str, torch.Tensor | str]]
_APPLIED = "_sparseft_adapters"  # model attribute: layer name -> list of (axis, index) applied


def extract_adapter(model: nn.Module) -> Adapter:
    """The current slice updates of ``model`` (which holds :class:`SliceLinear` layers)."""
    adapter: Adapter = {}
    for name, module in sliced_layers(model):
        with torch.no_grad():
            base = _take(module.out_in(), module.axis, module.index)
            adapter[name] = {"axis": module.axis, "index": module.index.detach().cpu().clone(),
                             "delta": module.delta.detach().cpu().clone(), "base": base.cpu().clone()}
    if not adapter:
        raise ValueError("this model has no slice updates (SliceLinear layers) to extract")
    return adapter


def prepare_adapter(model: nn.Module, path: str | Path, output_dir: str | Path, overwrite: bool = False,
                    keep: Iterable[str | Path] = ()) -> Callable[[], Path]:
    """Check ``path`` for ``model``'s kind of adapter and take the update before the export merges it;
    returns what writes it (call :func:`check_adapter_target` before loading the model).

    S²FT's slice layers become this module's adapter file; low-rank updates (``lora``, DSEE unpruned)
    a PEFT adapter directory, written whole or not at all (``keep``: paths it must not replace).
    """
    if sliced_layers(model):
        if Path(path).expanduser().is_dir():
            raise IsADirectoryError(f"--adapter_path {path} is a directory: an S²FT adapter is one file; name a "
                                    f"file, e.g. {Path(path) / 'a.safetensors'}")
        adapter = extract_adapter(model)
        return lambda: save_adapter(adapter, path)
    target = check_export_target(path, overwrite, keep=[*keep, output_dir], option="--adapter_path")
    tensors, config = extract_peft_adapter(model)

    def write() -> Path:
        with staged_directory(target) as staging:
            save_peft_adapter(tensors, config, staging)
            make_readable_(staging)
        return target

    return write


def check_adapter_target(path: str | Path, output_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse an adapter path that cannot be written, before the export reads or writes anything: what
    it names must not exist (unless ``overwrite``; an empty folder is fine), and its folder must exist
    (or be ``output_dir``, which the export creates). Checked after the model directory was written, a
    missing folder left a complete export behind and a failed command. Whether it must be a file (S²FT)
    or a directory (PEFT) depends on the model's update: :func:`prepare_adapter` checks that.

    Raises:
        FileExistsError: the path exists and ``overwrite`` is not set.
        NotADirectoryError: its folder is missing or is a file.
    """
    path = Path(path).expanduser()
    folder = path.resolve().parent
    if (path.is_file() or (path.is_dir() and any(path.iterdir()))) and not overwrite:
        raise FileExistsError(f"--adapter_path {path} exists: name a new one, or pass --overwrite to replace it")
    if not folder.is_dir() and folder != Path(output_dir).expanduser().resolve():
        raise NotADirectoryError(f"--adapter_path {path}: its folder {folder} does not exist; create it, or name a "
                                 "path in an existing folder or in --output_dir")


def save_adapter(adapter: Adapter, path: str | Path) -> Path:
    """Write ``adapter`` as one safetensors file, readable as the user's umask allows (like the export
    beside it; ``save_file`` alone leaves it 0600)."""
    tensors = {f"{name}.{key}": part[key].contiguous() for name, part in adapter.items()
               for key in ("index", "delta", "base")}
    axes = {name: part["axis"] for name, part in adapter.items()}
    save_file(tensors, str(path), metadata={"format": "sparseft-s2ft", "axes": json.dumps(axes)})
    make_readable_(Path(path))
    return Path(path)


def load_adapter(path: str | Path) -> Adapter:
    """Read an adapter written by :func:`save_adapter`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    if metadata.get("format") != "sparseft-s2ft":
        raise ValueError(f"{path} is not a sparseft S²FT adapter")
    tensors = load_file(str(path))
    return {name: {"axis": axis, **{key: tensors[f"{name}.{key}"] for key in ("index", "delta", "base")}}
            for name, axis in json.loads(metadata["axes"]).items()}


def apply_adapter_(model: nn.Module, adapter: Adapter) -> None:
    """Write ``W0[slice] + Δ`` into the plain weights of ``model``, in place.

    Raises:
        ValueError: a slice overlaps one already applied, or the weights there are not the
            adapter's base values (another base model, or an overlapping adapter).
    """
    applied = model.__dict__.setdefault(_APPLIED, {})
    for name, part in adapter.items():
        _check_disjoint(name, part, applied.get(name, []))
        current = _take(_weight(model, name), part["axis"], part["index"])
        if not torch.equal(current.cpu(), part["base"]):
            raise ValueError(f"layer {name!r}: the weights under this adapter's slice are not its base values "
                             "(a different base model, or an overlapping adapter is applied)")
    for name, part in adapter.items():
        base = part["base"].to(_weight(model, name))
        _put_(_weight(model, name), part["axis"], part["index"], base + part["delta"].to(base))
        applied.setdefault(name, []).append((part["axis"], part["index"].clone()))


def remove_adapter_(model: nn.Module, adapter: Adapter) -> None:
    """Write the adapter's base values back, in place: the model is bit-exactly as before applying."""
    applied = model.__dict__.get(_APPLIED, {})
    for name, part in adapter.items():
        base = part["base"].to(_weight(model, name))
        current = _take(_weight(model, name), part["axis"], part["index"])
        if not torch.equal(current, base + part["delta"].to(base)):
            raise ValueError(f"layer {name!r}: this adapter is not applied (its slice holds other values)")
    for name, part in adapter.items():
        _put_(_weight(model, name), part["axis"], part["index"], part["base"].to(_weight(model, name)))
        records = applied.get(name, [])
        applied[name] = [(a, i) for a, i in records if not (a == part["axis"] and torch.equal(i, part["index"]))]


def _check_disjoint(name: str, part: dict, records: list[tuple[str, torch.Tensor]]) -> None:
    for axis, index in records:
        if axis != part["axis"] or bool(torch.isin(part["index"], index).any()):
            raise ValueError(f"layer {name!r}: this adapter's {part['axis']} overlap an applied adapter's "
                             f"{axis}; only adapters on disjoint slices can be applied together")


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    module = model.get_submodule(name)
    return as_out_in(module.weight.data, is_transposed(module))


def _take(weight: torch.Tensor, axis: str, index: torch.Tensor) -> torch.Tensor:
    index = index.to(weight.device)
    return weight[:, index] if axis == "columns" else weight[index]


def _put_(weight: torch.Tensor, axis: str, index: torch.Tensor, values: torch.Tensor) -> None:
    index = index.to(weight.device)
    with torch.no_grad():
        if axis == "columns":
            weight[:, index] = values
        else:
            weight[index] = values

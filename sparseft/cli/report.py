"""``sparseft report <checkpoint or export directory>``: how sparse each layer is, as a table and PNGs.

The table has one row per target layer (every linear layer when the source has no sparsity
strategy): name, ``[out, in]`` shape, weights kept (non-zero), sparsity, and the structure the
zeros measure, if any (``2:4``, all-zero rows or columns, i.e. pruned output units or input
features), then the totals. The figures are the ones TensorBoard shows during training
(:mod:`sparseft.training.plots`): ``sparsity.png``, a bar per layer, and ``mask-<layer>.png`` heat-maps of
the first, middle and last target.

Everything is measured from the weights themselves: from a checkpoint, the effective weights
``M ⊙ (W0 + ΔW)`` of the rebuilt model; from an export, the saved tensors (which layers were
targets comes from its report.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser
from safetensors import safe_open
from safetensors.torch import load_file

from sparseft.export.compressed_modeling import WEIGHTS_FILE as COMPRESSED_WEIGHTS_FILE
from sparseft.export.compressed_modeling import decode_state_dict, read_metadata
from sparseft.export.pretrained import REPORT_FILE
from sparseft.sparse.layers import find_linear_layers
from sparseft.sparse.parametrize import updates_into_weights_
from sparseft.sparse.slices import restore_linear_
from sparseft.training.checkpoint_checks import is_sharded_checkpoint
from sparseft.training.module import SparseFTModule
from sparseft.training.plots import heatmap_layers, mask_heatmap, save_png, short_names, sparsity_bar_chart
from sparseft.training.run_summary import read_training_summary

NM_GROUPS = (4, 8)


@dataclass(frozen=True)
class LayerWeights:
    """A layer's name and its effective weight as ``[out, in]``."""

    name: str
    weight: torch.Tensor

    @property
    def kept(self) -> int:
        return int(self.weight.count_nonzero())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / max(self.weight.numel(), 1)


def measured_pattern(weight: torch.Tensor) -> str:
    """The structure of a weight's zeros: ``N:M`` when every group of ``M`` consecutive inputs of an
    output keeps the same ``N``, and how many output rows / input columns are entirely zero."""
    zero = weight == 0
    parts = []
    for group in NM_GROUPS:
        if zero.any() and weight.shape[1] % group == 0:
            counts = (~zero).reshape(weight.shape[0], -1, group).sum(-1)
            if int(counts.max()) < group and bool((counts == counts.max()).all()):
                parts.append(f"{int(counts.max())}:{group}")
                break
    rows, columns = int(zero.all(1).sum()), int(zero.all(0).sum())
    if rows:
        parts.append(f"{rows}/{weight.shape[0]} rows zero")
    if columns:
        parts.append(f"{columns}/{weight.shape[1]} columns zero")
    return ", ".join(parts) or "-"


def checkpoint_layers(path: Path) -> tuple[list[LayerWeights], dict[str, Any]]:
    """The target layers of a ``sparseft fit`` checkpoint (every linear layer without a strategy) with their
    effective weights: updates on the input side (LoRA) moved into the weights, S²FT's slice layers merged
    back into linear layers first, as export does."""
    module, strategy = SparseFTModule.from_sparseft_checkpoint(path)
    targets = {s.name for s in updates_into_weights_(module.model)} | set(restore_linear_(module.model))
    every_linear = find_linear_layers(module.model)
    layers = [layer for layer in every_linear if layer.name in targets] or every_linear
    with torch.no_grad():
        weights = [LayerWeights(layer.name, layer.weight().detach().clone()) for layer in layers]
    return weights, {**read_training_summary(path), "strategy": strategy.describe() if strategy else None}


def export_layers(directory: Path) -> tuple[list[LayerWeights], dict[str, Any]]:
    """The target layers of a ``sparseft export`` directory, read from its safetensors files."""
    report_path = directory / REPORT_FILE
    if not report_path.is_file():
        raise ValueError(f"{directory} has no {REPORT_FILE}: give a directory written by sparseft export, or a .ckpt")
    report = json.loads(report_path.read_text())
    entries = [layer for layer in report["layers"] if layer.get("target", True)]
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        if file.name == COMPRESSED_WEIGHTS_FILE:  # --format compressed: bitmask + non-zero values
            tensors.update(decode_state_dict(load_file(file), read_metadata(str(file))))
            continue
        with safe_open(str(file), framework="pt") as handle:
            wanted = {f"{layer['name']}.weight" for layer in entries} & set(handle.keys())
            tensors.update({key: handle.get_tensor(key) for key in wanted})
    weights = []
    for layer in entries:
        tensor = tensors.get(f"{layer['name']}.weight")
        if tensor is None:
            raise ValueError(f"{directory}: no weight for layer {layer['name']!r} in its *.safetensors files")
        out_in = tuple(layer["shape"])
        transposed = tuple(tensor.shape) == out_in[::-1] and tuple(tensor.shape) != out_in  # GPT-2's Conv1D
        weights.append(LayerWeights(layer["name"], tensor.T if transposed else tensor))
    return weights, report


def format_table(layers: list[LayerWeights]) -> str:
    """The per-layer table with a totals line."""
    width = max([len(layer.name) for layer in layers] + [5])
    lines = [f"{'layer':<{width}}  {'[out, in]':>13}  {'kept':>11}  {'sparsity':>8}  pattern"]
    for layer in layers:
        shape = f"[{layer.weight.shape[0]}, {layer.weight.shape[1]}]"
        lines.append(f"{layer.name:<{width}}  {shape:>13}  {layer.kept:>11,}  {layer.sparsity:>8.2%}  "
                     f"{measured_pattern(layer.weight)}")
    total = sum(layer.weight.numel() for layer in layers)
    kept = sum(layer.kept for layer in layers)
    lines.append(f"{'total':<{width}}  {total:>13,}  {kept:>11,}  {1 - kept / max(total, 1):>8.2%}  "
                 f"({len(layers)} layers)")
    return "\n".join(lines)


def write_figures(layers: list[LayerWeights], output_dir: Path, title: str) -> list[Path]:
    """``sparsity.png`` and first / middle / last ``mask-<layer>.png`` in ``output_dir`` (created)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    names = [layer.name for layer in layers]
    figures = [save_png(sparsity_bar_chart(names, [layer.sparsity for layer in layers], title),
                        output_dir / "sparsity.png")]
    labels = short_names(names)
    for index in heatmap_layers(len(layers)):
        image = mask_heatmap(layers[index].weight != 0, names[index]).image
        figures.append(save_png(image, output_dir / f"mask-{labels[index]}.png"))
    return figures


def report_output_dir(source: Path, output_dir: str | None, overwrite: bool) -> Path:
    """``output_dir`` or ``<source>-report`` beside the source; refuse a non-empty one unless ``overwrite``."""
    checkpoint = source.is_file() or is_sharded_checkpoint(source)
    default = source.with_name(f"{source.stem if checkpoint else source.name}-report")
    target = Path(output_dir) if output_dir else default
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ValueError(f"{target} exists and is not empty: choose another --output_dir, or pass --overwrite true "
                         "to replace the figures in it")
    return target


def report_command(argv: list[str]) -> dict[str, Any]:
    """``sparseft report``: print the per-layer sparsity of a checkpoint or export, write its figures."""
    parser = ArgumentParser(prog="sparseft report", description=report_command.__doc__)
    parser.add_argument("source", type=str, help="a checkpoint written by sparseft fit (a file, or a directory "
                        "under fsdp2), or a sparseft export directory")
    parser.add_argument("--output_dir", type=str, default=None,
                        help="where to write the PNG figures (default: <source>-report beside the source)")
    parser.add_argument("--overwrite", type=bool, default=False, help="write into a non-empty --output_dir")
    args = parser.parse_args(argv)
    source = Path(args.source)
    if not source.exists():
        raise ValueError(f"{source} does not exist: give a .ckpt written by sparseft fit or an export directory")
    output_dir = report_output_dir(source, args.output_dir, args.overwrite)
    exported = source.is_dir() and not is_sharded_checkpoint(source)
    layers, summary = export_layers(source) if exported else checkpoint_layers(source)
    strategy = (summary.get("strategy") or {}).get("name", "none")
    dev = summary.get("dev_metric")
    header = f"{source}: strategy {strategy}" + (f"; {dev['name']} {dev['value']:.4f} at step {dev['step']}"
                                                 if dev else "")
    table = format_table(layers)
    figures = write_figures(layers, output_dir, f"measured sparsity per layer: {source.name}")
    print(f"{header}\n{table}\nfigures: " + ", ".join(str(path) for path in figures))
    return {"table": table, "figures": figures, "layers": layers, "summary": summary}

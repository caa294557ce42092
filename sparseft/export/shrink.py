"""Physically remove pruned attention heads and FFN channels from a merged (plain) model.

A unit is removed when all its weights are exact zeros: for a head (a key/value group under
GQA, see :mod:`sparseft.sparse.structured`) its rows of q, k and v and its columns of the
attention output; for an FFN channel its row of every ``ffn_in`` and its column of
``ffn_out``. Zero output columns alone make the unit contribute nothing, so removing it (and
the biases of its rows) leaves every logit unchanged.

The config then describes the smaller model where transformers 5 can express it: a uniform
FFN width (``intermediate_size`` / GPT-2's ``n_inner``) and, for architectures whose config
has ``head_dim`` (LLaMA-style), a uniform number of heads and key/value heads. What the config
cannot express (BERT, RoBERTa and GPT-2 tie the attention width to ``hidden_size``; different
counts in different blocks) is written into ``config.sparseft_resized`` with
``modeling_sparseft.py`` (:mod:`sparseft.export.resized_modeling`) beside the weights.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from sparseft.export import resized_modeling
from sparseft.export.resized_modeling import ATTENTION_ATTRIBUTES, RESIZED_KEY, set_linear_shape_
from sparseft.sparse.layers import LinearLayer, find_linear_layers
from sparseft.sparse.structured import Block, HeadLayout, group_blocks, head_rows, row_owners

REMOTE_CODE_FILE = "modeling_sparseft.py"
AUTO_CLASSES = ("AutoModel", "AutoModelForSequenceClassification", "AutoModelForCausalLM",
                "AutoModelForQuestionAnswering", "AutoModelForTokenClassification", "AutoModelForMaskedLM")


def kept_units(block: Block, layout: HeadLayout) -> torch.Tensor | None:
    """Units (heads / KV groups) of ``block`` with any non-zero weight; None if roles are missing."""
    layers = block.attention()
    if block.get("o") is None or not ({"q", "k", "v"} <= block.roles.keys() or block.get("qkv")):
        return None
    owners = row_owners(layout)
    keep = torch.zeros(layout.units, dtype=torch.bool)
    for layer in layers:
        weight = layer.weight().detach()
        used = weight.ne(0).any(0) if layer.role == "o" else weight.ne(0).any(1)
        keep[owners[layer.role][used.cpu()]] = True
    return keep


def kept_channels(block: Block) -> torch.Tensor | None:
    """FFN channels of ``block`` with any non-zero weight; None if the block has no FFN roles."""
    ffn_out = block.get("ffn_out")
    if ffn_out is None or not block.ffn_in:
        return None
    keep = ffn_out.weight().detach().ne(0).any(0)
    for layer in block.ffn_in:
        keep = keep | layer.weight().detach().ne(0).any(1)
    return keep.cpu()


def slice_linear_(layer: LinearLayer, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> None:
    """Keep only ``rows`` (and their biases) and ``columns`` (bool masks) of a plain linear layer."""
    module = layer.module
    weight = layer.weight().detach()
    weight = weight[rows.to(weight.device)] if rows is not None else weight
    weight = weight[:, columns.to(weight.device)] if columns is not None else weight
    stored = weight.t() if layer.transposed else weight
    module.weight = nn.Parameter(stored.contiguous().clone(), requires_grad=module.weight.requires_grad)
    bias = getattr(module, "bias", None)
    if bias is not None and rows is not None:
        module.bias = nn.Parameter(bias.detach()[rows.to(bias.device)].clone(), requires_grad=bias.requires_grad)
    set_linear_shape_(module, *weight.shape)


def remove_units_(model: nn.Module, block: Block, keep: torch.Tensor, layout: HeadLayout) -> None:
    """Remove the dropped heads (KV groups) of one block and update its attention module's sizes."""
    rows = head_rows(keep, layout)
    for layer in block.attention():
        if layer.role == "o":
            slice_linear_(layer, columns=rows["o"])
        else:
            slice_linear_(layer, rows=rows[layer.role])
    kept = int(keep.sum())
    heads = kept * (layout.num_heads // layout.num_kv_heads)
    sizes = {"num_heads": heads, "num_attention_heads": heads, "num_key_value_heads": kept,
             "all_head_size": heads * layout.head_dim, "split_size": heads * layout.head_dim}
    query = block.get("q") or block.get("qkv")
    attention = model.get_submodule(query.name.rpartition(".")[0])
    for name in ATTENTION_ATTRIBUTES:
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, sizes[name])


def remove_channels_(block: Block, keep: torch.Tensor) -> None:
    """Remove the dropped FFN channels of one block."""
    for layer in block.ffn_in:
        slice_linear_(layer, rows=keep)
    slice_linear_(block.roles["ffn_out"], columns=keep)


@torch.no_grad()
def shrink_(model: nn.Module) -> dict[str, Any]:
    """Remove every all-zero head and FFN channel of a plain model, in place; update its config.

    Returns what was removed (``heads``: block index -> removed unit indices; ``ffn_channels``:
    block index -> number removed) and ``resized``, the part of the new shape the config cannot
    express (empty when a plain ``from_pretrained`` rebuilds the model).
    """
    blocks = group_blocks(find_linear_layers(model))
    layout = HeadLayout.of(model) if any(block.attention() for block in blocks) else None
    removed: dict[str, Any] = {"heads": {}, "ffn_channels": {}}
    for block in blocks:
        keep = kept_units(block, layout) if layout is not None else None
        if keep is not None and 0 < int(keep.sum()) < keep.numel():
            removed["heads"][block.index] = (~keep).nonzero().flatten().tolist()
            remove_units_(model, block, keep, layout)
        channels = kept_channels(block)
        if channels is not None and 0 < int(channels.sum()) < channels.numel():
            removed["ffn_channels"][block.index] = int((~channels).sum())
            remove_channels_(block, channels)
    if removed["heads"] or removed["ffn_channels"]:
        _describe_in_config_(model, layout)
    removed["resized"] = resize_spec(model) if removed["heads"] or removed["ffn_channels"] else {}
    return removed


def _describe_in_config_(model: nn.Module, layout: HeadLayout) -> None:
    """Write uniform new sizes into the config where its fields can express them."""
    config = model.config
    blocks = group_blocks(find_linear_layers(model))
    widths = {block.get("ffn_out").shape[1] for block in blocks if block.get("ffn_out") is not None}
    if len(widths) == 1:
        key = next((key for key in ("intermediate_size", "n_inner") if hasattr(config, key)), None)
        if key is not None:
            setattr(config, key, widths.pop())
    queries = {(block.get("q") or block.get("qkv")).shape[0] for block in blocks if block.get("q") or block.get("qkv")}
    if len(queries) == 1 and getattr(config, "head_dim", None) and hasattr(config, "num_key_value_heads"):
        units = queries.pop() // layout.query_rows
        config.head_dim = layout.head_dim
        config.num_attention_heads = units * (layout.num_heads // layout.num_kv_heads)
        config.num_key_value_heads = units


def resize_spec(model: nn.Module) -> dict[str, Any]:
    """Linear shapes and attention sizes of ``model`` that its config alone would not rebuild."""
    with torch.device("meta"):
        reference = type(model)(copy.deepcopy(model.config))
    built = dict(reference.named_modules())
    linears = {layer.name: list(layer.shape) for layer in find_linear_layers(model)
               if tuple(layer.module.weight.shape) != tuple(built[layer.name].weight.shape)}
    attributes = {}
    for name, module in model.named_modules():
        changed = {key: getattr(module, key) for key in ATTENTION_ATTRIBUTES
                   if isinstance(getattr(module, key, None), int) and getattr(module, key) != getattr(built[name], key)}
        if changed:
            attributes[name] = changed
    return {"linears": linears, "attributes": attributes} if linears or attributes else {}


def add_remote_code_(model: nn.Module, output_dir: str | Path, spec: dict[str, Any]) -> None:
    """Write ``modeling_sparseft.py`` to ``output_dir`` and point the config's ``auto_map`` at it."""
    write_remote_code_(model, Path(output_dir, REMOTE_CODE_FILE), resized_modeling, "Resized", "resized_class")
    setattr(model.config, RESIZED_KEY, spec)


def remote_classes(model: nn.Module) -> list[type]:
    """The classes an export's remote code subclasses: the model's own and its base model's, which
    ``AutoModel`` and the ``feature-extraction`` pipeline build (a plain export loads as both)."""
    return list(dict.fromkeys([type(model), type(model.base_model)]))


def write_remote_code_(model: nn.Module, path: Path, module: Any, prefix: str, factory: str) -> None:
    """Copy ``module`` (self-contained source) to ``path``, define ``<prefix><Class> = factory(<Class>)``
    for each of :func:`remote_classes`, and map every auto class that builds one of them to its subclass
    in the config's ``auto_map`` (loaded with ``trust_remote_code=True``)."""
    names = [cls.__name__ for cls in remote_classes(model)]
    source = inspect.getsource(module)
    source += f"\n\nfrom transformers import {', '.join(names)}  # noqa: E402\n\n"
    source += "".join(f"{prefix}{name} = {factory}({name})\n" for name in names)
    path.write_text(source)
    built = {auto: _auto_model_class(auto, model.config) for auto in AUTO_CLASSES}
    model.config.auto_map = {auto: f"{path.stem}.{prefix}{cls.__name__}" for auto, cls in built.items()
                             if cls is not None and cls.__name__ in names}


def _auto_model_class(auto: str, config: Any) -> type | None:
    try:
        return getattr(transformers, auto)._model_mapping[type(config)]
    except KeyError:
        return None

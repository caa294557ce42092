"""LoRA-type updates as a PEFT adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``.

``PeftModel.from_pretrained(base, directory)`` loads it onto the base model it was trained from;
nothing of sparseft is needed there, and PEFT is not needed here (the files are written directly,
in PEFT's format). What it holds, per target layer ``<name>`` of the model:

* ``base_model.model.<name>.lora_A.weight = A`` (``[r, in]``) and ``…lora_B.weight = B`` (``[out, r]``),
  with ``lora_alpha / r`` the update's scale, so PEFT computes ``y = x·W0ᵀ + b + (α/r)·(x·Aᵀ)·Bᵀ``,
  the very operations of sparseft's forward on the input side;
* ``base_model.model.<param>`` for every trained parameter of the task head, listed in
  ``modules_to_save`` (PEFT's way of shipping a trained classifier).

Exportable: the ``lora`` strategy, and DSEE while nothing is pruned and without its sparse part S2
(``num_sparse: 0``). A fused GPT-2 ``c_attn`` with one pair per q / k / v block (DSEE) becomes one
pair of rank 3r: ``A`` the blocks' ``A`` stacked, ``B`` block-diagonal, ``lora_alpha`` 3α (the same
α/r), which gives exactly the same ``B·A``. Anything PEFT's LoRA cannot express is refused, naming
the layer: a mask that prunes, a sparse residual, a trained ``W0`` or any other trained tensor.
PEFT has no S²FT: S²FT's slices keep their own adapter format (:mod:`sparseft.export.adapters`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sparseft.sparse.deltas import LowRank, RowBlocks, ScaledSum
from sparseft.sparse.freezing import HEAD_PATTERN
from sparseft.sparse.parametrize import SparseLayer, sparse_layers

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraFactors:
    """``ΔW = scale·B·A`` of one layer, as PEFT stores it."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def lora_factors(delta: nn.Module, layer: str) -> LoraFactors:
    """``delta`` as ``scale·B·A``: a :class:`LowRank`, a :class:`ScaledSum` of one, or the
    :class:`RowBlocks` of a fused layer (A stacked, B block-diagonal).

    Raises:
        ValueError: ``delta`` has a part that is not low-rank (DSEE's S2), naming ``layer``.
    """
    if isinstance(delta, LowRank):
        return LoraFactors(delta.right.detach(), delta.left.detach(), delta.scale)
    if isinstance(delta, ScaledSum) and len(delta.parts) == 1:
        inner = lora_factors(delta.parts[0], layer)
        return LoraFactors(inner.a, inner.b, inner.scale * delta.scale)
    if isinstance(delta, RowBlocks):
        blocks = [lora_factors(block, layer) for block in delta.blocks]
        if len({block.scale for block in blocks}) != 1:
            raise ValueError(f"layer {layer!r}: its blocks' updates have different scales; PEFT has one per layer")
        return LoraFactors(torch.cat([block.a for block in blocks]), torch.block_diag(*[block.b for block in blocks]),
                           blocks[0].scale)
    raise ValueError(f"layer {layer!r}: its update {type(delta).__name__} is not low-rank (DSEE's sparse S2: train "
                     "with num_sparse: 0), so PEFT's LoRA cannot hold it; use the merged export")


def extract_peft_adapter(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and ``adapter_config.json`` of ``model``'s LoRA-type updates and trained head.

    Raises:
        ValueError: the model has no low-rank update, or trains what PEFT's LoRA cannot hold (named).
    """
    layers = [layer for layer in sparse_layers(model) if _check_exportable(layer)]
    if not layers:
        raise ValueError("this model has no low-rank updates to write as a PEFT adapter")
    factors = {layer.name: lora_factors(layer.param.delta, layer.name) for layer in layers}
    tensors = {}
    for name, pair in factors.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = pair.a.cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = pair.b.cpu().contiguous()
    heads = _trained_heads(model, {id(p) for layer in layers for p in layer.param.delta.parameters()})
    tensors.update({f"{PREFIX}{key}": value.detach().cpu().contiguous() for key, value in heads.items()})
    transposed = {layer.layer.transposed for layer in layers}
    if len(transposed) > 1:
        raise ValueError("the targets mix nn.Linear and Conv1D layers: PEFT's fan_in_fan_out is one setting")
    config = _config(factors, transposed.pop(), _dropout(layers), sorted({_head_module(k) for k in heads}))
    config["base_model_name_or_path"] = getattr(getattr(model, "config", None), "name_or_path", None) or None
    return tensors, config


def _check_exportable(layer: SparseLayer) -> bool:
    """Whether ``layer`` has an update to export; refuses a layer PEFT cannot reproduce."""
    if layer.param.mask is not None and not bool(layer.param.mask.all()):
        raise ValueError(f"layer {layer.name!r} is pruned (its mask applies to W0 + ΔW): a PEFT adapter has no "
                         "mask; use the merged export")
    if layer.stored_weight.requires_grad:
        raise ValueError(f"layer {layer.name!r}: its W0 is trained, which a PEFT LoRA adapter does not hold")
    return layer.param.delta is not None


def _trained_heads(model: nn.Module, factors: set[int]) -> dict[str, torch.Tensor]:
    """Trained parameters other than the factors, by name: the task head's only, or refused."""
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in factors}
    others = [name for name in trained if not HEAD_PATTERN.search(name)]
    if others:
        raise ValueError(f"{others[0]} is trained, and is neither a LoRA factor nor the task head: a PEFT LoRA "
                         "adapter cannot hold it")
    return trained


def _head_module(name: str) -> str:
    """``classifier.dense.weight`` -> ``classifier``: the head module PEFT's ``modules_to_save`` names."""
    return name[: HEAD_PATTERN.search(name).end(2)]


def _dropout(layers: list[SparseLayer]) -> float:
    """The dropout on the factors' input, one rate for all layers (PEFT's ``lora_dropout``)."""
    rates = {next((float(m.p) for m in layer.param.delta.modules() if isinstance(m, nn.Dropout)), 0.0)
             for layer in layers}
    if len(rates) > 1:
        raise ValueError(f"the layers' updates use different dropout rates {sorted(rates)}; PEFT's is one setting")
    return rates.pop()


def _config(factors: dict[str, LoraFactors], fan_in_fan_out: bool, dropout: float,
            modules_to_save: list[str]) -> dict[str, Any]:
    """PEFT's ``LoraConfig`` fields: the most common rank and α as ``r`` / ``lora_alpha``, other layers in
    ``rank_pattern`` / ``alpha_pattern`` (keyed by their full names, as ``target_modules``)."""
    ranks = {name: pair.rank for name, pair in factors.items()}
    alphas = {name: pair.scale * pair.rank for name, pair in factors.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": list(factors),
        "rank_pattern": {name: r for name, r in ranks.items() if r != rank},
        "alpha_pattern": {name: a for name, a in alphas.items() if a != alpha},
        "fan_in_fan_out": fan_in_fan_out, "bias": "none", "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": modules_to_save or None,
    }


def save_peft_adapter(tensors: dict[str, torch.Tensor], config: dict[str, Any], directory: str | Path) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory`` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory

"""A uniform view of the linear layers of a transformer, and what role each one plays.

Hugging Face models use two linear types: ``nn.Linear`` (weight ``[out, in]``) and GPT-2's
``Conv1D`` (weight ``[in, out]``). Every mask, score and update in sparseft is written for
the ``[out, in]`` view, so sparseft code never has to ask which type it holds.

Role presets name each layer's job (``q``, ``k``, ``v``, ``o``, ``ffn_in``, ``ffn_out``, or
``qkv`` for a fused projection) for BERT, RoBERTa, DistilBERT, GPT-2 and LLaMA-style models,
so configs can say ``targets: [q, v]`` instead of a model-specific regular expression.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

ROLES = ("q", "k", "v", "qkv", "o", "ffn_in", "ffn_out")

# model_type -> role -> regular expression on the module name (searched, anchored at the end)
ROLE_PRESETS: dict[str, dict[str, str]] = {
    "bert": {
        "q": r"attention\.self\.query$",
        "k": r"attention\.self\.key$",
        "v": r"attention\.self\.value$",
        "o": r"attention\.output\.dense$",
        "ffn_in": r"intermediate\.dense$",
        "ffn_out": r"layer\.\d+\.output\.dense$",
    },
    "distilbert": {
        "q": r"attention\.q_lin$",
        "k": r"attention\.k_lin$",
        "v": r"attention\.v_lin$",
        "o": r"attention\.out_lin$",
        "ffn_in": r"ffn\.lin1$",
        "ffn_out": r"ffn\.lin2$",
    },
    "gpt2": {
        "qkv": r"attn\.c_attn$",
        "o": r"attn\.c_proj$",
        "ffn_in": r"mlp\.c_fc$",
        "ffn_out": r"mlp\.c_proj$",
    },
    "llama": {
        "q": r"self_attn\.q_proj$",
        "k": r"self_attn\.k_proj$",
        "v": r"self_attn\.v_proj$",
        "o": r"self_attn\.o_proj$",
        "ffn_in": r"mlp\.(gate_proj|up_proj)$",
        "ffn_out": r"mlp\.down_proj$",
    },
}
# architectures that share a preset
for _alias, _base in {"roberta": "bert", "xlm-roberta": "bert", "electra": "bert", "mistral": "llama",
                      "qwen2": "llama", "gemma": "llama"}.items():
    ROLE_PRESETS[_alias] = ROLE_PRESETS[_base]

_LAYER_INDEX = re.compile(r"\.(?:layer|layers|h)\.(\d+)\.")


def is_linear(module: nn.Module) -> bool:
    """True for the layer types sparseft can sparsify: ``nn.Linear`` and HF ``Conv1D``."""
    return isinstance(module, (nn.Linear, Conv1D))


def is_transposed(module: nn.Module) -> bool:
    """True when the stored weight is ``[in, out]`` (HF ``Conv1D``)."""
    return isinstance(module, Conv1D)


def as_out_in(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The ``[out, in]`` view of a stored weight (a view, no copy)."""
    return weight.t() if transposed else weight


@dataclass(frozen=True)
class LinearLayer:
    """One linear layer of a model, seen as ``[out_features, in_features]``.

    Attributes:
        name: dotted module name inside the model.
        module: the ``nn.Linear`` or ``Conv1D`` itself.
        role: the preset role (``q``, ``ffn_in``, ...) or None when the architecture has no
            preset or the layer has no role (classifier, pooler).
        layer_index: index of the transformer block, or None outside the blocks.
    """

    name: str
    module: nn.Module
    role: str | None
    layer_index: int | None

    @property
    def transposed(self) -> bool:
        return is_transposed(self.module)

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``, read from the stored weight: a parametrized layer's is its
        ``original`` (the parametrization keeps the shape), so nothing is computed, and under FSDP2
        the whole matrix's shape, not a shard's."""
        parametrized = getattr(getattr(self.module, "parametrizations", None), "weight", None)
        stored = parametrized.original if parametrized is not None else self.module.weight
        rows, cols = stored.shape
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def fused_matrices(self) -> int:
        """How many matrices this layer stacks along its rows: 3 for a fused ``qkv``, else 1."""
        return 3 if self.role == "qkv" else 1

    def weight(self) -> torch.Tensor:
        """The current effective weight as ``[out, in]`` (parametrizations applied)."""
        return as_out_in(self.module.weight, self.transposed)


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def role_of(name: str, model_type: str | None) -> str | None:
    """The preset role of the module called ``name``, or None."""
    for role, pattern in ROLE_PRESETS.get(model_type or "", {}).items():
        if re.search(pattern, name):
            return role
    return None


def block_index(name: str) -> int | None:
    """Index of the transformer block a module or parameter name is in, or None outside the blocks."""
    match = _LAYER_INDEX.search(f".{name}.")
    return int(match.group(1)) if match else None


def find_linear_layers(model: nn.Module) -> list[LinearLayer]:
    """Every ``nn.Linear`` / ``Conv1D`` in ``model`` in module order, with its role."""
    model_type = model_type_of(model)
    return [
        LinearLayer(name, module, role_of(name, model_type), block_index(name))
        for name, module in model.named_modules()
        if is_linear(module)
    ]


def head_size(model: nn.Module) -> int:
    """Size of one attention head (hidden size / number of heads) from the model config."""
    config = model.config
    if getattr(config, "head_dim", None):
        return int(config.head_dim)
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    return hidden // heads

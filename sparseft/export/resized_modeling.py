"""Rebuild a Hugging Face model whose layers were physically shrunk (heads or FFN channels removed).

transformers 5 has no ``pruned_heads`` any more, and BERT, RoBERTa and GPT-2 derive the
attention width from ``hidden_size``, so a config cannot say "9 heads of 64 in a 768-wide
BERT layer". sparseft's export then records, in ``config.sparseft_resized``, the shape of
every linear layer that differs from what the config builds and the attention attributes to
change (GPT-2's ``split_size``), and copies this file beside the weights as
``modeling_sparseft.py``, with ``auto_map`` pointing at a subclass that resizes those layers
right after construction. The directory then loads with
``AutoModelFor....from_pretrained(path, trust_remote_code=True)`` and needs no sparseft.

This file must stay self-contained: it may import only torch and transformers.
"""

from __future__ import annotations

from typing import Any

from torch import nn

RESIZED_KEY = "sparseft_resized"
ATTENTION_ATTRIBUTES = ("num_heads", "num_attention_heads", "num_key_value_heads", "all_head_size", "split_size")


def set_linear_shape_(module: nn.Module, out_features: int, in_features: int) -> None:
    """Record a new ``[out, in]`` size on an ``nn.Linear`` or HF ``Conv1D`` (weight already resized)."""
    if type(module).__name__ == "Conv1D":
        module.nf, module.nx = out_features, in_features
    else:
        module.out_features, module.in_features = out_features, in_features


def resize_linear_(module: nn.Module, out_features: int, in_features: int) -> None:
    """Give a linear layer new, uninitialised parameters of size ``[out, in]`` (to be loaded)."""
    weight = module.weight
    shape = (in_features, out_features) if type(module).__name__ == "Conv1D" else (out_features, in_features)
    module.weight = nn.Parameter(weight.new_empty(shape), requires_grad=weight.requires_grad)
    if getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(module.bias.new_empty(out_features), requires_grad=module.bias.requires_grad)
    set_linear_shape_(module, out_features, in_features)


def resize_modules_(model: nn.Module, spec: dict[str, Any]) -> None:
    """Apply ``spec`` = ``{"linears": {name: [out, in]}, "attributes": {name: {attr: value}}}``. Names are
    those of the exported model; its base model (``AutoModel``) has them without ``base_model_prefix``."""
    modules = dict(model.named_modules())
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    modules.update({f"{prefix}{name}": module for name, module in list(modules.items()) if name})
    for name, (out_features, in_features) in spec.get("linears", {}).items():
        resize_linear_(modules[name], out_features, in_features)
    for name, attributes in spec.get("attributes", {}).items():
        for key, value in attributes.items():
            setattr(modules[name], key, value)


def resized_class(base: type) -> type:
    """A subclass of the model class ``base`` that resizes its layers from ``config.sparseft_resized``."""

    def __init__(self: nn.Module, config: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, config, *args, **kwargs)
        resize_modules_(self, getattr(config, RESIZED_KEY, {}))

    name = f"Resized{base.__name__}"
    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})

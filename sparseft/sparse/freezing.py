"""Freeze everything but what a parameter-efficient method trains (and, optionally, the task head)."""

from __future__ import annotations

import re

from torch import nn

# output heads of the Hugging Face task models sparseft uses
HEAD_PATTERN = re.compile(r"(^|\.)(classifier|score|qa_outputs|lm_head)(\.|$)")


def is_head_parameter(name: str) -> bool:
    """True for parameters of the task head (``classifier``, ``score``, ``qa_outputs``, ``lm_head``)."""
    return HEAD_PATTERN.search(name) is not None


def freeze_backbone_(model: nn.Module, keep: set[int], train_head: bool = True) -> int:
    """Set ``requires_grad=False`` on every parameter not in ``keep`` (ids) and not in the head.

    Returns the number of trainable parameters left. ``named_parameters`` lists a tied tensor
    once, under its first name: GPT-2's ``lm_head`` appears as the token embedding, so a tied
    head stays frozen unless its id is in ``keep``.
    """
    for name, parameter in model.named_parameters():
        trainable = id(parameter) in keep or (train_head and is_head_parameter(name))
        parameter.requires_grad_(trainable)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def freeze_embeddings_(model: nn.Module) -> int:
    """Freeze the input embeddings (token, position, type, and BERT's embedding LayerNorm).

    Movement pruning freezes them (``self.embeddings.requires_grad_(False)``). Returns the
    number of parameters frozen.
    """
    base = getattr(model, "base_model", model)
    frozen = 0
    for name, child in base.named_children():
        if "embed" in name or name in ("wte", "wpe"):
            for parameter in child.parameters():
                parameter.requires_grad_(False)
                frozen += parameter.numel()
    return frozen

"""Training FLOPs per token of a decoder-only transformer, dense and with sparse weight matrices.

The convention is SPDF's (Thangarasa et al., 2023), which counts like Chinchilla's appendix F:

* 2 FLOPs per multiply-accumulate; training = 3 × forward (the backward pass costs two forwards);
* no FLOPs for embedding lookups (token and position);
* per token, per transformer block, forward::

      projections   2 · (1 − s) · (4·d² + 2·d·d_ff)     q, k, v, o, FFN in / out: scale with density
      attention     2 · 2 · n_ctx · d                    QKᵀ and A·V: dense
      softmax       3 · h · n_ctx                        dense

  plus ``2 · d · V`` for the logits (the LM head, tied to the embedding, is dense).

With it GPT-3 XL (24 blocks, d = 2048, 24 heads, n_ctx = 2048, V = 50257) at s = 0.75 needs
2.49× fewer training FLOPs than dense: the paper's "2.5×". Counting the embedding matmul, or
Kaplan's 6N, gives other numbers (2.27×, 2.79×), hence the explicit convention.

:func:`model_training_flops` measures the same quantity on a real model: every masked linear
layer costs ``2 · kept`` per token (the mask's count, not the formula's ``(1 − s)`` share) and
every other linear (LM head included) ``2 · numel``. Zeros in an unmasked weight (a dense
fine-tuning run that starts from a sparse checkpoint) save nothing: a dense kernel multiplies them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from sparseft.sparse.layers import find_linear_layers
from sparseft.sparse.parametrize import sparse_layers

TRAINING_MULTIPLIER = 3  # forward + backward (2 × forward)


@dataclass(frozen=True)
class TransformerShape:
    """The sizes that the FLOP count depends on.

    Attributes:
        n_layer: transformer blocks.
        d_model: hidden size d.
        n_head: attention heads h (the softmax term only).
        n_ctx: context length: each token attends to ``n_ctx`` positions (not halved for causality).
        vocab_size: V, the LM head's outputs.
        d_ff: FFN inner size (default ``4 · d_model``).
    """

    n_layer: int
    d_model: int
    n_head: int
    n_ctx: int
    vocab_size: int
    d_ff: int | None = None

    @property
    def ffn_size(self) -> int:
        return self.d_ff or 4 * self.d_model

    @classmethod
    def from_config(cls, config: Any, n_ctx: int | None = None) -> TransformerShape:
        """From a Hugging Face config (GPT-2, LLaMA, BERT names); ``n_ctx`` defaults to its maximum."""
        d_model = _first(config, "hidden_size", "n_embd")
        return cls(
            n_layer=_first(config, "num_hidden_layers", "n_layer"),
            d_model=d_model,
            n_head=_first(config, "num_attention_heads", "n_head"),
            n_ctx=n_ctx or _first(config, "max_position_embeddings", "n_positions"),
            vocab_size=_first(config, "vocab_size"),
            d_ff=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d_model,
        )


def _first(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise ValueError(f"model config has none of {names}: cannot count FLOPs")


def attention_flops_per_token(n_layer: int, d_model: int, n_head: int, n_ctx: int) -> float:
    """Forward FLOPs per token of the attention products and softmax, which sparsity leaves dense:
    ``n_layer · (2·2·n_ctx·d + 3·h·n_ctx)``."""
    return n_layer * (4 * n_ctx * d_model + 3 * n_head * n_ctx)


def forward_flops_per_token(shape: TransformerShape, sparsity: float = 0.0) -> float:
    """Forward FLOPs per token with every block projection at ``sparsity`` (module docstring)."""
    d = shape.d_model
    projections = 2 * (1.0 - sparsity) * (4 * d * d + 2 * d * shape.ffn_size)
    logits = 2 * d * shape.vocab_size
    return shape.n_layer * projections + attention_flops_per_token(
        shape.n_layer, d, shape.n_head, shape.n_ctx) + logits


def training_flops_per_token(shape: TransformerShape, sparsity: float = 0.0) -> float:
    """Training FLOPs per token: 3 × forward."""
    return TRAINING_MULTIPLIER * forward_flops_per_token(shape, sparsity)


def flop_reduction(shape: TransformerShape, sparsity: float) -> float:
    """Dense over sparse training FLOPs per token (2.49 for GPT-3 XL at 0.75)."""
    return training_flops_per_token(shape, 0.0) / training_flops_per_token(shape, sparsity)


@dataclass(frozen=True)
class FlopCount:
    """Training FLOPs per token of a model as it is now, and of the same model dense."""

    dense: float
    sparse: float

    @property
    def reduction(self) -> float:
        return self.dense / self.sparse

    def as_log(self) -> dict[str, float]:
        return {"flops/train_per_token_dense": self.dense, "flops/train_per_token": self.sparse,
                "flops/reduction": self.reduction}


def model_training_flops(model: nn.Module, n_ctx: int | None = None) -> FlopCount:
    """Measured training FLOPs per token of ``model`` (a Hugging Face transformer).

    Every linear layer costs ``2 · numel`` per token dense and ``2 · kept`` with a mask (block
    projections, LM head, any task head); the attention products and softmax come from the
    config; embeddings are free. ``n_ctx`` defaults to the config's maximum positions.
    """
    shape = TransformerShape.from_config(model.config, n_ctx)
    numel = {layer.name: layer.shape[0] * layer.shape[1] for layer in find_linear_layers(model)}
    kept = {**numel, **{layer.name: int(layer.mask.count_nonzero()) for layer in sparse_layers(model)}}
    attention = attention_flops_per_token(shape.n_layer, shape.d_model, shape.n_head, shape.n_ctx)
    dense = 2 * sum(numel.values()) + attention
    sparse = 2 * sum(kept.values()) + attention
    return FlopCount(TRAINING_MULTIPLIER * dense, TRAINING_MULTIPLIER * sparse)

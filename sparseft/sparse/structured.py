"""Structured pruning units: whole attention heads and FFN channels, as row / column keep-masks.

A transformer block's linears are grouped by role (:class:`Block`). A head owns rows of the
q, k and v projections (``head_dim`` each) and the same columns of the attention output; an
FFN channel owns one row of every ``ffn_in`` projection (LLaMA's gate and up) and one column
of ``ffn_out``. Masking a unit's output columns alone already removes its contribution;
masking its input rows too makes the masked model equal, weight for weight, to the model with
the unit physically removed (:mod:`sparseft.export.shrink`).

With grouped key/value heads (LLaMA-style GQA, ``num_key_value_heads < num_attention_heads``)
the unit is a *KV group*: one key/value head and the query heads that share it, so every
remaining query head keeps its key/value head. With one KV head per query head it is a head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sparseft.sparse.layers import LinearLayer, head_size

ATTENTION_ROLES = ("q", "k", "v", "qkv", "o")
FFN_ROLES = ("ffn_in", "ffn_out")


@dataclass(frozen=True)
class HeadLayout:
    """Attention heads of a model: query heads, key/value heads and the size of one head."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: nn.Module) -> HeadLayout:
        config = model.config
        heads = getattr(config, "num_attention_heads", None) or config.n_head
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads cannot be grouped over {kv_heads} key/value heads")
        return cls(heads, kv_heads, head_size(model))

    @property
    def units(self) -> int:
        """Pruning units: key/value groups (heads when every head has its own key/value)."""
        return self.num_kv_heads

    @property
    def query_rows(self) -> int:
        """Rows of the query projection (and columns of the output) owned by one unit."""
        return self.num_heads // self.num_kv_heads * self.head_dim


@dataclass
class Block:
    """The linear layers of one transformer block, by role."""

    index: int
    roles: dict[str, LinearLayer] = field(default_factory=dict)
    ffn_in: list[LinearLayer] = field(default_factory=list)

    def get(self, role: str) -> LinearLayer | None:
        return self.roles.get(role)

    def attention(self) -> list[LinearLayer]:
        return [self.roles[role] for role in ATTENTION_ROLES if role in self.roles]

    def ffn(self) -> list[LinearLayer]:
        return self.ffn_in + ([self.roles["ffn_out"]] if "ffn_out" in self.roles else [])


def group_blocks(layers: list[LinearLayer]) -> list[Block]:
    """Group layers with a role and a block index into :class:`Block` s, in block order."""
    blocks: dict[int, Block] = {}
    for layer in layers:
        if layer.layer_index is None or layer.role not in ATTENTION_ROLES + FFN_ROLES:
            continue
        block = blocks.setdefault(layer.layer_index, Block(layer.layer_index))
        if layer.role == "ffn_in":
            block.ffn_in.append(layer)
        else:
            block.roles[layer.role] = layer
    return [blocks[index] for index in sorted(blocks)]


def head_scores(delta_q: torch.Tensor | None, delta_v: torch.Tensor | None, layout: HeadLayout) -> torch.Tensor:
    """DSEE's head importance, one score per unit: ``Σ_{rows i of h} Σ_j |ΔW_q|_ij + |ΔW_v|_ij``.

    ``delta_q`` is ``[num_heads·head_dim, in]`` and ``delta_v`` ``[num_kv_heads·head_dim, in]``
    (``[out, in]`` views; either may be None when that projection has no update).
    """
    scores = torch.zeros(layout.units, device=(delta_q if delta_q is not None else delta_v).device)
    for delta in (delta_q, delta_v):
        if delta is not None:
            scores = scores + delta.detach().abs().sum(1).view(layout.units, -1).sum(1).float()
    return scores


def split_qkv(fused: torch.Tensor, layout: HeadLayout) -> tuple[torch.Tensor, ...]:
    """The q, k and v row blocks of a fused ``[q; k; v]`` matrix."""
    key_value = layout.num_kv_heads * layout.head_dim
    return fused.split([layout.num_heads * layout.head_dim, key_value, key_value])


def channel_scores(ffn_in: list[torch.Tensor], ffn_out: torch.Tensor) -> torch.Tensor:
    """FFN channel importance ``(Σ_in ‖W_in[j, :]‖₁) · ‖W_out[:, j]‖₁`` on the effective weights.

    A channel's output is its activation times column j of ``W_out``, and the activation grows
    with row j of each input projection, so the product of the two L1 norms bounds its
    contribution for bounded inputs (a data-free magnitude criterion).
    """
    into = torch.stack([weight.detach().abs().sum(1).float() for weight in ffn_in]).sum(0)
    return into * ffn_out.detach().abs().sum(0).float()


def row_mask(keep_rows: torch.Tensor, in_features: int) -> torch.Tensor:
    """``[out, in]`` keep-mask keeping whole rows."""
    return keep_rows[:, None].expand(-1, in_features).clone()


def column_mask(keep_columns: torch.Tensor, out_features: int) -> torch.Tensor:
    """``[out, in]`` keep-mask keeping whole columns."""
    return keep_columns[None, :].expand(out_features, -1).clone()


def row_owners(layout: HeadLayout) -> dict[str, torch.Tensor]:
    """Per role, the unit that owns each row (q, k, v, qkv) or column (o)."""
    units = torch.arange(layout.units)
    query = units.repeat_interleave(layout.query_rows)
    key_value = units.repeat_interleave(layout.head_dim)
    return {"q": query, "k": key_value, "v": key_value, "qkv": torch.cat([query, key_value, key_value]),
            "o": query}


def head_rows(keep_units: torch.Tensor, layout: HeadLayout) -> dict[str, torch.Tensor]:
    """Per role, which rows (q, k, v, qkv) or columns (o) the kept units own."""
    return {role: keep_units[owner.to(keep_units.device)] for role, owner in row_owners(layout).items()}


def head_masks(block: Block, keep_units: torch.Tensor, layout: HeadLayout) -> dict[str, torch.Tensor]:
    """``[out, in]`` keep-masks, by layer name, removing the dropped units of one block."""
    rows = head_rows(keep_units, layout)
    masks = {}
    for layer in block.attention():
        out_features, in_features = layer.shape
        if layer.role == "o":
            masks[layer.name] = column_mask(rows["o"], out_features)
        else:
            masks[layer.name] = row_mask(rows[layer.role], in_features)
    return masks


def channel_masks(block: Block, keep_channels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``[out, in]`` keep-masks, by layer name, removing the dropped FFN channels of one block."""
    masks = {layer.name: row_mask(keep_channels, layer.shape[1]) for layer in block.ffn_in}
    ffn_out = block.get("ffn_out")
    if ffn_out is not None:
        masks[ffn_out.name] = column_mask(keep_channels, ffn_out.shape[0])
    return masks

"""Weight-shaped updates ΔW for ``W_eff = M ⊙ (W0 + ΔW)``: modules whose ``forward()`` returns ``[out, in]``.

Any such module works as a delta. Subclassing :class:`WeightDelta` adds two ways to apply it:

* ``added_to(W0)``, which an update may override to form ``W0 + ΔW`` without a separate
  full-size ΔW: a low-rank update is then one ``addmm``. The parametrization recomputes
  ``W0 + ΔW`` at every forward where a mask applies, so on a CPU, where these full-size passes
  are not hidden behind matmuls, this is a real part of the step;
* ``on_input(x)``, the update's share of the output ``x·ΔWᵀ`` computed from the input, where no
  mask applies (:class:`~sparseft.sparse.parametrize.SparseWeight` then puts it there): LoRA's
  ``s·(x·Aᵀ)·Bᵀ`` never forms a full-size tensor, and autograd saves ``x`` and the rank-r
  intermediate instead of the effective weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class WeightDelta(nn.Module):
    """Base of the update modules: ``forward()`` returns ΔW, ``added_to(weight)`` returns ``weight + ΔW``,
    ``on_input(x)`` returns ``x·ΔWᵀ`` (by default from ΔW itself; subclasses avoid forming it)."""

    def added_to(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self()

    def on_input(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self())


class LowRank(WeightDelta):
    """ΔW = scale · L · R with ``L: [out, rank]`` and ``R: [rank, in]`` (LoRA, PST's U·V).

    One factor starts at zero so that ΔW = 0 and training starts from the pre-trained model.
    PST: ``L = U ~ N(0, 1)``, ``R = V = 0``, scale β. DSEE: ``L = B = 0``, ``R = A ~ N(0, 0.02²)``,
    scale α / r. LoRA (PEFT's init): ``L = B = 0``, ``R = A`` kaiming-uniform (a = √5), scale α / r.

    On the input side (:meth:`on_input`) it is PEFT's ``lora_B(lora_A(dropout(x))) * scaling``,
    operation for operation: ``y += scale·(dropout(x)·Rᵀ)·Lᵀ``.

    Args:
        shape: ``(out_features, in_features)``.
        rank: inner dimension r.
        scale: multiplies the product.
        left_std: standard deviation of the normal init of ``L``; None for zeros.
        right_std: standard deviation of the normal init of ``R``; None for zeros; ``"kaiming"`` for
            ``nn.Linear``'s own init (kaiming-uniform, a = √5: bound ``1/√in``), as LoRA and PEFT.
        dropout: dropout probability on the input of ``R`` (LoRA's ``lora_dropout``); the input side only.
    """

    def __init__(
        self, shape: tuple[int, int], rank: int, scale: float = 1.0,
        left_std: float | None = None, right_std: float | str | None = None, dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        out_features, in_features = shape
        self.scale = scale
        self.left = nn.Parameter(_init((out_features, rank), left_std))
        self.right = nn.Parameter(_init((rank, in_features), right_std))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self) -> torch.Tensor:
        return self.scale * (self.left @ self.right)

    def on_input(self, x: torch.Tensor) -> torch.Tensor:
        """``scale·(dropout(x)·Rᵀ)·Lᵀ``: two rank-r matmuls, no ``[out, in]`` tensor."""
        return F.linear(F.linear(self.dropout(x), self.right), self.left) * self.scale

    def added_to(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + scale·L·R`` in one pass over the matrix (``addmm``)."""
        return torch.addmm(weight, self.left, self.right, alpha=self.scale)


def check_rank(rank: int, shape: tuple[int, int], layer: str, option: str) -> None:
    """Refuse a rank above ``min(out, in)``: ``L·R`` can have no higher rank, so the extra factors
    would only train more parameters, ``rank·(out + in)``, up to several times the matrix's own."""
    if rank > min(shape):
        raise ValueError(
            f"{option} {rank} is above the rank of {layer}'s {shape[0]}x{shape[1]} matrix: set {option} <= {min(shape)}"
        )


def _init(shape: tuple[int, int], std: float | str | None) -> torch.Tensor:
    if std == "kaiming":
        return nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))
    return torch.zeros(shape) if std is None else torch.randn(shape) * std


class SparseResidual(WeightDelta):
    """ΔW with trainable values on a fixed set Ω of positions, zero elsewhere (DSEE's S2).

    Only ``len(Ω)`` values are stored and trained: ``ΔW.flatten()[Ω] = values``. Ω (``indices``,
    flat positions in the ``[out, in]`` matrix) is a buffer, so it is checkpointed but never
    trained; the values start at zero.

    Args:
        shape: ``(out_features, in_features)``.
        indices: flat positions Ω, distinct, in ``[0, out·in)``.
    """

    def __init__(self, shape: tuple[int, int], indices: torch.Tensor) -> None:
        super().__init__()
        self.shape = tuple(shape)
        indices = indices.long().flatten()
        if indices.unique().numel() != indices.numel():
            raise ValueError("SparseResidual indices must be distinct")
        if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < shape[0] * shape[1]:
            raise ValueError(f"SparseResidual indices must lie in [0, {shape[0] * shape[1]})")
        self.register_buffer("indices", indices)
        self.values = nn.Parameter(torch.zeros(indices.numel()))

    def forward(self) -> torch.Tensor:
        flat = self.values.new_zeros(self.shape[0] * self.shape[1])
        return flat.index_put((self.indices,), self.values).view(self.shape)

    def on_input(self, x: torch.Tensor) -> torch.Tensor:
        """``y[..., i] = Σ_{(i, j) ∈ Ω} S2[i, j]·x[..., j]``: ``x``'s columns in Ω gathered, scaled and
        added into their rows (saves ``len(Ω)`` input columns, no ``[out, in]`` tensor)."""
        rows, columns = self.indices // self.shape[1], self.indices % self.shape[1]
        terms = x.index_select(-1, columns) * self.values.to(x.dtype)
        return terms.new_zeros(*x.shape[:-1], self.shape[0]).index_add_(-1, rows, terms)


class ScaledSum(WeightDelta):
    """ΔW = scale · Σ children's ΔW: one scale shared by several update forms.

    DSEE's update is ``(α/r)·(B·A + S2)``: ``ScaledSum([LowRank(..., scale=1), SparseResidual(...)],
    α/r)`` applies α/r to the sparse part as well, as the reference code does.

    Args:
        parts: modules whose ``forward()`` returns ``[out, in]``.
        scale: multiplies the sum.
    """

    def __init__(self, parts: list[nn.Module], scale: float = 1.0) -> None:
        super().__init__()
        if not parts:
            raise ValueError("ScaledSum needs at least one part")
        self.parts = nn.ModuleList(parts)
        self.scale = scale

    def forward(self) -> torch.Tensor:
        total = self.parts[0]()
        for part in self.parts[1:]:
            total = total + part()
        return self.scale * total

    def on_input(self, x: torch.Tensor) -> torch.Tensor:
        """``scale·Σ x·ΔW_partᵀ``, each part on the input side."""
        total = on_input(x, self.parts[0])
        for part in self.parts[1:]:
            total = total + on_input(x, part)
        return total * self.scale


class RowBlocks(WeightDelta):
    """Stack per-block modules along the output rows: one module per matrix of a fused layer.

    GPT-2's ``c_attn`` holds ``[q; k; v]``; methods defined per matrix (a LoRA pair, scores)
    get one child per block. ``forward()`` concatenates the children's outputs; with a tensor
    argument each child receives its own row block of it.
    """

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            return torch.cat([block() for block in self.blocks])
        chunks = weight.chunk(len(self.blocks))
        return torch.cat([block(chunk) for block, chunk in zip(self.blocks, chunks, strict=True)])

    @property
    def magnitude_term(self) -> bool:
        """Scores per block: the blocks' ``|W|`` terms leave their gradient to the mask (see parametrize)."""
        return all(getattr(block, "magnitude_term", False) for block in self.blocks)

    def added_to(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + ΔW`` block by block, each child's own ``added_to`` on its row block."""
        chunks = weight.chunk(len(self.blocks))
        return torch.cat([add_delta(chunk, block) for block, chunk in zip(self.blocks, chunks, strict=True)])

    def on_input(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks' outputs side by side: block k gives output columns k of the fused layer."""
        return torch.cat([on_input(x, block) for block in self.blocks], dim=-1)


def add_delta(weight: torch.Tensor, delta: nn.Module | None) -> torch.Tensor:
    """``weight + ΔW`` for any delta module (fused where it is a :class:`WeightDelta`); ``weight`` if None."""
    if delta is None:
        return weight
    return delta.added_to(weight) if isinstance(delta, WeightDelta) else weight + delta()


def on_input(x: torch.Tensor, delta: nn.Module) -> torch.Tensor:
    """``x·ΔWᵀ`` for any delta module (from the input where it is a :class:`WeightDelta`)."""
    return delta.on_input(x) if isinstance(delta, WeightDelta) else F.linear(x, delta())

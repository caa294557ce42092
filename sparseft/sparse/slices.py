"""Structured slice updates with partial back-propagation (S²FT, Yang et al., NeurIPS 2024).

A :class:`SliceLinear` replaces a target ``nn.Linear`` / HF ``Conv1D`` during training. Its
frozen weight ``W0`` keeps the original storage (same name and layout, so ``state_dict`` keys
stay those of the base model); the only trainable tensor is the update of the selected slice,
zero at the start:

* ``columns`` (the released S²FT: o_proj / down_proj input columns ``C``):
  ``y = x·W0ᵀ + b + x[..., C]·Δᵀ``, ``Δ: [out, |C|]``, i.e. ``W = W0 + Δ·E_Cᵀ``;
* ``rows`` (the optional v / up rows ``R``): ``y[..., R] += x·Δᵀ``, ``Δ: [|R|, in]``.

:class:`PartialBackprop` is the efficient backward of the paper (§3.3):

* columns: it saves only ``X[..., C]`` (not ``X``) and ``∂L/∂Δ = dYᵀ·X[..., C]``;
* rows: ``∂L/∂Δ = dY[..., R]ᵀ·X`` (needs the full ``X``);
* ``∂L/∂X = dY·W`` with the effective ``W`` (``W0`` is saved by reference, not copied);
* no gradient for ``W0``: no full-shape gradient and no full-shape optimizer state exist.

``Δ`` is an ordinary ``nn.Parameter`` of the slice's shape, so DDP all-reduces it and gradient
accumulation adds into its ``.grad`` like any parameter (the reference's ``weight.grad2`` does
neither). Weights stay index-aligned with the base model: nothing is permuted.
:func:`restore_linear_` merges ``W[:, C] = W0[:, C] + Δ`` and puts back the original module type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparseft.sparse.layers import LinearLayer, as_out_in

Axis = Literal["columns", "rows"]


class PartialBackprop(torch.autograd.Function):
    """``y = x·(W0 + Δ on the slice)ᵀ + b``, saving only what ``∂L/∂Δ`` needs (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, delta: torch.Tensor,
                index: torch.Tensor, columns: bool) -> torch.Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):  # one compute dtype for forward and backward
            dtype = torch.get_autocast_dtype(device)
            x, weight, delta = x.to(dtype), weight.to(dtype), delta.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device, enabled=False):
            y = F.linear(x, weight, bias)
            if columns:
                chosen = x.index_select(-1, index)  # X[..., C]: a copy of |C| columns, the only input saved
                if index.numel():
                    y = y + F.linear(chosen, delta)
            else:
                chosen = x
                y = y.index_add(-1, index, F.linear(x, delta))
        ctx.save_for_backward(weight, delta, index, chosen if ctx.needs_input_grad[3] else None)
        ctx.columns = columns
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, delta, index, saved = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        grad_x = grad_delta = grad_bias = None
        if ctx.needs_input_grad[0]:  # dY·W with W = W0 + Δ on the slice
            grad_x = grad @ weight
            if ctx.columns:
                grad_x.index_add_(-1, index, grad @ delta)
            else:
                grad_x += grad.index_select(-1, index) @ delta
        if ctx.needs_input_grad[3]:
            flat = grad.flatten(0, -2)
            if ctx.columns:  # ∂L/∂Δ = dYᵀ·X[..., C]
                grad_delta = flat.t() @ saved.flatten(0, -2)
            else:  # ∂L/∂Δ = dY[..., R]ᵀ·X
                grad_delta = flat.index_select(1, index).t() @ saved.flatten(0, -2)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_bias, grad_delta, None, None


class SliceLinear(nn.Module):
    """A linear layer with a frozen ``W0`` and a trainable slice update ``Δ`` (partial back-prop).

    Args:
        module: the ``nn.Linear`` or ``Conv1D`` it replaces (its weight and bias are taken over).
        index: the selected input columns (``columns``) or output rows (``rows``), ``[out, in]`` view.
        axis: ``columns`` or ``rows``.
    """

    def __init__(self, module: nn.Module, index: torch.Tensor, axis: Axis = "columns") -> None:
        super().__init__()
        if axis not in ("columns", "rows"):
            raise ValueError(f"axis must be 'columns' or 'rows', got {axis!r}")
        self.transposed = isinstance(module, Conv1D)
        self.axis = axis
        self.weight = module.weight
        self.weight.requires_grad_(False)
        self.bias = module.bias
        # a W0 still to be read (sharded loading) is on the meta device; the indices are real all the same
        device = None if self.weight.is_meta else self.weight.device
        index = index.to(device=device, dtype=torch.long).sort().values
        if index.unique().numel() != index.numel():
            raise ValueError("slice indices must be distinct")
        self.register_buffer("index", index)
        self.delta = nn.Parameter(self.weight.new_zeros(self._delta_shape(index.numel())))

    #: parameters whose start :meth:`reset_empty_` sets once they have storage (sharded loading)
    empty_start = ("delta",)

    @torch.no_grad()
    def reset_empty_(self) -> None:
        """``Δ = 0``, the start, on whatever shard this process holds."""
        self.delta.zero_()

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        return tuple(self.out_in().shape)

    def out_in(self) -> torch.Tensor:
        """The frozen ``W0`` as ``[out, in]`` (a view)."""
        return as_out_in(self.weight, self.transposed)

    def _delta_shape(self, count: int) -> tuple[int, int]:
        out_features, in_features = self.shape
        return (out_features, count) if self.axis == "columns" else (count, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PartialBackprop.apply(x, self.out_in(), self.bias, self.delta, self.index, self.axis == "columns")

    def trained_mask(self) -> torch.Tensor:
        """``[out, in]`` bool, True on the entries the update trains (built on demand, not stored)."""
        mask = torch.zeros(self.shape, dtype=torch.bool, device=self.index.device)
        if self.axis == "columns":
            mask[:, self.index] = True
        else:
            mask[self.index] = True
        return mask

    @torch.no_grad()
    def merged_out_in(self) -> torch.Tensor:
        """``W0`` with the slice replaced by ``W0[slice] + Δ`` (a new tensor, ``[out, in]``)."""
        merged = self.out_in().clone()
        if self.axis == "columns":
            merged[:, self.index] = merged[:, self.index] + self.delta
        else:
            merged[self.index] = merged[self.index] + self.delta
        return merged

    def to_linear(self) -> nn.Module:
        """The original module type with the merged weight (``Conv1D`` stays ``[in, out]``)."""
        out_features, in_features = self.shape
        with torch.device("meta"):
            plain = (Conv1D(out_features, in_features) if self.transposed
                     else nn.Linear(in_features, out_features, bias=self.bias is not None))
        merged = self.merged_out_in()
        plain.weight = nn.Parameter(merged.t().contiguous() if self.transposed else merged)
        plain.bias = nn.Parameter(self.bias.detach().clone()) if self.bias is not None else None
        return plain

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Take the checkpoint's selection (its size may differ: global or data-driven choices)."""
        index = state_dict.get(f"{prefix}index")
        if index is not None and not torch.equal(index.to(self.index.device), self.index):
            self.index = index.to(device=self.index.device, dtype=torch.long)
            self.delta = nn.Parameter(self.weight.new_zeros(self._delta_shape(index.numel())))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        out_features, in_features = self.shape
        return f"[out, in]=[{out_features}, {in_features}], trained {self.axis}={self.index.numel()}"


@dataclass(frozen=True)
class SlicedLayer:
    """A target layer (as it was before the swap) and the :class:`SliceLinear` now in its place."""

    layer: LinearLayer
    module: SliceLinear

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def numel(self) -> int:
        out_features, in_features = self.module.shape
        return out_features * in_features

    @property
    def trained(self) -> int:
        """Weights the update trains."""
        return self.module.delta.numel()

    @property
    def mask(self) -> torch.Tensor:
        """``[out, in]`` bool: True where trained, False where frozen (the update's sparsity pattern)."""
        return self.module.trained_mask()

    def weight(self) -> torch.Tensor:
        """The effective ``[out, in]`` weight ``W0 + Δ`` on the slice."""
        return self.module.merged_out_in()


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def slice_layer_(model: nn.Module, layer: LinearLayer, index: torch.Tensor, axis: Axis = "columns") -> SlicedLayer:
    """Swap ``layer`` for a :class:`SliceLinear` training ``index`` along ``axis``."""
    parent, child = _parent(model, layer.name)
    current = getattr(parent, child)
    if isinstance(current, SliceLinear):
        raise ValueError(f"layer {layer.name!r} already has a slice update")
    if current is not layer.module:
        raise ValueError(f"layer {layer.name!r} is not the module this model holds under that name")
    sliced = SliceLinear(current, index, axis)
    setattr(parent, child, sliced)
    return SlicedLayer(layer, sliced)


def sliced_layers(model: nn.Module) -> list[tuple[str, SliceLinear]]:
    """``(name, module)`` of every :class:`SliceLinear` in ``model``, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, SliceLinear)]


def restore_linear_(model: nn.Module) -> list[str]:
    """Merge every slice update and put back the original module types; returns the layer names."""
    names = []
    for name, module in sliced_layers(model):
        parent, child = _parent(model, name)
        setattr(parent, child, module.to_linear())
        names.append(name)
    return names

"""2:4 inference on NVIDIA GPUs: give a 2:4 model's linears torch's semi-structured sparse weights.

NVIDIA's sparse tensor cores (compute capability 8.0 and newer: Ampere, Ada, Hopper,
Blackwell) multiply a matrix holding at most 2 non-zeros in every 4 consecutive entries of a
row at up to twice the dense rate. ``torch.sparse.to_sparse_semi_structured`` (torch 2.13)
compresses such a weight for cuSPARSELt (or CUTLASS when forced): a 2-D, contiguous CUDA tensor
in float16 or bfloat16 (cuSPARSELt also takes int8 / float8, CUTLASS float32) whose rows and
columns are multiples of the backend's block (16 × 16 for cuSPARSELt half precision), and
``nn.functional.linear`` then runs on it. The compressed format holds two values per group of
four, so a weight that is not 2:4 would silently change: :func:`to_semi_structured` converts
only layers it has checked, after loading an exported 2:4 model::

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float16).cuda()
    converted = to_semi_structured(model)   # {"converted": [...], "skipped": {name: reason}}

GPT-2's ``Conv1D`` stores ``[in, out]``, transposed to what the kernels need; it is replaced
by the equivalent ``nn.Linear``. ``dense_fallback=True`` runs every check and replacement but
keeps the weights dense, so the same code path is exercised on a machine without a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

from sparseft.sparse.layers import LinearLayer, find_linear_layers

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
NEEDS = ("a CUDA build of torch and an NVIDIA GPU of compute capability 8.0 or newer "
         "(Ampere, Ada, Hopper, Blackwell) with the model on it in float16 or bfloat16")


def is_two_four(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs of every row (``[out, in]``) has at most 2 non-zeros."""
    out_features, in_features = weight.shape
    if in_features % 4:
        return False
    return bool((weight.reshape(out_features, in_features // 4, 4) != 0).sum(-1).le(2).all())


def block_shape(dtype: torch.dtype) -> tuple[int, int]:
    """The (rows, columns) a weight's shape must be a multiple of for the backend torch will use."""
    backend = (torch.sparse.SparseSemiStructuredTensorCUTLASS if SparseSemiStructuredTensor._FORCE_CUTLASS
               else torch.sparse.SparseSemiStructuredTensorCUSPARSELT)
    constraints = backend._DTYPE_SHAPE_CONSTRAINTS[dtype]
    return constraints.sparse_min_rows, constraints.sparse_min_cols


def unsupported_reason(layer: LinearLayer) -> str | None:
    """Why ``layer`` cannot take a semi-structured weight, or None when it can."""
    weight = layer.weight().detach()
    rows, columns = block_shape(weight.dtype)
    out_features, in_features = weight.shape
    if out_features % rows or in_features % columns:
        return f"shape {out_features}x{in_features} is not a multiple of {rows}x{columns}"
    if not is_two_four(weight):
        return "not 2:4 sparse"
    return None


def require_gpu() -> None:
    """Refuse, with what is needed, a machine without CUDA."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"2:4 sparse inference needs {NEEDS}; this machine has no CUDA GPU "
                           f"(torch {torch.__version__}). Use dense_fallback=True to check the conversion on CPU.")


def check_device(model: nn.Module) -> None:
    """Refuse, with what is needed, a machine or a model the kernels cannot run on."""
    require_gpu()
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"the model is on {device}: move it to the GPU first, e.g. model.half().cuda()")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 0):
        raise RuntimeError(f"2:4 sparse inference needs {NEEDS}; {torch.cuda.get_device_name(device)} has "
                           f"compute capability {capability[0]}.{capability[1]}")


def _as_linear(layer: LinearLayer) -> nn.Linear:
    """An ``nn.Linear`` computing what ``layer`` computes, with a contiguous ``[out, in]`` weight."""
    if isinstance(layer.module, nn.Linear):
        return layer.module
    out_features, in_features = layer.shape
    bias = getattr(layer.module, "bias", None)
    weight = layer.module.weight
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    linear.weight = nn.Parameter(layer.weight().detach().contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return linear


@torch.no_grad()
def to_semi_structured(model: nn.Module, dense_fallback: bool = False) -> dict[str, Any]:
    """Give every 2:4 linear of ``model`` (in place) a semi-structured sparse weight, for inference.

    Args:
        model: a plain model (an export loaded with ``from_pretrained``), in float16 or bfloat16.
        dense_fallback: check and replace layers as usual but keep dense weights (no GPU needed).

    Returns:
        ``converted``: the layers that now hold 2:4 weights; ``skipped``: the other linear
        layers with the reason (not 2:4, or a shape the kernels do not take).
    """
    if not dense_fallback:
        check_device(model)
    dtype = next(model.parameters()).dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"2:4 kernels take float16 or bfloat16 weights, the model is {dtype}: "
                         "load it with dtype=torch.float16 (or call model.half()) first")
    layers = find_linear_layers(model)
    skipped = {layer.name: reason for layer in layers if (reason := unsupported_reason(layer)) is not None}
    chosen = [layer for layer in layers if layer.name not in skipped]
    if not chosen:
        raise ValueError("no linear layer of this model is 2:4 sparse with a supported shape "
                         f"({len(skipped)} checked); export a model pruned with the pattern 2:4")
    for layer in chosen:
        linear = _as_linear(layer)
        if not dense_fallback:
            linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)
        if linear is not layer.module:
            parent, _, child = layer.name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return {"converted": [layer.name for layer in chosen], "skipped": skipped}

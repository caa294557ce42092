"""The mask product on the entries' bits is ``where(keep, x, 0)`` bit for bit, forward and backward."""

from __future__ import annotations

import pytest
import torch

from sparseft.sparse.masking import apply_mask, masked
from tests.test_inplace import bits


def special_values(dtype: torch.dtype, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(round(sparsity * 10))
    values = (torch.randn(48, 40, generator=generator) * 3).to(dtype)  # about half negative
    values.view(-1)[:40] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0] * 8).to(dtype)
    return values, torch.rand(48, 40, generator=generator) >= sparsity


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex128])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_the_mask_product_is_where_bit_for_bit(dtype, sparsity):
    values, keep = special_values(dtype, sparsity)
    for x, mask in ((values, keep), (values.t(), keep.t())):  # contiguous, and a transposed view (Conv1D)
        expected = torch.where(mask, x, torch.zeros((), dtype=dtype))
        result = masked(x, mask)
        assert result.dtype == dtype and torch.equal(bits(result), bits(expected))
        assert torch.equal(bits(x), bits(values if x is values else values.t())), "the input is not written"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_mask_products_gradient_is_wheres(dtype):
    values, keep = special_values(dtype, 0.6)
    values = values.nan_to_num(0.0, 1.0, -1.0).requires_grad_()
    upstream = torch.randn(48, 40).to(dtype)
    (reference,) = torch.autograd.grad(torch.where(keep, values, 0.0), values, upstream)
    (gradient,) = torch.autograd.grad(apply_mask(values, keep), values, upstream)
    assert torch.equal(bits(gradient), bits(reference))
    with torch.no_grad():
        assert not apply_mask(values, keep).requires_grad

"""2:4 inference helper: which layers it converts, what it refuses, and the dense fallback on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseft.backbones.loading import load_backbone
from sparseft.export.semi_structured import is_two_four, to_semi_structured
from sparseft.sparse.layers import find_linear_layers
from sparseft.sparse.parametrize import merge_
from sparseft.sparse.prune import prune_, sparsify
from sparseft.testing import tiny_config

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")


def two_four_tiny(model_type: str, dtype: torch.dtype = torch.bfloat16, pattern: str = "2:4") -> nn.Module:
    torch.manual_seed(0)
    extra = {"pad_token_id": 0} if model_type != "bert" else {}
    model = load_backbone("sequence-classification", config=tiny_config(model_type, **extra), num_labels=2).eval()
    layers = sparsify(model)
    prune_(layers, [layer.dense().abs() for layer in layers], 0.5, pattern=pattern)
    merge_(model)
    return model.to(dtype)


def test_two_four_check():
    assert is_two_four(torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]]))
    assert not is_two_four(torch.tensor([[1.0, 1.0, 2.0, 0.0]]))
    assert not is_two_four(torch.zeros(2, 6))  # groups of 4 do not tile the row


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_dense_fallback_converts_the_two_four_layers_and_keeps_the_logits(model_type):
    model = two_four_tiny(model_type)
    inputs = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
    targets = {layer.name for layer in find_linear_layers(model) if layer.role}
    result = to_semi_structured(model, dense_fallback=True)
    assert set(result["converted"]) == targets  # the pruned ones; the head and pooler stay dense
    assert result["skipped"] and not targets & set(result["skipped"])
    for name in result["converted"]:
        module = model.get_submodule(name)
        assert type(module) is nn.Linear and is_two_four(module.weight)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=inputs).logits, expected, atol=1e-2)


def test_refuses_a_model_that_is_not_two_four_or_not_half_precision():
    with pytest.raises(ValueError, match="no linear layer of this model is 2:4 sparse"):
        to_semi_structured(two_four_tiny("bert", pattern="layer"), dense_fallback=True)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        to_semi_structured(two_four_tiny("bert", dtype=torch.float32), dense_fallback=True)


@no_cuda
def test_without_a_gpu_the_helper_says_what_is_needed():
    with pytest.raises(RuntimeError, match="compute capability 8.0 or newer.*no CUDA GPU"):
        to_semi_structured(two_four_tiny("bert"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_linears_hold_semi_structured_weights():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs compute capability 8.0+")
    model = two_four_tiny("bert", dtype=torch.float16).cuda()
    inputs = torch.randint(3, 400, (16, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
    result = to_semi_structured(model)
    module = model.get_submodule(result["converted"][0])
    assert isinstance(module.weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=inputs).logits, expected, atol=2e-2)

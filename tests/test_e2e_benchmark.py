"""benchmarks/e2e_s2ft_lora.py on a tiny LLaMA (GQA) and the real E2E files: every arm trains on the
same batches, the trainable counts are the hand-computed budgets, and the test MRs are scored."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import shared_data

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def e2e_benchmark():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its helpers from compare.py
    try:
        spec = importlib.util.spec_from_file_location("e2e_s2ft_lora", BENCHMARKS / "e2e_s2ft_lora.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.slow
@pytest.mark.integration
def test_arms_share_data_order_and_report_budgets_and_metrics(e2e_benchmark, tmp_path):
    from sparseft.testing import make_tiny_model_dir

    directory = make_tiny_model_dir(tmp_path / "llama", "llama", task="causal-lm")  # 2 blocks, 4 heads of 8, d_ff 64
    args = e2e_benchmark.parse_args([
        "--data_dir", str(shared_data("e2e")), "--backbone", str(directory), "--steps", "3", "--batch_size", "2",
        "--eval_batch_size", "2", "--eval_mrs", "3", "--max_new_tokens", "4", "--loss_window", "2", "--no_meteor",
        "--threads", str(torch.get_num_threads())])
    s2ft = e2e_benchmark.run_one(args, "s2ft:head_ratio=0.25,channel_ratio=0.1")
    lora = e2e_benchmark.run_one(args, "dsee:sparsity=0.0,num_sparse=0,rank=2,alpha=4,train_head=false")
    zero = e2e_benchmark.run_one(args, "zero_shot")
    # S²FT: 2 of 8 (block, head) pairs x 8 o_proj columns x 32 rows + 12 of 128 channels x 32 down_proj rows
    assert s2ft["trainable_parameters"] == 2 * 8 * 32 + 12 * 32
    # LoRA r=2 on q (32 -> 32) and v (32 -> 16, two KV heads of 8) in 2 blocks
    assert lora["trainable_parameters"] == 2 * (2 * (32 + 32) + 2 * (32 + 16))
    assert s2ft["steps"] == lora["steps"] == 3 and zero["steps"] == 0 and zero["trainable_parameters"] == 0
    assert s2ft["data_checksum_first_10_batches"] == lora["data_checksum_first_10_batches"] != 0
    for result in (s2ft, lora, zero):
        assert {"test/bleu", "test/nist", "test/rouge_l", "test/cider"} <= set(result["metrics"])
        assert len(result["sample_outputs"]) == 3  # one output per test MR
    assert "| `zero_shot` |" in e2e_benchmark.format_table([s2ft, lora, zero])

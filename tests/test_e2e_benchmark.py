"""benchmarks/e2e_s2ft_lora.py on a tiny LLaMA (GQA) and the real E2E files: every arm trains on the
same batches, the trainable counts are the hand-computed budgets, the test and dev MRs are scored, an
arm's ``lr=`` is its learning rate, and the choice per method is made on dev."""

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
        "--eval_batch_size", "2", "--eval_mrs", "3", "--dev_mrs", "2", "--max_new_tokens", "4", "--loss_window", "2",
        "--no_meteor", "--threads", str(torch.get_num_threads())])
    s2ft = e2e_benchmark.run_one(args, "s2ft:head_ratio=0.25,channel_ratio=0.1")
    lora = e2e_benchmark.run_one(args, "lora:rank=2,alpha=4,lr=1e-3")
    full = e2e_benchmark.run_one(args, "full:lr=5e-5")
    zero = e2e_benchmark.run_one(args, "zero_shot")
    # S²FT: 2 of 8 (block, head) pairs x 8 o_proj columns x 32 rows + 12 of 128 channels x 32 down_proj rows
    assert s2ft["trainable_parameters"] == 2 * 8 * 32 + 12 * 32
    # LoRA r=2 on q (32 -> 32) and v (32 -> 16, two KV heads of 8) in 2 blocks
    assert lora["trainable_parameters"] == 2 * (2 * (32 + 32) + 2 * (32 + 16))
    assert full["trainable_parameters"] == full["total_parameters"]  # no strategy: every weight trains
    assert (s2ft["lr"], lora["lr"], full["lr"], zero["lr"]) == (2e-4, 1e-3, 5e-5, None)
    assert s2ft["steps"] == lora["steps"] == full["steps"] == 3 and zero["steps"] == 0
    assert zero["trainable_parameters"] == 0
    checksums = {r["data_checksum_first_10_batches"] for r in (s2ft, lora, full)}
    assert len(checksums) == 1 and 0 not in checksums
    for result in (s2ft, lora, full, zero):
        assert {"test/bleu", "test/nist", "test/rouge_l", "test/cider"} <= set(result["metrics"])
        assert {"dev/bleu", "dev/nist", "dev/rouge_l", "dev/cider"} == set(result["dev_metrics"])
        assert len(result["sample_outputs"]) == 3 and result["dev_mrs"] == 2  # one output per MR
    assert "| `zero_shot` |" in e2e_benchmark.format_table([s2ft, lora, full, zero])
    lora_low = {**lora, "run": "lora:lr=1e-4", "dev_metrics": {"dev/bleu": lora["dev_metrics"]["dev/bleu"] - 1}}
    assert e2e_benchmark.choose_on_dev([s2ft, lora_low, lora, full, zero]) == {
        "s2ft": s2ft["run"], "lora": lora["run"], "full": full["run"]}


def test_arm_spec_takes_lr_out_of_the_strategy_arguments(e2e_benchmark):
    assert e2e_benchmark.parse_arm("lora:rank=18,alpha=36,lr=5e-4", 2e-4) == ("lora", {"rank": 18, "alpha": 36}, 5e-4)
    assert e2e_benchmark.parse_arm("s2ft", 2e-4) == ("s2ft", {}, 2e-4)
    with pytest.raises(ValueError, match="full takes only lr"):
        e2e_benchmark.parse_arm("full:rank=2", 2e-4)

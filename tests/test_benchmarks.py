"""The benchmark harness's own arithmetic: run specs and the summary over repetitions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))  # the scripts import their helpers from compare.py
_SPEC = importlib.util.spec_from_file_location("compare", Path(__file__).parents[1] / "benchmarks" / "compare.py")
compare = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(compare)


def test_run_specs_parse_yaml_values_and_scientific_numbers():
    name, kwargs = compare.parse_run("pst:sparsity=0.9,learning_rate=2e-4,schedule={kind: cubic, final_warmup: 0.2}")
    assert name == "pst"
    assert kwargs == {"sparsity": 0.9, "learning_rate": 2e-4, "schedule": {"kind": "cubic", "final_warmup": 0.2}}


def row(run: str, step: float, memory: float) -> dict:
    return {"run": run, "metrics": {}, "sparsity": 0.0, "trainable_parameters": 1, "median_step_s": step,
            "peak_memory_mb": memory}


def test_summary_takes_medians_and_each_repetitions_own_dense_ratio():
    repetitions = []
    for dense_step, pst_step in [(1.0, 0.9), (2.0, 2.2), (1.0, 0.95)]:  # the machine slowed down in repetition 2
        results = [row("dense", dense_step, 100.0), row("pst", pst_step, 80.0)]
        compare._add_ratios(results)
        repetitions.append(results)
    dense, pst = compare.summarise(repetitions)
    assert dense["median_step_s"] == 1.0 and pst["median_step_s"] == 0.95
    assert pst["step_time_vs_dense"] == pytest.approx(0.95)  # median of 0.9, 1.1, 0.95
    assert pst["step_time_vs_dense_range"] == pytest.approx([0.9, 1.1])
    assert pst["peak_memory_vs_dense"] == pytest.approx(0.8) and pst["repetitions"] == 3
    assert "0.95 (0.90–1.10)" in compare.format_table([dense, pst])


_S2FT_SPEC = importlib.util.spec_from_file_location(
    "s2ft_memory", Path(__file__).parents[1] / "benchmarks" / "s2ft_memory.py")
s2ft_memory = importlib.util.module_from_spec(_S2FT_SPEC)
_S2FT_SPEC.loader.exec_module(s2ft_memory)


def test_s2ft_memory_benchmark_measures_every_component_on_a_tiny_llama(tmp_path):
    from sparseft.testing import make_tiny_model_dir

    directory = make_tiny_model_dir(tmp_path / "llama", "llama", task="causal-lm")  # 2 blocks, 4 heads of 8, d_ff 64
    args = s2ft_memory.parse_args([
        "--backbone", str(directory), "--batch_size", "2", "--seq_len", "8", "--steps", "2", "--warmup", "1",
        "--lora_rank", "2", "--head_ratio", "0.25", "--channel_ratio", "0.1", "--device", "cpu"])
    if importlib.util.find_spec("peft") is None:  # an optional extra: the rest is measured without it
        args.methods = [method for method in args.methods if method != "peft"]
    memory = [s2ft_memory.memory_run(method, args) for method in args.methods]
    full, lora, s2ft = (next(r for r in memory if r["method"] == m) for m in ("full", "lora", "s2ft"))
    assert full["trainable_parameters"] == full["total_parameters"]
    assert full["gradients"] == 4 * full["trainable_parameters"]  # float32
    assert full["optimizer_state"] == 2 * full["gradients"]  # AdamW: two moments
    assert full["weights"] >= full["gradients"]  # + buffers (rotary frequencies)
    # S²FT: 2 of 8 (block, head) pairs x 8 columns x 32 rows of o_proj + 12 of 128 channels x 32 rows
    assert s2ft["trainable_parameters"] == 2 * 8 * 32 + 12 * 32
    # LoRA r=2 per block: q 2(32+32), k and v 2(32+16), up and down 2(32+64)
    assert lora["trainable_parameters"] == 2 * (128 + 96 + 96 + 192 + 192)
    for result in memory:
        assert result["gradients"] == 4 * result["trainable_parameters"]
        assert result["optimizer_state"] == 8 * result["trainable_parameters"]
        assert result["peak_tensors"] >= result["weights"] + result["optimizer_state"]
        assert result["activations"] > 0 and isinstance(result["peak_rss"], int)  # RSS: meaningful in a fresh process
    assert s2ft["activations"] < full["activations"]  # frozen linears save no input
    if "peft" in args.methods:  # the same adapter: what is stored and saved is PEFT's, tensor for tensor
        peft = memory[args.methods.index("peft")]
        for key in ("trainable_parameters", "gradients", "optimizer_state", "activations", "weights"):
            assert lora[key] == peft[key], key
    timing = s2ft_memory.timing_run(args)
    assert timing["full"]["step_vs_full"] == 1.0 and all(timing[m]["median_step_s"] > 0 for m in args.methods)
    table = s2ft_memory.format_table(memory, timing)
    assert "| s2ft | 896 |" in table and "| full |" in table and "1.00 (1.00–1.00)" in table


@pytest.mark.slow
def test_device_check_dry_run_reports_every_part(tmp_path):
    """The GPU script's CPU dry run (toy sizes): every part runs and is reported, what needs CUDA says so."""
    import json
    import os
    import subprocess

    script = Path(__file__).parents[1] / "benchmarks" / "device_check.py"
    done = subprocess.run([sys.executable, str(script), "--dry_run", "--out", str(tmp_path)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "device_check.json").read_text())
    assert result["dry_run"] and list(result["parts"]) == ["smollm2", "two_four", "bert", "fsdp2"]
    for name, part in result["parts"].items():
        assert part["status"] == "ok" and part["exit_code"] == 0 and part["table"], (name, part.get("error"))
    smollm2 = result["parts"]["smollm2"]
    assert {r["method"] for r in smollm2["memory"]} >= {"full", "lora", "s2ft"} and "s2ft" in smollm2["timing"]
    assert result["parts"]["two_four"]["matmuls"] == "skipped: needs CUDA"
    assert [r["method"] for r in result["parts"]["bert"]["rows"]] == ["dense", "pst", "movement", "magnitude", "dsee"]
    assert result["parts"]["fsdp2"]["global_step"] == 4
    markdown = (tmp_path / "device_check.md").read_text()
    assert all(f"## {name} (ok" in markdown for name in result["parts"])

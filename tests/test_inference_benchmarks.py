"""The export-size and 2:4 latency benchmarks run end to end on a tiny model (CPU, dense fallback)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from sparseft.backbones.loading import load_backbone
from sparseft.export.pretrained import export_pretrained
from sparseft.sparse import prune_, sparsify
from sparseft.testing import tiny_config

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_size_meets_the_goals_on_target_matrices_and_round_trips():
    rows = {row["pattern"]: row for row in script("export_size").main(["--tiny", "bert", "--patterns", "90%", "2:4"])}
    assert rows["90%"]["target_ratio"] <= 0.2 and rows["2:4"]["target_ratio"] <= 0.6
    assert rows["2:4"]["target_ratio"] == pytest.approx(rows["2:4"]["compact_2_4_target_ratio"])  # same bytes
    assert all(row["compressed_file_bytes"] < row["dense_file_bytes"] for row in rows.values())
    assert all(row["max_abs_logit_difference"] == 0.0 for row in rows.values())


def latency_args(model_dir: Path, *extra: str) -> list[str]:
    return [str(model_dir), "--prune", "--dtype", "bf16", "--batch_sizes", "1", "4", "--seq_len", "16",
            "--rounds", "2", *extra]


def test_semi_structured_latency_dense_fallback_runs_both_arms_on_the_same_batches(tiny_bert_dir):
    result = script("semi_structured_latency").main(latency_args(tiny_bert_dir, "--dense_fallback"))
    assert result["converted_layers"] == 12 and "classifier" in result["skipped_layers"]
    assert [row["batch_size"] for row in result["rows"]] == [1, 4]
    for row in result["rows"]:
        assert row["max_abs_logit_difference"] == 0.0  # dense fallback: the same weights, the same kernels
        assert row["dense_ms"] > 0 and row["sparse_examples_per_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_semi_structured_latency_without_a_gpu_says_what_is_needed(tiny_bert_dir):
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        script("semi_structured_latency").main(latency_args(tiny_bert_dir))


def test_shrink_latency_removes_the_units_it_reports(tiny_bert_dir):
    rows = script("shrink_latency").main(["--model", str(tiny_bert_dir), "--variants", "dense", "heads 50%", "FFN 50%",
                                          "--rounds", "1", "--batch_size", "2", "--seq_len", "8", "--batches", "1"])
    ratios = {row["variant"]: row["flop_ratio"] for row in rows}
    # per block: q, k, v, o 4 x 32x32 and FFN 2 x 32x64 = 8192; pooler 32x32 + classifier 2x32 = 1088
    assert ratios["heads 50%"] == pytest.approx((2 * 6144 + 1088) / (2 * 8192 + 1088))
    assert ratios["FFN 50%"] == pytest.approx((2 * 6144 + 1088) / (2 * 8192 + 1088))
    assert rows[0]["latency_ratio"] == 1.0 and all(row["median_s"] > 0 for row in rows)


def test_latency_benchmark_loads_a_compressed_export(tmp_path):
    model = load_backbone("sequence-classification", config=tiny_config("bert"), num_labels=2)
    layers = sparsify(model)
    prune_(layers, [layer.dense().abs() for layer in layers], 0.5)  # something to compress
    export_pretrained(model, tmp_path, weight_format="compressed")
    loaded = script("latency").load_exported(tmp_path)
    assert type(loaded).__name__ == "CompressedBertForSequenceClassification"

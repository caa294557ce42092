"""The benchmark harness's own arithmetic: run specs and the summary over repetitions."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

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

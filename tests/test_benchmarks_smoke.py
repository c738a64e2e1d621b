"""Smoke tests: the speed benchmarks run end to end in --quick mode and write their JSON."""

import json
import math
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_quick(script: str, out_dir: Path) -> dict:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--out-dir", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "|---|" in completed.stdout  # the markdown table
    return json.loads((out_dir / script.replace(".py", ".json")).read_text())


def assert_common_keys(report: dict, benchmark: str) -> None:
    assert report["benchmark"] == benchmark
    assert report["quick"] is True
    machine = report["machine"]
    assert len(machine["load_average_1_5_15min"]) == 3
    assert machine["torch_threads"] >= 1
    assert len(report["load_average_before"]) == 3


def test_reparam_speed_report_has_every_vocabulary_and_method(tmp_path: Path) -> None:
    report = run_quick("reparam_speed.py", tmp_path)
    assert_common_keys(report, "reparam_speed")
    assert report["targets"] == {"speedup_vs_scipy_min": 10.0, "max_abs_error": 1e-5}
    assert [result["vocab_size"] for result in report["results"]] == [64, 30522, 50258]
    for result in report["results"]:
        assert isinstance(result["library_speedup_pass"], bool)
        assert isinstance(result["library_error_pass"], bool)
        methods = result["methods"]
        assert set(methods) == {
            "library",
            "scipy_spline",
            "library_float64_input",
            "library_inverse",
            "library_derivative",
        }
        for method in methods.values():
            timing = method["us_per_call"]
            assert set(timing) == {"wall_median", "wall_quartiles", "cpu_median", "cpu_quartiles"}
            assert timing["wall_median"] > 0
            assert math.isfinite(method["error"]) and method["error_measure"]
            assert method["speedup_vs_scipy"] > 0
    assert (tmp_path / "reparam_speed.md").read_text().count("| library |") == 3


def test_sampler_overhead_report_has_the_three_comparisons(tmp_path: Path) -> None:
    report = run_quick("sampler_overhead.py", tmp_path)
    assert_common_keys(report, "sampler_overhead")
    assert report["setup"]["parameters"] > 0
    assert report["targets"] == {"sampling_overhead_max": 0.03}
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == {"sampling fp32", "sampling bf16 autocast", "training step fp32"}
    for row in rows.values():
        assert math.isfinite(row["wall_overhead"]) and math.isfinite(row["cpu_overhead"])
        assert row["method_seconds"]["wall_median"] > 0
    assert isinstance(rows["sampling fp32"]["pass"], bool)
    assert rows["training step fp32"]["pass"] is None
    table = (tmp_path / "sampler_overhead.md").read_text()
    assert all(f"| {name} |" in table for name in rows)
    assert [cost["name"] for cost in report["library_only"]] == [
        "library_only_fp32",
        "library_only_bf16_autocast",
    ]

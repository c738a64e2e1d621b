"""Smoke test: benchmarks/distillation.py runs end to end in --quick mode and writes its report."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "distillation.py"
METHODS = ["v2", "lagrangian", "eulerian", "self", "regression", "v1"]
VERDICTS = ("PASS  ", "FAIL  ")


def test_quick_run_reports_every_task_and_method(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "|---|" in completed.stdout
    assert "Target: one-step FMLM valid rate" in completed.stdout
    assert completed.stdout.count("$ python examples/fmlm.py --teacher") == 2 * len(METHODS)
    verdict_lines = [line for line in completed.stdout.splitlines() if line[:6] in VERDICTS]
    assert len(verdict_lines) == len(METHODS)
    report = json.loads((tmp_path / "distillation.json").read_text())
    assert (tmp_path / "distillation.md").read_text().count("| FLM teacher (Euler) |") == 2
    assert report["benchmark"] == "distillation"
    assert report["quick"] is True
    assert report["precision"] == "fp32"
    assert len(report["load_average_before"]) == 3
    assert report["machine"]["torch_threads"] >= 1
    assert list(report["tasks"]) == ["alpha-repeat", "markov"]
    for outcome in report["tasks"].values():
        assert set(outcome) >= {"commands", "teacher_cpu_seconds", "reference", "rows"}
        samplers = [entry["sampler"] for entry in outcome["rows"]]
        expected = ["FLM teacher (Euler)", *(f"FMLM {method}" for method in METHODS)]
        assert samplers == [*expected, "v1 stage-1 Taylor map"]
        for entry in outcome["rows"]:
            assert set(entry) >= {"sampler", "nfe_per_step", "steps"}
            assert "error" not in entry, entry
            assert list(entry["steps"]) == ["1", "2", "4", "8"]
            for n_steps, cell in entry["steps"].items():
                assert cell["nfe"] == int(n_steps) * entry["nfe_per_step"]
            if entry["sampler"] != "v1 stage-1 Taylor map":  # the example's own process
                assert entry["cpu_seconds"] > 0 and entry["wall_seconds"] > 0
    verdicts = report["tasks"]["alpha-repeat"]["verdicts"]
    assert list(verdicts) == [f"FMLM {method}" for method in METHODS]
    assert all(isinstance(verdict, bool) for verdict in verdicts.values())

"""Smoke test: benchmarks/alpha_repeat.py runs both examples in --quick mode and writes its report."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "alpha_repeat.py"


def test_quick_run_reports_the_teacher_the_distillations_and_the_verdict(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--methods", "v2", "--trend-steps", "2"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=tmp_path,  # the default --out-dir: results/ under the working directory
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("$ python examples/fmlm.py --teacher") == 2
    verdicts = [line for line in completed.stdout.splitlines() if line[:6] in ("PASS  ", "FAIL  ")]
    assert len(verdicts) == 1 and "alpha-repeat, default v2" in verdicts[0]
    report = json.loads((tmp_path / "results" / "alpha_repeat.json").read_text())
    table = (tmp_path / "results" / "alpha_repeat.md").read_text()
    assert "| FMLM v2 |" in table and "| FMLM v2, --steps 2 |" in table
    assert "Target: default v2 one-step valid rate >= 0.9" in table
    assert report["quick"] is True and len(report["load_average_before"]) == 3
    assert report["teacher"]["cpu_seconds"] > 0
    assert list(report["teacher"]["steps"]) == ["1", "2", "4", "8"]
    labels = [entry["label"] for entry in report["distillations"]]
    assert labels == ["FMLM v2", "FMLM v2, --steps 2"]
    for entry in report["distillations"]:
        assert "error" not in entry, entry
        assert "--steps" not in entry["argv"] or entry["label"].endswith("--steps 2")
        expected = report["teacher"]["cpu_seconds"] + entry["cpu_seconds"]
        assert entry["total_cpu_seconds"] == expected
        for cell in entry["steps"].values():
            assert 0 <= cell["valid_rate"] <= 1 and 0 <= cell["letters"] <= 26
    # A smoke run cannot meet the target: the verdict follows the measures, not a constant.
    assert report["verdict"] is False and verdicts[0].startswith("FAIL")

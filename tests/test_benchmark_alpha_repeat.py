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


def run_benchmark(folder: Path, *flags: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", *flags],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=folder,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_screen_compares_each_lever_with_the_preset_from_one_teacher(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher.pt"
    screen = ["--screen", "3", "--teacher", str(teacher), "--levers"]
    first = run_benchmark(tmp_path, *screen, "", "--ema-decay 0.5")
    assert first.count("$ python examples/flm.py") == 1 and teacher.exists()
    second = run_benchmark(tmp_path, *screen, "--lr 0.01")  # the same teacher, not retrained
    assert "$ python examples/flm.py" not in second
    assert second.count("$ python examples/fmlm.py --teacher") == 1
    report = json.loads((tmp_path / "results" / "alpha_repeat_screen.json").read_text())
    runs = list(report["runs"].values())
    assert [run["lever"] for run in runs] == ["", "--ema-decay 0.5", "--lr 0.01"]
    for run in runs:  # fmlm.py's flags: v2, N steps, then the lever's own
        assert "error" not in run, run
        steps = run["argv"].index("--steps")
        lever = run["argv"][steps + 2 : steps + 2 + len(run["lever"].split())]
        assert run["argv"][steps - 2 : steps + 2] == ["--method", "v2", "--steps", "3"]
        assert lever == run["lever"].split() and run["cpu_seconds"] > 0
    (teacher_run,) = report["teachers"].values()
    assert teacher_run["teacher_flags"] == "" and teacher_run["cpu_seconds"] > 0
    assert runs[0]["presets"] == teacher_run["presets"]  # the examples' presets, recorded
    assert teacher_run["presets"]["fmlm.py"]["steps"] > 3  # (a screen's --steps overrides it)
    table = (tmp_path / "results" / "alpha_repeat_screen.md").read_text()
    preset_one_step = runs[0]["steps"]["1"]["valid_rate"]
    for run in runs[1:]:  # each lever's row: its one-step change from the preset's
        change = run["steps"]["1"]["valid_rate"] - preset_one_step
        assert f"| P1 | (preset) | 3 | `{run['lever']}` |" in table
        assert f"| {change:+.3f} |" in table
    assert "Largest one-step gain over the preset: `" in table
    run_benchmark(tmp_path, "--methods", "v2")  # the default run's table repeats the screen
    assert (
        "**Screening.** The levers screened"
        in (tmp_path / "results" / "alpha_repeat.md").read_text()
    )

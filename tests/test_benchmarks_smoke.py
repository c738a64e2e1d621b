"""The benchmark harness (flags, timing, training cache) and the reparam_speed smoke run."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowlm.data import TextCorpus

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import harness

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


def test_a_bad_flag_is_one_error_line_and_exit_code_2(tmp_path: Path) -> None:
    for flags in (["--threads", "0"], ["--repeats", "-3"], ["--no-such-flag"]):
        completed = subprocess.run(
            [sys.executable, str(BENCHMARKS / "speed.py"), *flags, "--out-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert completed.returncode == 2, flags
        lines = completed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), completed.stderr
        assert "Traceback" not in completed.stderr
    assert not list(tmp_path.iterdir())  # nothing ran


def test_interleaved_timing_calls_each_candidate_as_asked_in_shuffled_order() -> None:
    order: list[str] = []
    candidates = {name: (lambda name=name: order.append(name)) for name in "abcd"}
    timings = harness.time_interleaved(candidates, repeats=6, calls=3, warmup=2)
    assert all(order.count(name) == 2 + 6 * 3 for name in "abcd")
    timed_order = order[4 * 2 :]
    firsts = {timed_order[12 * repeat] for repeat in range(6)}
    assert len(firsts) > 1  # the order changes from one repeat to the next
    for timing in timings.values():
        assert len(timing.wall) == len(timing.cpu) == 6
        low, high = harness.quartiles(timing.wall)
        assert min(timing.wall) <= low <= timing.median <= high <= max(timing.wall)
    assert harness.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 4.0)


def test_learning_rate_warms_up_linearly_and_cosine_reaches_zero_at_the_last_step() -> None:
    settings = harness.TrainingSettings(steps=10, lr=1.0, warmup=4, schedule="cosine")
    rates = [settings.learning_rate(step) for step in range(10)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]
    assert rates[9] == 0.0
    assert rates[4:] == sorted(rates[4:], reverse=True)
    halfway = settings.learning_rate(4 + 3 - 1)  # 3 of the 6 decaying steps done
    assert math.isclose(halfway, 0.5)
    constant = harness.TrainingSettings(steps=10, lr=1.0, warmup=0)
    assert {constant.learning_rate(step) for step in range(10)} == {1.0}


def test_a_cached_model_is_loaded_without_training(tmp_path: Path) -> None:
    corpus = TextCorpus.split([("a", "abcdefgh" * 8)], 0.0)
    settings = harness.TrainingSettings(length=4, steps=3, batch_size=2, warmup=1, log_every=3)
    calls: list[int] = []

    def objective(model: torch.nn.Linear) -> harness.TokenObjective:
        def loss(tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            calls.append(len(tokens))
            return model(tokens.float()).square().mean()

        return loss

    path = tmp_path / "model.pt"
    first = torch.nn.Linear(4, 1)
    trained = harness.train_on_tokens(first, objective(first), settings, corpus, path, "t")
    assert calls == [2, 2, 2] and path.exists()
    assert harness.saved_settings(path) == settings
    second = torch.nn.Linear(4, 1)
    loaded = harness.train_on_tokens(second, objective(second), settings, corpus, path, "t")
    assert calls == [2, 2, 2]  # no step ran
    for name, value in trained.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name])
    assert not torch.equal(second.weight, first.weight)


def test_a_diverging_model_is_refused_and_not_saved(tmp_path: Path) -> None:
    corpus = TextCorpus.split([("a", "abcdefgh" * 8)], 0.0)
    settings = harness.TrainingSettings(length=4, steps=2, batch_size=2, warmup=0, log_every=1)
    model = torch.nn.Linear(4, 1)

    def objective(tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return model(tokens.float()).mean() * float("nan")

    with pytest.raises(FloatingPointError, match="step 1"):
        harness.train_on_tokens(model, objective, settings, corpus, tmp_path / "m.pt", "t")
    assert not list(tmp_path.iterdir())

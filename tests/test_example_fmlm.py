"""Tests of the FMLM reference assembly, examples/fmlm.py.

The examples are imported from their folder (as ``python examples/fmlm.py`` sees them) and
their ``main(argv)`` is called in-process. One smoke FLM teacher per task is trained by
examples/flm.py for the whole module; every distillation method is then run against it.
"""

import importlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import flowlm as fl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
METHODS = ("v2", "lagrangian", "eulerian", "self", "regression", "v1")
ONE_STAGE = METHODS[:-1]
STAGES = {method: [method] for method in ONE_STAGE} | {"v1": ["v1-stage1", "v1-stage2"]}


@pytest.fixture(scope="module")
def examples() -> Iterator[dict[str, ModuleType]]:
    """examples/flm.py and fmlm.py, imported with examples/ first on the path."""
    names = ("common", "flm", "fmlm")
    shadowed = {name: sys.modules.pop(name, None) for name in names}
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield {name: importlib.import_module(name) for name in names}
    finally:
        sys.path.remove(str(EXAMPLES))
        for name, module in shadowed.items():
            sys.modules.pop(name, None)
            if module is not None:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def fmlm(examples: dict[str, ModuleType]) -> ModuleType:
    return examples["fmlm"]


def train_teacher(flm: ModuleType, task: str, path: Path) -> Path:
    threads = torch.get_num_threads()
    try:
        flm.main(["--smoke", "--task", task, "--out", str(path)])
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.fixture(scope="module")
def teacher(examples: dict[str, ModuleType], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke FLM checkpoint on alpha-repeat (26 symbols, length 8)."""
    return train_teacher(examples["flm"], "alpha-repeat", tmp_path_factory.mktemp("t") / "a.pt")


@pytest.fixture(autouse=True)
def keep_thread_count() -> Iterator[None]:
    """main() sets torch's thread count; give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(fmlm: ModuleType, *args: str | Path) -> dict[str, Any]:
    return fmlm.main([str(arg) for arg in args])


def check_report(report: dict[str, Any], step_counts: list[str], nfe_per_step: int) -> None:
    assert list(report) == step_counts
    for n_steps, metrics in report.items():
        assert metrics["nfe"] == nfe_per_step * int(n_steps)
        assert 0 <= metrics["entropy"] <= math.log(8)
        assert 0 <= metrics["valid_rate"] <= 1


@pytest.mark.parametrize("method", METHODS)
def test_smoke_run_writes_the_documented_json(
    fmlm: ModuleType, teacher: Path, tmp_path: Path, method: str
) -> None:
    path = tmp_path / "metrics.json"
    result = run(fmlm, "--smoke", "--teacher", teacher, "--method", method, "--json", path)
    written = json.loads(path.read_text())
    assert written == result
    stages = STAGES[method]
    reports = ["steps", "teacher_steps"] + (["stage1_steps"] if method == "v1" else [])
    assert set(written) == {"task", "method", "train_steps", *stages, *reports}
    assert (written["task"], written["method"]) == ("alpha-repeat", method)
    assert written["train_steps"] == fmlm.SMOKE["steps"] * len(stages)
    check_report(written["steps"], ["1", "2", "4"], nfe_per_step=1)
    check_report(written["teacher_steps"], ["1", "8"], nfe_per_step=1)
    if method == "v1":
        check_report(written["stage1_steps"], ["1", "2", "4"], nfe_per_step=2)
    for stage in stages:
        losses = written[stage]["train_loss"]
        assert list(losses) == [str(step) for step in range(1, fmlm.SMOKE["steps"] + 1)]
        assert all(math.isfinite(loss) for loss in losses.values())


def test_markov_reports_the_exact_perplexity(
    examples: dict[str, ModuleType], fmlm: ModuleType, tmp_path: Path
) -> None:
    markov = train_teacher(examples["flm"], "markov", tmp_path / "markov.pt")
    result = run(fmlm, "--smoke", "--teacher", markov)
    assert result["task"] == "markov"
    for report in (result["steps"], result["teacher_steps"]):
        assert all(metrics["exact_ppl"] >= 1 for metrics in report.values())


RESUME_FLAGS = ["--smoke", "--dropout", "0.1", "--checkpoint-every", "2", "--schedule", "constant"]
"""A 2-step run stands in for an interrupted 4-step one: with a constant rate after the warm-up
its steps are the first two of the 4-step run (a cosine schedule depends on --steps)."""


@pytest.mark.parametrize("method", ONE_STAGE)
def test_resume_replays_the_uninterrupted_run_exactly(
    fmlm: ModuleType, teacher: Path, tmp_path: Path, method: str
) -> None:
    flags = [*RESUME_FLAGS, "--teacher", teacher, "--method", method]
    straight = run(fmlm, *flags, "--steps", "4", "--out", tmp_path / "straight.pt")
    run(fmlm, *flags, "--steps", "2", "--out", tmp_path / "resumed.pt")
    resumed = run(fmlm, *flags, "--steps", "4", "--out", tmp_path / "resumed.pt", "--resume")
    assert list(resumed[method]["train_loss"]) == ["3", "4"]
    assert resumed[method]["train_loss"] == {
        step: straight[method]["train_loss"][step] for step in "34"
    }
    assert resumed["steps"] == straight["steps"]


class SimulatedCrash(Exception):
    """Raised by the patched checkpoint writer."""


@pytest.mark.parametrize(
    ("crash_after_save", "replayed"),
    [(1, {"v1-stage1": "34", "v1-stage2": "1234"}), (3, {"v1-stage1": "", "v1-stage2": "34"})],
)
def test_v1_resumes_exactly_after_a_crash_in_either_stage(
    fmlm: ModuleType,
    teacher: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    crash_after_save: int,
    replayed: dict[str, str],
) -> None:
    """Checkpoints at steps 2 and 4 of each stage: saves 1, 2 in stage 1 and 3, 4 in stage 2."""
    flags = [*RESUME_FLAGS, "--teacher", teacher, "--method", "v1", "--steps", "4"]
    straight = run(fmlm, *flags, "--out", tmp_path / "straight.pt")
    real_save: Callable[[Path, dict[str, Any]], None] = fmlm.save_checkpoint
    saves: list[Path] = []

    def save_then_crash(path: Path, state: dict[str, Any]) -> None:
        real_save(path, state)
        saves.append(path)
        if len(saves) == crash_after_save:
            raise SimulatedCrash

    monkeypatch.setattr(fmlm, "save_checkpoint", save_then_crash)
    with pytest.raises(SimulatedCrash):
        run(fmlm, *flags, "--out", tmp_path / "resumed.pt")
    monkeypatch.undo()
    resumed = run(fmlm, *flags, "--out", tmp_path / "resumed.pt", "--resume")
    for stage, steps in replayed.items():
        losses = straight[stage]["train_loss"]
        assert resumed[stage]["train_loss"] == {step: losses[step] for step in steps}
    assert resumed["stage1_steps"] == straight["stage1_steps"]
    assert resumed["steps"] == straight["steps"]


def test_a_teacher_of_another_vocabulary_is_refused(fmlm: ModuleType, teacher: Path) -> None:
    with pytest.raises(ValueError, match=r"vocabulary of 26 symbols.*this task has 16"):
        run(fmlm, "--smoke", "--teacher", teacher, "--task", "markov")


def test_a_missing_teacher_is_refused(fmlm: ModuleType, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match=f"no FLM checkpoint at {missing}"):
        run(fmlm, "--smoke", "--teacher", missing)


def test_a_checkpoint_that_is_not_an_flm_is_refused(fmlm: ModuleType, tmp_path: Path) -> None:
    student = tmp_path / "fmlm.pt"
    torch.save({"stages": {}, "method": {}}, student)  # what examples/fmlm.py --out writes
    with pytest.raises(ValueError, match="is not an FLM checkpoint"):
        run(fmlm, "--smoke", "--teacher", student)


def random_jumps(batch: int, generator: torch.Generator) -> tuple[fl.Time, fl.Time]:
    """Start and end times ``t < s``, the last pair the whole path (0, 1)."""
    ends = torch.rand(batch, 2, generator=generator).sort(-1).values
    ends[-1] = torch.tensor([0.0, 1.0])
    return ends[:, 0], ends[:, 1]


@pytest.mark.parametrize("method", METHODS)
def test_before_training_the_student_is_the_teachers_euler_step(
    examples: dict[str, ModuleType], fmlm: ModuleType, teacher: Path, method: str
) -> None:
    network, config, _ = fmlm.load_teacher(teacher, torch.device("cpu"))
    vocab_size = network.output.out_features
    interpolant = examples["common"].build_interpolant(config, vocab_size)
    stages = fmlm.build_stages(fmlm.Method(name=method), config, network, interpolant, vocab_size)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, config.length, vocab_size, generator=generator)
    t, s = random_jumps(6, generator)
    teacher_predictor = fl.XPredictor(network)
    with torch.no_grad():
        student = fl.XPredMap(fl.XPredictor(stages[-1].network.eval()), interpolant, two_time=True)
        euler_step = fl.XPredMap(teacher_predictor, interpolant)(x, t, s)
        assert torch.equal(student(x, t, s), euler_step)
        if method == "v1":
            taylor = fl.TaylorMap(
                fl.XPredVelocity(teacher_predictor, interpolant), stages[0].network.eval()
            )
            ode_euler = fl.Euler(fl.XPredVelocity(teacher_predictor, interpolant))
            torch.testing.assert_close(taylor(x, t, s), ode_euler(x, t, s))
            torch.testing.assert_close(taylor(x, t, s), euler_step)

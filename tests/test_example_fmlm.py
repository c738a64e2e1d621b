"""Tests of the FMLM reference assembly, examples/fmlm.py.

The examples are imported from their folder (as ``python examples/fmlm.py`` sees them) and
their ``main(argv)`` is called in-process. One smoke FLM teacher per task is trained by
examples/flm.py for the whole module; every distillation method is then run against it.
"""

import importlib
import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import flowlm as fl
from flowlm.backbones import DiT
from flowlm.data import tokenizer_from_state, train_bpe
from flowlm.train import load_checkpoint, save_checkpoint

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
METHODS = ("v2", "lagrangian", "eulerian", "self", "regression", "v1")
ONE_STAGE = METHODS[:-1]
STAGES = {method: [method] for method in ONE_STAGE} | {"v1": ["v1-stage1", "v1-stage2"]}


@pytest.fixture(scope="module")
def examples() -> Iterator[dict[str, ModuleType]]:
    """examples/flm.py and fmlm.py, imported with examples/ first on the path."""
    names = ("flm", "fmlm")
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


def train_teacher(flm: ModuleType, task: str, path: Path, *flags: str) -> Path:
    threads = torch.get_num_threads()
    try:
        flm.main(["--smoke", "--task", task, "--out", str(path), *flags])
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.fixture(scope="module")
def teacher(examples: dict[str, ModuleType], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke FLM checkpoint on alpha-repeat (26 symbols, length 8)."""
    return train_teacher(examples["flm"], "alpha-repeat", tmp_path_factory.mktemp("t") / "a.pt")


@pytest.fixture(scope="module")
def sc_teacher(examples: dict[str, ModuleType], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke self-conditioned FLM checkpoint on alpha-repeat, its logits soft-capped at 5."""
    path = tmp_path_factory.mktemp("sc") / "sc.pt"
    return train_teacher(
        examples["flm"], "alpha-repeat", path, "--self-condition", "--soft-cap", "5"
    )


@pytest.fixture(autouse=True)
def keep_thread_count() -> Iterator[None]:
    """main() sets torch's thread count; give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(fmlm: ModuleType, *args: str | Path) -> dict[str, Any]:
    return fmlm.main([str(arg) for arg in args])


def refused(fmlm: ModuleType, capsys: pytest.CaptureFixture[str], *args: str | Path) -> str:
    """The one-line error of a configuration that main() refuses with exit code 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run(fmlm, *args)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def check_report(report: dict[str, Any], step_counts: list[str], nfe_per_step: int) -> None:
    assert list(report) == step_counts
    for n_steps, metrics in report.items():
        assert metrics["nfe"] == nfe_per_step * int(n_steps)
        assert 0 <= metrics["entropy"] <= math.log(8)
        assert 0 <= metrics["valid_rate"] <= 1
        assert len(metrics["samples"]) == 8 and all(len(text) == 8 for text in metrics["samples"])


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


def test_the_v2_recipe_options_are_saved_and_change_the_training(
    fmlm: ModuleType, teacher: Path, tmp_path: Path
) -> None:
    common = ["--smoke", "--teacher", teacher, "--method", "v2"]
    plain = run(fmlm, *common, "--out", tmp_path / "plain.pt")
    options = [*SPLIT_FLAGS, "--boundary-prob", "0.25", "--beta2", "0.95"]
    recipe = run(fmlm, *common, *options, "--out", tmp_path / "recipe.pt")
    state = load_checkpoint(tmp_path / "recipe.pt", kind="fmlm")
    config = state["config"]
    assert (config["diagonal_fraction"], config["pair_sampling"]) == (0.5, "sorted-uniform")
    assert (config["boundary_prob"], config["beta2"]) == (0.25, 0.95)
    assert state["stages"]["v2"]["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    defaults = load_checkpoint(tmp_path / "plain.pt", kind="fmlm")["config"]
    preset = fmlm.PRESETS["alpha-repeat"]  # the task's preset, else the Config defaults
    assert (defaults["diagonal_fraction"], defaults["beta2"]) == (
        preset.get("diagonal_fraction"),
        preset.get("beta2", 0.999),
    )
    assert (defaults["pair_sampling"], defaults["boundary_prob"]) == (
        preset.get("pair_sampling", "gap-then-start"),
        preset.get("boundary_prob"),
    )
    # The first step's loss comes before any update: another loss, on other pairs.
    assert plain["v2"]["train_loss"]["1"] != recipe["v2"]["train_loss"]["1"]


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
    saves: list[Path] = []

    def save_then_crash(path: Path, state: dict[str, Any]) -> str:
        digest = save_checkpoint(path, state)
        saves.append(path)
        if len(saves) == crash_after_save:
            raise SimulatedCrash
        return digest

    monkeypatch.setattr(fmlm.train, "save_checkpoint", save_then_crash)
    with pytest.raises(SimulatedCrash):
        run(fmlm, *flags, "--out", tmp_path / "resumed.pt")
    monkeypatch.undo()
    resumed = run(fmlm, *flags, "--out", tmp_path / "resumed.pt", "--resume")
    for stage, steps in replayed.items():
        losses = straight[stage]["train_loss"]
        assert resumed[stage]["train_loss"] == {step: losses[step] for step in steps}
    assert resumed["stage1_steps"] == straight["stage1_steps"]
    assert resumed["steps"] == straight["steps"]


@pytest.mark.parametrize("method", ["v2", "v1"])
def test_sample_only_neither_trains_nor_writes_the_checkpoint(
    fmlm: ModuleType, teacher: Path, tmp_path: Path, method: str
) -> None:
    student = tmp_path / "fmlm.pt"
    flags = ["--smoke", "--teacher", teacher, "--method", method, "--out", student]
    trained = run(fmlm, *flags)
    written = student.read_bytes()
    sampled = run(fmlm, *flags, "--sample-only", "--steps", "8")
    assert student.read_bytes() == written
    assert sampled["train_steps"] == trained["train_steps"]
    assert all(sampled[stage]["train_loss"] == {} for stage in STAGES[method])
    assert sampled["steps"] == trained["steps"]
    assert sampled["teacher_steps"] == trained["teacher_steps"]


def test_sample_only_without_a_student_is_refused(
    fmlm: ModuleType, teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "fmlm.pt"
    message = refused(fmlm, capsys, "--teacher", teacher, "--out", missing, "--sample-only")
    assert f"--sample-only: no student checkpoint at {missing}" in message


def test_a_retrained_teacher_is_not_reused_silently_with_an_old_student(
    examples: dict[str, ModuleType],
    fmlm: ModuleType,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    teacher = train_teacher(examples["flm"], "alpha-repeat", tmp_path / "flm.pt", "--steps", "2")
    student = tmp_path / "fmlm.pt"
    run(fmlm, "--smoke", "--teacher", teacher, "--out", student, "--steps", "2")
    train_teacher(examples["flm"], "alpha-repeat", teacher, "--steps", "2", "--seed", "1")
    for mode in ("--resume", "--sample-only"):
        message = refused(fmlm, capsys, "--smoke", "--teacher", teacher, "--out", student, mode)
        assert f"was distilled from another teacher than the one now at {teacher}" in message


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dim", "64"], "--dim 64 contradicts the teacher's 32: the student is the teacher's"),
        (["--depth", "3"], "--depth 3 contradicts the teacher's 1"),
        (["--heads", "4"], "--heads 4 contradicts the teacher's 2"),
        (["--length", "16"], "--length 16 contradicts the teacher's 8"),
        (["--task", "markov"], "--task markov contradicts the teacher's alpha-repeat"),
        (["--grad-clip", "-1"], "--grad-clip must be a positive finite gradient norm, got -1.0"),
        (["--lr", "1e30"], r"--lr must lie in (0, 1], got 1e+30"),
        (["--samples", "100000000"], "GiB, more than the"),
        (["--boundary-prob", "2"], "--boundary-prob must lie in [0, 1], got 2.0"),
        (["--teacher-steps", "0"], "--teacher-steps must be at least 1, got 0"),
        (["--method", "v3"], "argument --method: invalid choice: 'v3'"),
        (["--diagonal-fraction", "1.5"], "--diagonal-fraction must lie in [0, 1], got 1.5"),
        (["--beta2", "1"], "--beta2 must lie in [0, 1), got 1.0"),
        (["--pair-sampling", "uniform"], "argument --pair-sampling: invalid choice: 'uniform'"),
        (["--churn", "1"], "--churn must lie in [0, 1), got 1.0"),
        (["--churn", "-0.5"], "--churn must lie in [0, 1), got -0.5"),
        (["--soft-cap", "-2"], "--soft-cap must be a positive finite cap, got -2.0"),
        (["--self-condition"], "--self-condition True contradicts the teacher's False"),
    ],
)
def test_configuration_errors_are_one_line_and_exit_code_2(
    fmlm: ModuleType,
    teacher: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    assert message in refused(fmlm, capsys, "--smoke", "--teacher", teacher, *flags)


def test_the_command_line_prints_one_error_line_without_traceback(teacher: Path) -> None:
    launched = subprocess.run(
        [sys.executable, str(EXAMPLES / "fmlm.py"), "--teacher", str(teacher), "--dim", "64"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert launched.returncode == 2
    assert launched.stderr.startswith("error: --dim 64 contradicts the teacher's 32")
    assert launched.stderr.count("\n") == 1


def test_a_missing_teacher_is_refused(
    fmlm: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.pt"
    assert f"no FLM checkpoint at {missing}" in refused(fmlm, capsys, "--teacher", missing)


def test_a_student_given_as_the_teacher_is_refused(
    fmlm: ModuleType, teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    student = tmp_path / "fmlm.pt"
    run(fmlm, "--smoke", "--teacher", teacher, "--out", student, "--steps", "1")
    assert "is not an 'flm' checkpoint" in refused(fmlm, capsys, "--teacher", student)
    message = refused(fmlm, capsys, "--teacher", teacher, "--out", teacher, "--resume")
    assert "is not an 'fmlm' checkpoint: it holds an 'flm' checkpoint" in message


def test_a_corrupted_teacher_is_refused(
    fmlm: ModuleType, teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = bytearray(teacher.read_bytes())
    raw[-64:] = bytes(b ^ 0xFF for b in raw[-64:])
    (tmp_path / "bad.pt").write_bytes(bytes(raw))
    message = refused(fmlm, capsys, "--teacher", tmp_path / "bad.pt")
    assert "checksum does not match its content" in message


def random_jumps(batch: int, generator: torch.Generator) -> tuple[fl.Time, fl.Time]:
    """Start and end times ``t < s``, the last pair the whole path (0, 1)."""
    ends = torch.rand(batch, 2, generator=generator).sort(-1).values
    ends[-1] = torch.tensor([0.0, 1.0])
    return ends[:, 0], ends[:, 1]


@pytest.mark.parametrize("stage", ["v2", "v1-stage1", "v1-stage2"])
def test_before_training_the_student_is_the_teachers_euler_step(
    fmlm: ModuleType, teacher: Path, stage: str
) -> None:
    state = load_checkpoint(teacher)
    config = fmlm.Config(**{name: state["config"][name] for name in fmlm.MODEL})
    network = DiT(26, config.dim, config.depth, config.heads, dropout=0.0)
    network.load_state_dict(state["ema"])
    interpolant = fl.LinearInterpolant(reparam=fl.TokenAccuracy(26))
    student_network: Callable[..., DiT] = fmlm.student_network
    student = student_network(network, config, stage).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, config.length, 26, generator=generator)
    t, s = random_jumps(6, generator)
    teacher_predictor = fl.XPredictor(network.eval())
    with torch.no_grad():
        euler_step = fl.XPredMap(teacher_predictor, interpolant)(x, t, s)
        if stage == "v1-stage1":  # the Taylor map x + d v + d² g / 2 with g = 0 at init
            velocity = fl.XPredVelocity(teacher_predictor, interpolant)
            torch.testing.assert_close(fl.TaylorMap(velocity, student)(x, t, s), euler_step)
        else:
            student_map = fl.XPredMap(fl.XPredictor(student), interpolant, two_time=True)
            assert torch.equal(student_map(x, t, s), euler_step)


SPLIT_FLAGS = ["--diagonal-fraction", "0.5", "--pair-sampling", "sorted-uniform"]


@pytest.mark.parametrize(
    ("method", "teacher_fixture", "extra"),
    [("v2", "teacher", []), ("v2", "teacher", SPLIT_FLAGS), ("v1", "teacher", []),
     ("v2", "sc_teacher", []), ("v2", "sc_teacher", SPLIT_FLAGS)],
)  # fmt: skip
def test_the_distillation_loop_reads_the_host_only_at_log_and_checkpoint_steps(
    fmlm: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    method: str,
    teacher_fixture: str,
    extra: list[str],
) -> None:
    """3 and 9 steps per stage, logged and saved at the last one only: the same host reads."""
    calls: list[str] = []
    for name in ("item", "__bool__", "cpu", "tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code.co_filename
            if "torch/optim/" not in caller:  # AdamW's step counters live on the host
                calls.append(caller)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    teacher = request.getfixturevalue(teacher_fixture)  # sc_teacher: self-conditioned, capped
    counts = []
    for steps in ("3", "9"):
        calls.clear()
        flags = [
            "--log-every",
            "100",
            "--checkpoint-every",
            "100",
            "--out",
            tmp_path / f"{steps}.pt",
        ]
        argv = ["--smoke", "--teacher", teacher, "--method", method, "--steps", steps, *extra]
        run(fmlm, *argv, *flags)
        counts.append(len(calls))
    assert counts[0] > 0 and counts[0] == counts[1]


# ---------------------------------------------------------------------------- ablation flags
@pytest.mark.parametrize("method", ["v2", "v1"])
def test_a_self_conditioned_teacher_is_distilled_into_a_self_conditioned_student(
    examples: dict[str, ModuleType],
    fmlm: ModuleType,
    sc_teacher: Path,
    tmp_path: Path,
    method: str,
) -> None:
    student = tmp_path / "fmlm.pt"
    result = run(fmlm, "--smoke", "--teacher", sc_teacher, "--method", method, "--out", student)
    check_report(result["steps"], ["1", "2", "4"], nfe_per_step=1)  # no estimate
    check_report(result["self_conditioned_steps"], ["1", "2", "4"], nfe_per_step=2)
    check_report(result["previous_estimate_steps"], ["1", "2", "4"], nfe_per_step=1)
    assert result["previous_estimate_steps"]["1"] == result["steps"]["1"]  # no step before
    check_report(result["teacher_steps"], ["1", "8"], nfe_per_step=1)  # its estimate passed on
    state = load_checkpoint(student, kind="fmlm")
    assert state["config"]["self_condition"]
    preset = fmlm.PRESETS["alpha-repeat"].get("diagonal_fraction")  # the task's split applies
    assert state["config"]["diagonal_fraction"] == preset
    assert state["config"]["soft_cap"] == 5.0  # the teacher's cap by default
    assert "previous_embedding.weight" in state["stages"][STAGES[method][-1]]["ema"]
    if method == "v2":  # the teacher is sampled exactly as examples/flm.py samples it
        flm = examples["flm"]
        threads = torch.get_num_threads()
        sampled = flm.main(["--sample-only", "--out", str(sc_teacher), "--sample-steps", "1", "8"])
        torch.set_num_threads(threads)
        assert result["teacher_steps"] == sampled["steps"]


SC_REFUSALS = {
    "--no-self-condition": "--self-condition False contradicts the teacher's True",
}
"""What a self-conditioned teacher refuses, by flags."""


@pytest.mark.parametrize("fraction", ["0.5", "0.25"])
def test_a_resumed_self_conditioned_split_distillation_replays_the_uninterrupted_one(
    fmlm: ModuleType,
    sc_teacher: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fraction: str,
) -> None:
    """The student's estimate is bound to its rows: the diagonal split splits them too."""
    for flags, message in SC_REFUSALS.items():
        assert message in refused(fmlm, capsys, "--smoke", "--teacher", sc_teacher, *flags.split())
    flags = [*RESUME_FLAGS, "--teacher", sc_teacher, "--diagonal-fraction", fraction]
    straight = run(fmlm, *flags, "--steps", "4", "--out", tmp_path / "straight.pt")
    run(fmlm, *flags, "--steps", "2", "--out", tmp_path / "resumed.pt")
    resumed = run(fmlm, *flags, "--steps", "4", "--out", tmp_path / "resumed.pt", "--resume")
    assert resumed["v2"]["train_loss"] == {
        step: straight["v2"]["train_loss"][step] for step in "34"
    }
    assert all(math.isfinite(loss) for loss in straight["v2"]["train_loss"].values())
    for report in ("steps", "self_conditioned_steps", "previous_estimate_steps", "teacher_steps"):
        assert resumed[report] == straight[report]
    state = load_checkpoint(tmp_path / "resumed.pt", kind="fmlm")
    assert state["config"]["diagonal_fraction"] == float(fraction)


def test_self_conditioning_guidance_guides_the_students_previous_estimate_sampler(
    fmlm: ModuleType,
    teacher: Path,
    sc_teacher: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """z(x̂₁') + W (z(x̂₁') - z(0)): W = 0 is the unguided sampler, a large W moves it."""
    common = ["--smoke", "--teacher", sc_teacher, "--steps", "2"]
    trained = run(fmlm, *common, "--out", tmp_path / "plain.pt")
    unguided = trained["previous_estimate_steps"]
    sample = [*common, "--sample-only", "--self-condition-guidance"]
    zero = run(fmlm, *sample, "0", "--out", tmp_path / "plain.pt")["previous_estimate_steps"]
    assert zero == unguided
    large = run(fmlm, *sample, "1000", "--out", tmp_path / "plain.pt")
    check_report(large["previous_estimate_steps"], ["1", "2", "4"], nfe_per_step=1)  # one batch
    assert large["previous_estimate_steps"]["1"] == unguided["1"]  # no estimate yet: z(0) alone
    assert large["previous_estimate_steps"] != unguided  # w large enough for the tiny input
    for report in ("steps", "self_conditioned_steps", "teacher_steps"):  # not guided
        assert large[report] == trained[report]
    # Saved like the other sampling settings, and read back with --sample-only.
    saved = run(fmlm, *common, "--self-condition-guidance", "1000", "--out", tmp_path / "w.pt")
    assert (
        load_checkpoint(tmp_path / "w.pt", kind="fmlm")["config"]["self_condition_guidance"] == 1000
    )
    again = run(
        fmlm, "--smoke", "--teacher", sc_teacher, "--sample-only", "--out", tmp_path / "w.pt"
    )
    assert saved["previous_estimate_steps"] == again["previous_estimate_steps"]
    assert saved["previous_estimate_steps"] == large["previous_estimate_steps"]
    refusals = {
        (teacher, "1"): "error: --self-condition-guidance guides a --self-condition model",
        (sc_teacher, "-1"): "error: --self-condition-guidance must be >= 0, got -1.0",
    }
    for (checkpoint, weight), message in refusals.items():
        args = ("--smoke", "--teacher", checkpoint, "--self-condition-guidance", weight)
        assert refused(fmlm, capsys, *args) == message


def test_a_student_soft_cap_far_above_the_logits_is_the_uncapped_student(
    fmlm: ModuleType, teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--smoke", "--teacher", teacher, "--steps", "2"]
    plain = run(fmlm, *common)
    far = run(fmlm, *common, "--soft-cap", "1e6", "--out", tmp_path / "far.pt")
    # The student starts as the teacher's step: KL losses of 1e-8 to 1e-5, rounding-sized.
    assert far["v2"]["train_loss"] == pytest.approx(plain["v2"]["train_loss"], rel=0, abs=1e-6)
    for n_steps, metrics in plain["steps"].items():
        assert far["steps"][n_steps]["samples"] == metrics["samples"]
    assert far["teacher_steps"] == plain["teacher_steps"]  # the teacher keeps its own (no) cap
    assert run(fmlm, *common, "--soft-cap", "0.05")["v2"]["train_loss"] != plain["v2"]["train_loss"]
    args = ("--smoke", "--teacher", teacher, "--out", tmp_path / "far.pt", "--resume")
    message = refused(fmlm, capsys, *args, "--soft-cap", "2")
    assert message == "error: --soft-cap 2.0 contradicts the student's 1000000.0: another --out"


def test_churn_renoises_between_steps_and_zero_churn_is_the_deterministic_sampler(
    fmlm: ModuleType, teacher: Path, tmp_path: Path
) -> None:
    student = tmp_path / "fmlm.pt"
    flags = ["--smoke", "--teacher", teacher, "--out", student]
    trained = run(fmlm, *flags)  # --churn 0, the default
    churned = run(fmlm, *flags, "--sample-only", "--churn", "0.5")
    assert churned["steps"]["1"] == trained["steps"]["1"]  # a step onto the data: the map's jump
    assert [churned["steps"][n]["nfe"] for n in "24"] == [2, 4]  # one jump per step
    assert churned["steps"]["4"]["samples"] != trained["steps"]["4"]["samples"]
    assert churned["teacher_steps"] == trained["teacher_steps"]  # only the student is churned
    assert run(fmlm, *flags, "--sample-only", "--churn", "0.5")["steps"] == churned["steps"]
    # --churn 0: the student's EMA rolled out by its deterministic map from the report's noise.
    state = load_checkpoint(student, kind="fmlm")
    config = fmlm.Config(**state["config"] | {"sample_steps": (4,)})
    assert config.churn == 0.0
    network = DiT(26, config.dim, config.depth, config.heads, two_time=True, dropout=0.0)
    network.load_state_dict(state["stages"]["v2"]["ema"])
    interpolant = fl.LinearInterpolant(reparam=fl.TokenAccuracy(26))
    student_map = fl.XPredMap(fl.XPredictor(network.eval()), interpolant, two_time=True)
    generator = fmlm.train.seeded_generator(config.seed, "sample")
    noise = torch.randn((config.samples, config.length, 26), generator=generator)
    with torch.no_grad():
        x = fl.rollout(student_map, noise, fl.time_grid(4)).x
    task = fmlm.task_of(config, tokenizer_from_state(state["tokenizer"]))
    assert task.decode(fl.decode(x)) == trained["steps"]["4"]["samples"]


# ---------------------------------------------------------------------------- tokenizers, presets
def verse_lines(count: int) -> list[str]:
    """``count`` distinct lines of Genesis 1 (each verse with its line number)."""
    verses = [
        "In the beginning God created the heaven and the earth.",
        "And the earth was without form, and void; and darkness was upon the face of the deep.",
        "And the Spirit of God moved upon the face of the waters.",
        "And God said, Let there be light: and there was light.",
    ]
    return [f"{verses[i % len(verses)]} {i}" for i in range(count)]


def test_a_bpe_teacher_is_distilled_with_its_own_tokenizer(
    examples: dict[str, ModuleType],
    fmlm: ModuleType,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "verses.txt").write_text("\n".join(verse_lines(40)))
    flags = ["--text", str(tmp_path / "verses.txt"), "--tokenizer", "bpe:300", "--length", "16"]
    teacher = train_teacher(examples["flm"], "corpus", tmp_path / "flm.pt", *flags)
    teacher_tokenizer = load_checkpoint(teacher, kind="flm")["tokenizer"]

    def no_training(*args: object) -> None:
        raise AssertionError("a BPE was trained again")

    monkeypatch.setattr("flowlm.data.specs.train_bpe", no_training)  # the teacher's is reused
    student = tmp_path / "fmlm.pt"
    common = [*RESUME_FLAGS, "--teacher", teacher, "--out", student]
    straight = run(fmlm, *common, "--steps", "4", "--out", tmp_path / "straight.pt")
    run(fmlm, *common, "--steps", "2")
    assert load_checkpoint(student, kind="fmlm")["tokenizer"] == teacher_tokenizer
    resumed = run(fmlm, *common, "--steps", "4", "--resume")
    assert resumed["v2"]["train_loss"] == {
        step: straight["v2"]["train_loss"][step] for step in "34"
    }
    sampled = run(fmlm, *common, "--steps", "4", "--sample-only")
    assert sampled["steps"] == resumed["steps"] == straight["steps"]
    assert all(isinstance(text, str) for text in sampled["steps"]["1"]["samples"])
    message = refused(fmlm, capsys, "--teacher", teacher, "--tokenizer", "char")
    assert message == (
        "error: --tokenizer char contradicts the teacher's bpe:300: the student is the "
        "teacher's network"
    )


@pytest.mark.parametrize(("preset", "length"), [("lm1b", 128), ("owt", 1024)])
def test_each_paper_presets_smoke_version_builds_the_papers_shapes_scaled_down(
    examples: dict[str, ModuleType], fmlm: ModuleType, tmp_path: Path, preset: str, length: int
) -> None:
    """--preset P --smoke: P's sequence length and data layout, a tiny DiT, P's distillation.

    A BPE saved as a tokenizer.json stands in for bert-base-uncased / gpt2 and a local JSON
    Lines file for LM1B / OpenWebText (nothing is downloaded).
    """
    flm = examples["flm"]
    stand_in = train_bpe(verse_lines(200), 400)
    (tmp_path / "tokenizer.json").write_text(stand_in.definition)
    rows = [" ".join(verse_lines(200)[i : i + 16]) for i in range(0, 200, 2)]  # 100 documents
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    data = [
        "--tokenizer",
        str(tmp_path / "tokenizer.json"),
        "--dataset",
        str(tmp_path / "data.jsonl"),
    ]
    teacher = train_teacher(flm, "corpus", tmp_path / "flm.pt", "--preset", preset, *data)
    state = load_checkpoint(teacher, kind="flm")
    config = state["config"]
    full = flm.PAPER_PRESETS[preset]
    assert (config["length"], config["lines"], config["dataset"]) == (
        length,
        preset == "lm1b",  # LM1B: one padded sentence per row; OpenWebText: packed
        str(tmp_path / "data.jsonl"),
    )
    assert config["limit"] == flm.PAPER_SMOKE["limit"] and not config["bf16"]
    assert tokenizer_from_state(state["tokenizer"]) == stand_in.__class__.from_file(
        tmp_path / "tokenizer.json"
    )
    vocab = stand_in.vocab_size
    dim = flm.SMOKE["dim"]
    assert dim < full["dim"] and flm.SMOKE["depth"] < full["depth"]
    assert state["model"]["output.weight"].shape == (vocab, dim)
    network = DiT(vocab, dim, flm.SMOKE["depth"], flm.SMOKE["heads"])
    network.load_state_dict(state["model"])  # exactly the scaled-down DiT, nothing else
    result = run(fmlm, "--smoke", "--teacher", teacher, "--out", tmp_path / "fmlm.pt")
    samples = result["steps"]["1"]["samples"]
    assert len(samples) == fmlm.SMOKE["samples"] and all(isinstance(s, str) for s in samples)
    student = load_checkpoint(tmp_path / "fmlm.pt", kind="fmlm")["config"]
    paper = fmlm.PAPER_PRESETS[preset]
    assert student["boundary_prob"] == paper["boundary_prob"] == 1 / 32
    assert student["ema_decay"] == paper["ema_decay"] and student["length"] == length

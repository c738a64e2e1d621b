"""Tests of flowlm.train: checkpoints, the weight average, seeds, the schedule, the processes."""

import argparse
import dataclasses
import hashlib
import io
import itertools
import math
import re
from pathlib import Path
from typing import Literal

import pytest
import torch
from torch import nn

from flowlm import train
from flowlm.train import (
    EMA,
    MAGIC,
    ArgumentParser,
    CheckpointError,
    Processes,
    add_settings,
    atomic_write,
    check_settings,
    checkpoint_digest,
    derived_seed,
    fail,
    learning_rate,
    load_checkpoint,
    remove_partial_files,
    require_memory,
    save_checkpoint,
    seeded_generator,
    transformer_step_bytes,
)

REFUSED = r"is not a usable flowlm checkpoint \(.*\): the file is empty, truncated, corrupted"


def saved_state(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    state: dict[str, object] = {"step": 7, "weights": torch.randn(64, 64), "name": "run"}
    path = tmp_path / "run.pt"
    save_checkpoint(path, state)
    return path, state


def test_a_checkpoint_round_trips_with_its_digest(tmp_path: Path) -> None:
    path, state = saved_state(tmp_path)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["name"] == "run"
    assert torch.equal(loaded["weights"], state["weights"])  # pyright: ignore[reportArgumentType]
    assert len(checkpoint_digest(path)) == 64
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_the_digest_changes_with_the_content(tmp_path: Path) -> None:
    first = save_checkpoint(tmp_path / "a.pt", {"w": torch.zeros(3)})
    second = save_checkpoint(tmp_path / "a.pt", {"w": torch.ones(3)})
    assert first != second == checkpoint_digest(tmp_path / "a.pt")


@pytest.mark.parametrize("where", ["payload", "header"])
def test_64_flipped_bytes_are_refused(tmp_path: Path, where: str) -> None:
    path, _ = saved_state(tmp_path)
    raw = bytearray(path.read_bytes())
    start = len(raw) // 2 if where == "payload" else 0
    for i in range(start, start + 64):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=REFUSED):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=REFUSED):
        checkpoint_digest(path)


@pytest.mark.parametrize("damage", ["empty", "text", "truncated", "a plain torch.save"])
def test_damaged_or_foreign_files_get_the_same_message(tmp_path: Path, damage: str) -> None:
    path, _ = saved_state(tmp_path)
    raw = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("step: 7\nweights: [...]\n")
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) - 100])
    else:
        torch.save({"step": 7}, path)
    with pytest.raises(CheckpointError, match=REFUSED):
        load_checkpoint(path)


def test_a_missing_checkpoint_is_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_an_intact_file_that_is_not_a_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    buffer = io.BytesIO()
    torch.save([1, 2], buffer)
    payload = buffer.getvalue()
    path.write_bytes(MAGIC + hashlib.sha256(payload).digest() + payload)
    with pytest.raises(CheckpointError, match="it holds a list, not a dict"):
        load_checkpoint(path)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.pt"
    atomic_write(path, b"old")

    def crash(descriptor: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("flowlm.train.os.fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]


def test_partial_files_of_a_killed_write_are_removed_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "run.pt"
    atomic_write(path, b"kept")
    stale = [tmp_path / ".run.pt.k2j3.partial", tmp_path / ".run.pt.x9.partial"]
    others = [tmp_path / ".other.pt.k2j3.partial", tmp_path / "run.pt.partial.txt"]
    for file in stale + others:
        file.write_bytes(b"half")
    assert remove_partial_files(path) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted([path, *others])
    assert remove_partial_files(path) == []


def test_ema_follows_the_recursion(one_thread: None) -> None:
    """After updates with weights w_1..w_k: e_k = b e_{k-1} + (1 - b) w_k, e_0 = w_0."""
    torch.manual_seed(0)
    model = nn.BatchNorm1d(3)  # a weight, a bias and buffers
    decay = 0.9
    ema = EMA(model, decay)
    expected = [p.detach().double().clone() for p in model.parameters()]
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(4, 3))  # moves the running statistics (buffers)
        ema.update(model)
        expected = [
            decay * e + (1 - decay) * p.double()
            for e, p in zip(expected, model.parameters(), strict=True)
        ]
    for average, reference in zip(ema.module.parameters(), expected, strict=True):
        torch.testing.assert_close(average.double(), reference, rtol=1e-6, atol=1e-6)
    for average, current in zip(ema.module.buffers(), model.buffers(), strict=True):
        assert torch.equal(average, current)
    assert not any(p.requires_grad for p in ema.module.parameters())
    restored = EMA(nn.BatchNorm1d(3), decay)
    restored.load_state_dict(ema.state_dict())
    assert all(
        torch.equal(a, b)
        for a, b in zip(restored.module.parameters(), ema.module.parameters(), strict=True)
    )


def test_ema_refuses_a_decay_outside_the_unit_interval() -> None:
    with pytest.raises(ValueError, match=r"decay must lie in \(0, 1\), got 1.5"):
        EMA(nn.Linear(1, 1), 1.5)


def test_seeded_generators_replay_and_differ_by_rank_and_step() -> None:
    def draw(*indices: int) -> torch.Tensor:
        return torch.randn(1000, generator=seeded_generator(3, "noise", *indices))

    assert torch.equal(draw(5, 0), draw(5, 0))
    assert not torch.equal(draw(5, 0), draw(5, 1))
    assert not torch.equal(draw(5, 0), draw(6, 0))
    assert derived_seed(3, "noise", 5) != derived_seed(3, "data", 5)
    assert 0 <= derived_seed(3, "noise", 5) < 2**63


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_schedule(schedule: Literal["constant", "cosine"]) -> None:
    def rate(step: int) -> float:
        return learning_rate(step, peak=2.0, warmup=10, total=110, schedule=schedule)

    assert [rate(step) for step in (0, 4, 9)] == pytest.approx([0.2, 1.0, 2.0])
    after_warmup = [rate(step) for step in range(10, 110)]
    if schedule == "constant":
        assert after_warmup == [2.0] * 100
    else:  # (1 + cos(pi p)) with p = 0.5 at step 59, 1 at the last step
        assert rate(59) == pytest.approx(1.0)
        assert after_warmup[-1] == pytest.approx(0.0, abs=1e-12)
        assert all(a > b for a, b in itertools.pairwise(after_warmup))


def test_one_process_is_the_identity() -> None:
    alone = Processes(rank=0, world_size=1, device=torch.device("cpu"))
    model = nn.Linear(2, 2)
    value = torch.tensor(3.0)
    assert alone.is_main and alone.wrap(model) is model and alone.mean(value) is value
    assert alone.share({"a": 1}) == {"a": 1}


def test_memory_that_cannot_fit_is_refused_before_allocating() -> None:
    cpu = torch.device("cpu")
    small = transformer_step_bytes(32, 64, 70, dim=128, depth=4, heads=4)
    require_memory(small, cpu, "the corpus preset")
    huge = transformer_step_bytes(32, 100_000, 70, dim=128, depth=4, heads=4)
    assert huge > 2**40  # the length^2 attention alone: 32 * 4 * 4 * 1e10 floats
    with pytest.raises(ValueError, match=r"--length 100000 needs about \d+\.\d GiB, more than"):
        require_memory(huge, cpu, "--length 100000")
    assert math.isclose(
        transformer_step_bytes(2, 8, 10, 16, 1, 2) / 4,
        16 * 2 * 8 * 10 + 2 * 8 * (24 * 16 + 2 * 2 * 8) + 16 * (12 * 16 * 16 + 2 * 10 * 16),
    )


def test_a_checkpoint_of_another_kind_is_named(tmp_path: Path) -> None:
    path = tmp_path / "student.pt"
    save_checkpoint(path, {"kind": "fmlm"})
    assert load_checkpoint(path, kind="fmlm") == {"kind": "fmlm"}
    with pytest.raises(CheckpointError, match="is not an 'flm' checkpoint: it holds an 'fmlm'"):
        load_checkpoint(path, kind="flm")
    save_checkpoint(path, {"step": 1})
    with pytest.raises(CheckpointError, match="it holds a checkpoint without a kind"):
        load_checkpoint(path, kind="flm")


@dataclasses.dataclass(frozen=True)
class Settings:
    task: str = "corpus"
    text: str | None = None
    lr: float = 3e-4
    boundary_prob: float | None = None
    steps: int = 10
    sample_steps: tuple[int, ...] = (1, 2)
    bf16: bool = False


def settings_parser() -> ArgumentParser:
    parser = ArgumentParser()
    add_settings(parser, Settings, {"task": ("corpus", "markov")})
    return parser


def test_settings_flags_are_typed_and_absent_unless_given() -> None:
    parser = settings_parser()
    assert vars(parser.parse_args([])) == {}
    given = vars(
        parser.parse_args(
            "--task markov --text a.txt --lr 0.1 --boundary-prob 0.5 --steps 3 "
            "--sample-steps 4 8 --no-bf16".split()
        )
    )
    assert given == {
        "task": "markov",
        "text": "a.txt",
        "lr": 0.1,
        "boundary_prob": 0.5,
        "steps": 3,
        "sample_steps": (4, 8),
        "bf16": False,
    }
    assert dataclasses.replace(Settings(), **given).sample_steps == (4, 8)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ("--steps ten", "error: argument --steps: invalid int value: 'ten'\n"),
        ("--task poetry", "error: argument --task: invalid choice: 'poetry' (choose from "),
        ("--sample-steps", "error: argument --sample-steps: expected at least one argument\n"),
        ("--stpes 3", "error: unrecognized arguments: --stpes 3\n"),
    ],
)
def test_parse_errors_are_one_line_with_exit_code_2(
    capsys: pytest.CaptureFixture[str], argv: str, message: str
) -> None:
    with pytest.raises(SystemExit) as stopped:
        settings_parser().parse_args(argv.split())
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(message) and error.count("\n") == 1


def test_fail_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        fail("--lr must lie in (0, 1], got 1e+30")
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "error: --lr must lie in (0, 1], got 1e+30\n"


@dataclasses.dataclass(frozen=True)
class Training:
    lr: float = 3e-4
    grad_clip: float = 1.0
    warmup: int = 10
    dropout: float = 0.0
    ema_decay: float = 0.99
    sample_steps: tuple[int, ...] = (1, 8)
    batch_size: int = 8
    steps: int = 100


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lr": 1e30}, r"--lr must lie in \(0, 1\], got 1e\+30"),
        ({"lr": -1e-3}, r"--lr must lie in \(0, 1\], got -0.001"),
        ({"lr": math.nan}, r"--lr must lie in \(0, 1\], got nan"),
        ({"grad_clip": -1.0}, "--grad-clip must be a positive finite gradient norm, got -1.0"),
        ({"grad_clip": math.inf}, "--grad-clip must be a positive finite gradient norm, got inf"),
        ({"warmup": -1}, "--warmup must be at least 0, got -1"),
        ({"dropout": 1.0}, r"--dropout must lie in \[0, 1\), got 1.0"),
        ({"ema_decay": 0.0}, r"--ema-decay must lie in \(0, 1\), got 0.0"),
        ({"sample_steps": (4, 0)}, r"--sample-steps must be step counts >= 1, got \(4, 0\)"),
        ({"sample_steps": ()}, r"--sample-steps must be step counts >= 1, got \(\)"),
        ({"steps": 0}, "--steps must be at least 1, got 0"),
        ({"batch_size": 9}, "--batch-size 9 does not split over 2 processes"),
    ],
)
def test_check_settings_names_the_flag_that_cannot_work(
    change: dict[str, object], message: str
) -> None:
    check_settings(Training(), world_size=2, positive=["steps"])
    with pytest.raises(ValueError, match=message):
        check_settings(dataclasses.replace(Training(), **change), 2, positive=["steps"])


def test_finite_loss_refuses_non_finite_weights_only_before_a_checkpoint() -> None:
    procs = train.Processes(rank=0, world_size=1, device=torch.device("cpu"))
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    assert train.finite_loss(procs, torch.tensor(0.5), model, False, "step 3") == 0.5
    with pytest.raises(FloatingPointError, match=r"step 3: the training loss is 0\.5"):
        train.finite_loss(procs, torch.tensor(0.5), model, True, "step 3")


def test_saved_run_needs_the_file_for_sample_only_and_refuses_the_wrong_kind(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.pt"
    flags = argparse.Namespace(out=path, resume=False, sample_only=True, smoke=False)
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"--sample-only: no student checkpoint at {path}")
    ):
        train.saved_run(flags, "fmlm", "student checkpoint")
    train.save_checkpoint(path, {"kind": "flm", "smoke": False, "step": 4})
    assert train.saved_run(flags, "flm") == {"kind": "flm", "smoke": False, "step": 4}
    with pytest.raises(train.CheckpointError, match="is not an 'fmlm' checkpoint"):
        train.saved_run(flags, "fmlm")
    flags.sample_only = False
    assert train.saved_run(flags, "flm") is None  # neither --resume nor --sample-only


def test_sample_rollout_runs_a_self_conditioned_sampler_on_the_lifted_state() -> None:
    """From [noise, 0] with the context lifted, the state half returned; a plain map as rollout."""
    import flowlm as fl

    def network(
        x: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None = None, /,
        previous: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        return 3 * x if previous is None else 3 * x + 5 * previous

    path = fl.LinearInterpolant()
    noise = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    sampler = fl.SelfConditionedMap(network, path)
    expected = fl.rollout(sampler, fl.lift_state(noise), fl.time_grid(3))
    got = train.sample_rollout(sampler, noise, 3)
    assert got.nfe == expected.nfe == 3
    assert torch.equal(got.x, fl.split_state(expected.x).x)
    plain = fl.XPredMap(fl.XPredictor(network), path)
    assert not torch.equal(got.x, train.sample_rollout(plain, noise, 3).x)  # the estimate counts
    assert torch.equal(
        train.sample_rollout(plain, noise, 3).x, fl.rollout(plain, noise, fl.time_grid(3)).x
    )
    prompt = fl.Context.prefix(torch.tensor([[2, 1, 0, 0], [0, 2, 0, 0]]), 2)
    prompted = train.sample_rollout(sampler, noise, 3, prompt)  # the context lifted
    held = fl.rollout(sampler, fl.lift_state(noise), fl.time_grid(3), context=prompt.lift())
    assert torch.equal(prompted.x, fl.split_state(held.x).x)
    assert torch.equal(prompted.x[:, :2], fl.one_hot(prompt.tokens[:, :2], 3))
    blocks = train.sample_rollout(sampler, noise, 3, prompt, block=1)  # after the prompt
    lifted = fl.block_rollout(
        sampler, fl.lift_state(noise), fl.time_grid(3), 1, context=prompt.lift(), first=2
    )
    assert blocks.nfe == lifted.nfe == 2 * 3
    assert torch.equal(blocks.x, fl.split_state(lifted.x).x)
    assert torch.equal(blocks.x[:, :2], fl.one_hot(prompt.tokens[:, :2], 3))
    unprompted = train.sample_rollout(sampler, noise, 3, block=2)  # blocks need no context
    assert unprompted.nfe == 2 * 3 and unprompted.x.shape == noise.shape

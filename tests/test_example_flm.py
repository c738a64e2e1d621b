"""Tests of the FLM reference assembly, examples/flm.py.

The example is imported from its folder (as ``python examples/flm.py`` sees it) and its
``main(argv)`` is called in-process; the DDP test launches it under ``torchrun`` and the
command-line test as a subprocess. Run the slow training test with ``pytest -m slow``.
"""

import collections
import importlib
import json
import math
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import flowlm as fl
from flowlm.backbones import DiT
from flowlm.data import SubwordTokenizer, tokenizer_from_state
from flowlm.train import Processes, load_checkpoint, save_checkpoint

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
QUALITY_KEY = {"corpus": "distinct_2", "alpha-repeat": "valid_rate", "markov": "exact_ppl"}
REFUSED = "is not a usable flowlm checkpoint"


@pytest.fixture(scope="module")
def flm() -> Iterator[ModuleType]:
    """examples/flm.py, imported with examples/ first on the path; sys.modules left as found."""
    shadowed = sys.modules.pop("flm", None)
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module("flm")
    finally:
        sys.path.remove(str(EXAMPLES))
        sys.modules.pop("flm", None)
        if shadowed is not None:
            sys.modules["flm"] = shadowed


@pytest.fixture(autouse=True)
def keep_thread_count() -> Iterator[None]:
    """main() sets torch's thread count; give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(flm: ModuleType, *args: str | Path) -> dict[str, Any]:
    return flm.main([str(arg) for arg in args])


def refused(flm: ModuleType, capsys: pytest.CaptureFixture[str], *args: str | Path) -> str:
    """The one-line error of a configuration that main() refuses with exit code 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run(flm, *args)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("task", ["corpus", "alpha-repeat", "markov"])
def test_smoke_run_writes_the_documented_json(flm: ModuleType, tmp_path: Path, task: str) -> None:
    path = tmp_path / "metrics.json"
    result = run(flm, "--smoke", "--task", task, "--json", path)
    written = json.loads(path.read_text())
    assert written == result
    assert written["task"] == task
    assert written["train_steps"] == flm.SMOKE["steps"]
    assert list(written["steps"]) == ["1", "2", "4", "8"]
    length = flm.PRESETS[task]["length"]
    for n_steps, metrics in written["steps"].items():
        assert metrics["nfe"] == int(n_steps)
        assert 0 <= metrics["entropy"] <= math.log(length)
        assert metrics[QUALITY_KEY[task]] >= 0
        assert len(metrics["samples"]) == flm.SMOKE["samples"]
        assert all(len(text) == length for text in metrics["samples"])
    assert list(written["train_loss"]) == [str(step) for step in range(1, 9)]
    assert set(written["validation"]) == {"4", "8"}


@pytest.mark.parametrize(
    ("flags", "nfe_of_three_steps"),
    [
        (["--clock", "identity"], 3),
        (["--bf16"], 3),
        (["--solver", "midpoint"], 6),
        (["--solver", "heun"], 6),  # 2 calls per step: no host read to skip the last corrector
    ],
)
def test_ablation_flags_run(flm: ModuleType, flags: list[str], nfe_of_three_steps: int) -> None:
    result = run(
        flm, "--smoke", "--task", "alpha-repeat", "--steps", "2", "--sample-steps", "3", *flags
    )
    assert result["steps"]["3"]["nfe"] == nfe_of_three_steps
    assert all(math.isfinite(loss) for loss in result["train_loss"].values())


def test_resume_replays_the_uninterrupted_run_exactly(flm: ModuleType, tmp_path: Path) -> None:
    # A constant rate after the warm-up: the 3-step run is the first half of the 6-step one
    # (the alpha-repeat preset's cosine schedule depends on --steps).
    common = ["--smoke", "--task", "alpha-repeat", "--dropout", "0.1", "--checkpoint-every", "3"]
    common += ["--schedule", "constant"]
    straight = run(flm, *common, "--steps", "6", "--out", tmp_path / "straight.pt")
    run(flm, *common, "--steps", "3", "--out", tmp_path / "resumed.pt")
    resumed = run(flm, *common, "--steps", "6", "--out", tmp_path / "resumed.pt", "--resume")
    assert list(resumed["train_loss"]) == ["4", "5", "6"]
    assert resumed["train_loss"] == {step: straight["train_loss"][step] for step in "456"}
    assert resumed["validation"]["6"] == straight["validation"]["6"]
    assert resumed["steps"] == straight["steps"]


def test_sample_only_reads_the_checkpoint(flm: ModuleType, tmp_path: Path) -> None:
    checkpoint = tmp_path / "flm.pt"
    trained = run(flm, "--smoke", "--task", "markov", "--out", checkpoint)
    written = checkpoint.read_bytes()
    sampled = run(flm, "--sample-only", "--out", checkpoint, "--json", tmp_path / "m.json")
    assert sampled["train_steps"] == trained["train_steps"]
    assert sampled["steps"] == trained["steps"]
    assert "train_loss" not in sampled
    assert checkpoint.read_bytes() == written


def drawn(flm: ModuleType, task: Any, config: Any, step: int, procs: Processes) -> tuple[Any, ...]:
    """`draw_batch`'s rows with the noise its generator gives (as `Interpolant.noised` draws it)."""
    tokens, mask, generator, t = flm.draw_batch(task, config, step, procs)
    assert generator.device == procs.device
    shape = (*tokens.shape, task.vocab_size)
    return tokens, mask, torch.randn(shape, generator=generator, device=procs.device), t


def test_the_ranks_draw_their_own_rows_and_the_strata_of_one_global_batch(
    flm: ModuleType,
) -> None:
    """What N processes share with one: i.i.d. rows and the global batch's strata of times.

    Each rank draws its own sequences and noise (so the two ranks' rows differ, and rank 1's
    are not the rows one process would draw); the times of the two ranks together hold exactly one
    time in each of the 2B strata [i / 2B, (i + 1) / 2B), as one process's batch of 2B does.
    """
    config = flm.Config(task="alpha-repeat", length=8, batch_size=16)
    task = flm.task_of(config)
    cpu = torch.device("cpu")
    draws = [drawn(flm, task, config, 3, Processes(rank, 2, cpu)) for rank in (0, 1)]
    (tokens0, mask0, noise0, t0), (tokens1, _, noise1, t1) = draws
    assert tokens0.shape == (8, 8) and noise0.shape == (8, 8, 26)
    assert mask0 is None  # nothing is padding
    assert not torch.equal(noise0, noise1)
    assert not torch.equal(tokens0, tokens1)
    strata = torch.floor(torch.cat([t0, t1]) * 16).long()
    assert torch.equal(strata, torch.arange(16))
    _, _, alone_noise, alone_t = drawn(flm, task, config, 3, Processes(0, 1, cpu))
    assert torch.equal(torch.floor(alone_t * 16).long(), torch.arange(16))
    assert torch.equal(alone_noise[:8], noise0)  # rank 0 draws from one process's generators
    assert not torch.equal(alone_noise[8:], noise1)
    again = drawn(flm, task, config, 3, Processes(1, 2, cpu))
    assert all(torch.equal(a, b) for a, b in zip(again, draws[1], strict=True) if a is not None)


def test_two_processes_train_under_torchrun(flm: ModuleType, tmp_path: Path) -> None:
    args = "--smoke --task alpha-repeat --steps 6 --checkpoint-every 3".split()
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    path, checkpoint = tmp_path / "ddp.json", tmp_path / "ddp.pt"
    launched = subprocess.run(
        [*launch, str(EXAMPLES / "flm.py"), *args, "--json", str(path), "--out", str(checkpoint)],
        timeout=180,
        capture_output=True,
        text=True,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    result = json.loads(path.read_text())
    assert list(result["train_loss"]) == [str(step) for step in range(1, 7)]
    assert all(math.isfinite(loss) for loss in result["train_loss"].values())
    assert load_checkpoint(checkpoint)["step"] == 6


def count_host_reads(
    flm: ModuleType, steps: int, out: Path, *flags: str
) -> collections.Counter[str]:
    """Host reads of tensors (item, bool, cpu, tolist, numpy) during a run, by caller."""
    calls: collections.Counter[str] = collections.Counter()
    originals = {
        name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "cpu", "tolist", "numpy")
    }

    def counted(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code.co_filename
            # AdamW reads its step counters, which torch keeps on the host (not capturable).
            if not caller.endswith(("optim/optimizer.py", "optim/adamw.py", "optim/adam.py")):
                calls[f"{name} from {Path(caller).name}"] += 1
            return original(self, *args, **kwargs)

        return read

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(name, original))
        every = ["--log-every", "100", "--eval-every", "100", "--sample-every", "100"]
        run(flm, "--smoke", "--task", "alpha-repeat", "--steps", steps, *every,
            "--checkpoint-every", "100", "--out", out, *flags)  # fmt: skip
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return calls


@pytest.mark.parametrize("flags", [[], ["--self-condition", "--soft-cap", "5"]])
def test_the_training_loop_reads_the_host_only_at_log_eval_and_checkpoint_steps(
    flm: ModuleType, tmp_path: Path, flags: list[str]
) -> None:
    """4 and 12 steps with one log, eval and checkpoint (the last step): the same host reads."""
    short = count_host_reads(flm, 4, tmp_path / "a.pt", *flags)
    long = count_host_reads(flm, 12, tmp_path / "b.pt", *flags)
    assert sum(short.values()) > 0  # the counter sees the final log, eval and report
    assert long == short


def test_a_non_finite_loss_stops_the_run_without_saving(
    flm: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_cross_entropy = fl.cross_entropy
    monkeypatch.setattr(
        fl, "cross_entropy", lambda logits, tokens: real_cross_entropy(logits, tokens) * math.inf
    )
    checkpoint = tmp_path / "flm.pt"
    args = ["--smoke", "--task", "alpha-repeat", "--log-every", "2", "--checkpoint-every", "4"]
    with pytest.raises(FloatingPointError, match=r"step 2: the training loss is (nan|inf)"):
        run(flm, *args, "--out", checkpoint)
    assert not checkpoint.exists()


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(
    flm: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = tmp_path / "flm.pt"
    saves: list[int] = []

    def crash_on_second_save(path: Path, state: dict[str, Any]) -> str:
        saves.append(1)
        if len(saves) == 2:
            raise OSError("simulated crash in the middle of a checkpoint write")
        return save_checkpoint(path, state)

    monkeypatch.setattr(flm.train, "save_checkpoint", crash_on_second_save)
    args = ["--smoke", "--task", "alpha-repeat", "--out", checkpoint, "--checkpoint-every", "4"]
    with pytest.raises(OSError, match="simulated crash"):
        run(flm, *args)
    monkeypatch.undo()
    assert load_checkpoint(checkpoint)["step"] == 4
    assert run(flm, *args, "--resume")["train_steps"] == flm.SMOKE["steps"]


def test_a_killed_write_leaves_no_partial_file_after_the_next_start(
    flm: ModuleType, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "flm.pt"
    args = ["--smoke", "--task", "alpha-repeat", "--steps", "2", "--out", checkpoint]
    run(flm, *args)
    stale = tmp_path / ".flm.pt.u7x1kq.partial"  # what a write killed before its rename leaves
    stale.write_bytes(checkpoint.read_bytes()[:100])
    run(flm, *args, "--resume", "--steps", "3")
    assert sorted(tmp_path.iterdir()) == [checkpoint]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--grad-clip", "-1"], "--grad-clip must be a positive finite gradient norm, got -1.0"),
        (["--grad-clip", "nan"], "--grad-clip must be a positive finite gradient norm, got nan"),
        (["--lr", "1e30"], r"--lr must lie in \(0, 1\], got 1e\+30"),
        (["--lr", "0"], r"--lr must lie in \(0, 1\], got 0.0"),
        (["--length", "100000"], r"needs about \d+\.\d GiB, more than the"),
        (["--dim", "1000000"], r"needs about \d+\.\d GiB, more than the"),
        (["--samples", "100000000"], r"needs about \d+\.\d GiB, more than the"),
        (["--length", "0"], "--length must be at least 1, got 0"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--batch-size", "-4"], "--batch-size must be at least 1, got -4"),
        (["--sample-steps", "4", "0"], r"--sample-steps must be step counts >= 1, got \(4, 0\)"),
        (["--dim", "30", "--heads", "4"], "--dim / --heads must be an even number, got 30 / 4"),
        (["--ema-decay", "1"], r"--ema-decay must lie in \(0, 1\), got 1.0"),
        (["--beta2", "1.5"], r"--beta2 must lie in \[0, 1\), got 1.5"),
        (["--threads", "0"], "--threads must be at least 1, got 0"),
        (["--task", "poetry"], "argument --task: invalid choice: 'poetry'"),
        (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
        (["--resume"], "--resume and --sample-only read the checkpoint at --out: give --out"),
        (["--task", "markov", "--text", "."], "--text is an option of the corpus task"),
        (["--task", "markov", "--tokenizer", "bpe:300"], "--tokenizer is an option of the corpus"),
        (["--tokenizer", "word"], "unknown tokenizer 'word': expected char | bpe:N | PATH/"),
        (["--tokenizer", "bpe:12"], "a byte-level BPE needs vocab_size >= 258"),
        (["--text", ".", "--dataset", "x.json"], "--text and --dataset both give the corpus"),
        (["--preset", "gpt5"], "argument --preset: invalid choice: 'gpt5'"),
        (["--soft-cap", "0"], "--soft-cap must be a positive finite cap, got 0.0"),
        (["--soft-cap", "inf"], "--soft-cap must be a positive finite cap, got inf"),
        (["--self-condition-guidance", "1"], "--self-condition-guidance guides a --self-condition"),
        (
            ["--self-condition", "--self-condition-guidance", "-1"],
            "--self-condition-guidance must be >= 0, got -1.0",
        ),
    ],
)
def test_configuration_errors_are_one_line_and_exit_code_2(
    flm: ModuleType, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert re.search(message, refused(flm, capsys, "--smoke", *flags))


def test_the_command_line_prints_one_error_line_without_traceback(tmp_path: Path) -> None:
    launched = subprocess.run(
        [sys.executable, str(EXAMPLES / "flm.py"), "--smoke", "--grad-clip", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert launched.returncode == 2
    assert (
        launched.stderr == "error: --grad-clip must be a positive finite gradient norm, got -1.0\n"
    )


@pytest.mark.parametrize("damage", ["64 flipped bytes", "empty", "text", "truncated"])
def test_a_damaged_checkpoint_is_refused_with_one_message(
    flm: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    checkpoint = tmp_path / "flm.pt"
    run(flm, "--smoke", "--task", "alpha-repeat", "--steps", "1", "--out", checkpoint)
    raw = bytearray(checkpoint.read_bytes())
    if damage == "64 flipped bytes":
        middle = len(raw) // 2
        raw[middle : middle + 64] = bytes(b ^ 0xFF for b in raw[middle : middle + 64])
    damaged = {"empty": b"", "text": b"step 1\n", "truncated": bytes(raw[: len(raw) // 3])}
    checkpoint.write_bytes(damaged.get(damage, bytes(raw)))
    for mode in ("--sample-only", "--resume"):
        assert REFUSED in refused(flm, capsys, mode, "--out", checkpoint)


def test_an_fmlm_checkpoint_is_named_as_such(
    flm: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    student = tmp_path / "fmlm.pt"
    save_checkpoint(student, {"kind": "fmlm", "stages": {}})
    message = refused(flm, capsys, "--sample-only", "--out", student)
    assert "is not an 'flm' checkpoint: it holds an 'fmlm' checkpoint" in message


def test_a_smoke_checkpoint_is_not_resumed_by_a_real_run(
    flm: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "flm.pt"
    run(flm, "--smoke", "--task", "alpha-repeat", "--steps", "1", "--out", checkpoint)
    message = refused(flm, capsys, "--task", "alpha-repeat", "--resume", "--out", checkpoint)
    assert "holds a --smoke run: it is not resumed by this one" in message


def test_flags_that_contradict_the_checkpoints_network_are_refused(
    flm: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "alpha.pt"
    run(flm, "--smoke", "--task", "alpha-repeat", "--steps", "1", "--out", checkpoint)
    message = refused(flm, capsys, "--sample-only", "--out", checkpoint, "--dim", "64")
    assert "--dim 64 contradicts the checkpoint's 32" in message
    message = refused(flm, capsys, "--sample-only", "--out", checkpoint, "--task", "markov")
    assert "--task markov contradicts the checkpoint's alpha-repeat" in message


def test_an_empty_text_is_refused(
    flm: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty.txt").write_text("")
    assert "corpus is empty" in refused(flm, capsys, "--smoke", "--text", tmp_path / "empty.txt")


def test_a_sequence_longer_than_the_text_is_refused(
    flm: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "short.txt").write_text("In the beginning God created the heaven. " * 10)
    message = refused(flm, capsys, "--smoke", "--text", tmp_path / "short.txt", "--length", "64")
    assert "--length 64 is longer than the validation split" in message


def test_self_conditioning_starts_as_the_plain_model_and_resumes_exactly(
    flm: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The estimate's input starts at zero and is made after every other weight (same init)."""
    constant = ["--schedule", "constant"]  # the preset's cosine schedule depends on --steps
    common = ["--smoke", "--task", "alpha-repeat", "--checkpoint-every", "3", *constant]
    plain = run(flm, *common, "--steps", "6")
    flags = [*common, "--self-condition"]
    straight = run(flm, *flags, "--steps", "6", "--out", tmp_path / "straight.pt")
    # Step 1's gradient reaches no input (zero output layer), so steps 1 and 2 are the plain
    # model's; then the estimate's input is trained and the runs part.
    assert [straight["train_loss"][k] for k in "12"] == [plain["train_loss"][k] for k in "12"]
    assert straight["train_loss"]["6"] != plain["train_loss"]["6"]
    state = load_checkpoint(tmp_path / "straight.pt", kind="flm")
    assert state["config"]["self_condition"]
    assert state["ema"]["previous_embedding.weight"].abs().max() > 0
    assert all(metrics["nfe"] == int(n) for n, metrics in straight["steps"].items())
    run(flm, *flags, "--steps", "3", "--out", tmp_path / "resumed.pt")
    resumed = run(flm, *common, "--steps", "6", "--out", tmp_path / "resumed.pt", "--resume")
    assert resumed["train_loss"] == {step: straight["train_loss"][step] for step in "456"}
    assert resumed["validation"]["6"] == straight["validation"]["6"]
    assert resumed["steps"] == straight["steps"]
    guided = run(flm, "--sample-only", "--out", tmp_path / "resumed.pt",
                 "--self-condition-guidance", "1000")  # fmt: skip
    assert all(metrics["nfe"] == int(n) for n, metrics in guided["steps"].items())  # one batch
    assert guided["steps"] != straight["steps"]  # w large enough to move the tiny trained input
    args = ("--sample-only", "--out", tmp_path / "straight.pt", "--no-self-condition")
    assert "--self-condition False contradicts the checkpoint's True" in refused(flm, capsys, *args)


def test_a_soft_cap_far_above_the_logits_is_the_uncapped_run(
    flm: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--smoke", "--task", "alpha-repeat", "--steps", "4"]
    plain = run(flm, *common)
    far = run(flm, *common, "--soft-cap", "1e6", "--out", tmp_path / "far.pt")
    assert far["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-6)
    assert far["validation"] == pytest.approx(plain["validation"], rel=1e-6)
    for n_steps, metrics in plain["steps"].items():
        assert far["steps"][n_steps]["samples"] == metrics["samples"]
    assert run(flm, *common, "--soft-cap", "0.05")["train_loss"] != plain["train_loss"]
    assert load_checkpoint(tmp_path / "far.pt", kind="flm")["config"]["soft_cap"] == 1e6
    args = ("--resume", "--smoke", "--out", tmp_path / "far.pt", "--soft-cap", "30")
    assert "--soft-cap 30.0 contradicts the checkpoint's 1000000.0" in refused(flm, capsys, *args)


@pytest.mark.slow
def test_flm_learns_alpha_repeat(flm: ModuleType) -> None:
    result = run(flm, "--task", "alpha-repeat")
    assert result["steps"]["8"]["valid_rate"] >= 0.9


# ---------------------------------------------------------------------------- tokenizers and data
VERSES = (
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And the Spirit of God moved upon the face of the waters.",
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good: and God divided the light from the darkness.",
)


@pytest.fixture(scope="module")
def verses(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text of 40 lines, each a verse followed by its line number (so the lines differ)."""
    path = tmp_path_factory.mktemp("text") / "verses.txt"
    path.write_text("".join(f"{VERSES[i % 5]} {i}\n" for i in range(40)))
    return path


def test_a_bpe_run_keeps_its_tokenizer_through_resume_and_sample_only(
    flm: ModuleType, tmp_path: Path, verses: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint holds the BPE; resuming and sampling reuse it and never retrain one."""
    common = ["--smoke", "--text", verses, "--tokenizer", "bpe:300", "--length", "16"]
    straight = run(flm, *common, "--steps", "6", "--out", tmp_path / "straight.pt")
    run(flm, *common, "--steps", "3", "--checkpoint-every", "3", "--out", tmp_path / "bpe.pt")
    saved = tokenizer_from_state(load_checkpoint(tmp_path / "bpe.pt", kind="flm")["tokenizer"])
    assert isinstance(saved, SubwordTokenizer) and 258 < saved.vocab_size <= 300

    def no_training(*args: object) -> None:
        raise AssertionError("a BPE was trained again")

    monkeypatch.setattr("flowlm.data.specs.train_bpe", no_training)
    resumed = run(flm, *common, "--steps", "6", "--out", tmp_path / "bpe.pt", "--resume")
    assert resumed["train_loss"] == {step: straight["train_loss"][step] for step in "456"}
    assert resumed["steps"] == straight["steps"]
    sampled = run(flm, "--sample-only", "--out", tmp_path / "bpe.pt")
    assert sampled["steps"] == straight["steps"]

    # The JSON's samples are the saved tokenizer's text of the EMA model's samples.
    state = load_checkpoint(tmp_path / "bpe.pt", kind="flm")
    config = flm.Config(**state["config"] | {"sample_steps": (8,)})
    backbone = DiT(saved.vocab_size, config.dim, config.depth, config.heads)
    backbone.load_state_dict(state["ema"])
    interpolant = fl.LinearInterpolant(reparam=fl.TokenAccuracy(saved.vocab_size))
    sampler = flm.make_sampler(config, backbone, interpolant)
    task = flm.task_of(config, saved)
    trajectory = flm.sample(sampler, 8, config.samples, task, config, torch.device("cpu"))
    assert saved.decode_batch(fl.decode(trajectory.x)) == sampled["steps"]["8"]["samples"]


def test_a_tokenizer_other_than_the_checkpoints_is_refused(
    flm: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "char.pt"
    run(flm, "--smoke", "--steps", "1", "--out", checkpoint)
    for mode in ("--resume", "--sample-only"):
        message = refused(
            flm, capsys, "--smoke", mode, "--out", checkpoint, "--tokenizer", "bpe:512"
        )
        assert message == (
            "error: --tokenizer bpe:512 contradicts the checkpoint's char: drop it or give "
            "another --out"
        )


class NoisyAt(torch.nn.Module):
    """A backbone whose logits get large random noise where ``where`` is True."""

    def __init__(self, inner: torch.nn.Module, where: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.where = inner, where

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x, t)
        return logits + 50 * torch.randn_like(logits) * self.where[..., None]


def test_lines_are_padded_sequences_whose_padding_the_loss_ignores(
    flm: ModuleType, tmp_path: Path, verses: Path
) -> None:
    """--lines: each line one row, padded; validation holds out whole lines; padding is masked."""
    checkpoint = tmp_path / "lines.pt"
    result = run(flm, "--smoke", "--text", verses, "--lines", "--length", "96", "--out", checkpoint)
    state = load_checkpoint(checkpoint, kind="flm")
    config = flm.Config(**state["config"] | {"sample_steps": (1,)})
    assert config.lines and config.tokenizer == "char"
    task = flm.task_of(config)
    assert all(len(text) <= 96 for text in result["steps"]["1"]["samples"])
    lines, pad_id = verses.read_text().splitlines(), task.tokenizer.pad_id
    assert pad_id is not None
    validation = task.decode(task.validation)
    assert validation == [lines[10], lines[30]]  # 5% of 40 lines, evenly spaced
    cpu = torch.device("cpu")
    draw_config = replace(config, batch_size=64)
    tokens, mask, _, _ = flm.draw_batch(task, draw_config, 0, Processes(0, 1, cpu))
    assert mask is not None and torch.equal(mask, tokens != pad_id)
    assert mask[:, 0].all() and not mask[:, -1].any()  # every line is shorter than 96
    assert set(task.decode(tokens)) <= set(lines) - set(validation)

    # The validation loss ignores the logits at padded positions, and only those.
    backbone = DiT(task.vocab_size, config.dim, config.depth, config.heads)
    backbone.load_state_dict(state["ema"])
    interpolant = fl.LinearInterpolant(reparam=fl.TokenAccuracy(task.vocab_size))
    clean = flm.validation_loss(fl.XPredictor(backbone), interpolant, task, config, cpu)
    padding = task.validation == pad_id
    noisy = fl.XPredictor(NoisyAt(backbone, padding))
    assert flm.validation_loss(noisy, interpolant, task, config, cpu) == pytest.approx(clean)
    noisy = fl.XPredictor(NoisyAt(backbone, ~padding))
    assert flm.validation_loss(noisy, interpolant, task, config, cpu) > clean + 1


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_a_local_dataset_file_is_packed_into_windows(
    flm: ModuleType, tmp_path: Path, suffix: str
) -> None:
    """--dataset FILE: records (or lines) are documents, each ended by <eos>, cut into windows."""
    documents = [f"{VERSES[i % 5]} {i}" for i in range(40)]
    path = tmp_path / f"notes{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"body": text}) + "\n" for text in documents))
        column = ["--column", "body"]
    else:
        path.write_text("".join(text + "\n" for text in documents))
        column = []
    checkpoint = tmp_path / "data.pt"
    result = run(flm, "--smoke", "--dataset", path, *column, "--length", "32", "--out", checkpoint)
    assert result["steps"]["8"]["nfe"] == 8
    config = flm.Config(**load_checkpoint(checkpoint, kind="flm")["config"])
    task = flm.task_of(config)
    assert "packed into windows of 32" in task.description
    assert task.mask(task.validation) is None
    eos = torch.tensor([task.tokenizer.eos_id])
    held_out = [torch.cat([task.tokenizer.encode(documents[i]), eos]) for i in (10, 30)]  # 5%
    stream = torch.cat(held_out)
    assert torch.equal(task.validation.flatten(), stream[: task.validation.numel()])

"""The conditioning flags of examples/flm.py and examples/fmlm.py: contexts, prompts, infills.

Each example is imported from its folder and its ``main(argv)`` called in-process at smoke
size on the alpha-repeat task (length 8): the known tokens come back in every sample, blocks
count their network calls, and every bad flag is one ``error:`` line with exit code 2.
"""

import importlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMOKE = ("--smoke", "--task", "alpha-repeat", "--sample-steps", "1", "2")


def load(name: str) -> Iterator[ModuleType]:
    shadowed = sys.modules.pop(name, None)
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))
        sys.modules.pop(name, None)
        if shadowed is not None:
            sys.modules[name] = shadowed


@pytest.fixture(scope="module")
def flm() -> Iterator[ModuleType]:
    yield from load("flm")


@pytest.fixture(scope="module")
def fmlm() -> Iterator[ModuleType]:
    yield from load("fmlm")


@pytest.fixture(autouse=True)
def keep_thread_count() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(flm: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "flm.pt"
    flm.main([*SMOKE, "--context", "prefix", "--out", str(path)])
    return path


def samples(result: dict[str, Any], key: str = "steps") -> dict[int, tuple[int, list[str]]]:
    return {int(n): (row["nfe"], row["samples"]) for n, row in result[key].items()}


def test_flm_trains_with_contexts_and_continues_a_prompt(flm: ModuleType) -> None:
    for context in ("prefix", "spans", "bernoulli"):
        result = flm.main([*SMOKE, "--context", context, "--prompt", "ab"])
        assert result["prompt"] == "ab"
        for n_steps, (nfe, texts) in samples(result).items():
            assert nfe == n_steps
            assert texts and all(text.startswith("ab") and len(text) == 8 for text in texts)


def test_flm_fills_the_holes_of_a_template(flm: ModuleType) -> None:
    result = flm.main([*SMOKE, "--infill", "a__b"])
    for _, texts in samples(result).values():
        assert all(text[0] == "a" and text[3] == "b" for text in texts)


def test_flm_blocks_and_guidance_count_their_calls(flm: ModuleType) -> None:
    result = flm.main([*SMOKE, "--prompt", "ab", "--block", "2", "--guidance", "1.5"])
    for n_steps, (nfe, texts) in samples(result).items():
        assert nfe == 3 * n_steps  # positions 2..7 in blocks of 2; both branches in one call
        assert all(text.startswith("ab") for text in texts)


def test_fmlm_distils_with_contexts_and_jumps_to_a_prompted_sample(
    fmlm: ModuleType, teacher: Path
) -> None:
    result = fmlm.main(
        ["--teacher", str(teacher), "--smoke", "--context", "prefix", "--prompt", "abc"]
    )
    for key in ("steps", "teacher_steps"):
        for n_steps, (nfe, texts) in samples(result, key).items():
            assert nfe == n_steps
            assert all(text.startswith("abc") for text in texts)
    result = fmlm.main(
        ["--teacher", str(teacher), "--smoke", "--infill", "_a_", "--block", "4", "--guidance", "2"]
    )
    for n_steps, (nfe, texts) in samples(result).items():
        assert nfe == 2 * n_steps  # first = 0: blocks 0..3 and 4..7
        assert all(text[1] == "a" for text in texts)


def refused(module: ModuleType, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        module.main(list(argv))
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prompt", "ab", "--infill", "a_"], "give one of them"),
        (["--guidance", "-1"], "--guidance must be at least 0"),
        (["--guidance", "nan"], "--guidance must be at least 0"),
        (["--block", "0"], "--block must be at least 1"),
        (["--prompt", "abcdefghij"], "--prompt: .* takes 10 positions but sequences have 8"),
        (["--infill", "A__"], "--infill: character 'A'"),
        (["--context", "everything"], "context"),
        (["--context", "prefix", "--p-uncond", "2"], "--p-uncond must lie in"),
    ],
)
def test_bad_conditioning_flags_are_one_line_errors(
    flm: ModuleType, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert re.search(message, refused(flm, capsys, *SMOKE, *flags))


def test_fmlm_refuses_bad_conditioning_flags(
    fmlm: ModuleType, teacher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = refused(
        fmlm, capsys, "--teacher", str(teacher), "--smoke", "--prompt", "a", "--infill", "_"
    )
    assert "give one of them" in line
    line = refused(fmlm, capsys, "--teacher", str(teacher), "--smoke", "--p-uncond", "-0.5")
    assert "--p-uncond" in line


# ---------------------------------------------------------------- self-conditioned models


@pytest.fixture(scope="module")
def sc_teacher(flm: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sc_teacher") / "flm.pt"
    flm.main([*SMOKE, "--context", "prefix", "--self-condition", "--out", str(path)])
    return path


@pytest.mark.parametrize(
    ("flags", "calls_per_step", "known"),
    [
        (["--prompt", "ab"], 1, {0: "a", 1: "b"}),
        (["--infill", "a__b", "--solver", "heun"], 2, {0: "a", 3: "b"}),
        (["--prompt", "ab", "--block", "2", "--guidance", "1.5"], 3, {0: "a", 1: "b"}),
        (
            ["--prompt", "abc", "--self-condition-guidance", "2", "--solver", "midpoint"],
            2,
            {2: "c"},
        ),
    ],
)
def test_a_self_conditioned_flm_samples_with_prompts_infills_blocks_guidance_and_solvers(
    flm: ModuleType,
    sc_teacher: Path,
    flags: list[str],
    calls_per_step: int,
    known: dict[int, str],
) -> None:
    result = flm.main(
        ["--sample-only", "--out", str(sc_teacher), "--sample-steps", "1", "2", *flags]
    )
    for n_steps, (nfe, texts) in samples(result).items():
        assert nfe == calls_per_step * n_steps  # blocks of 2 after "ab": 3 rollouts
        assert texts and all(len(text) == 8 for text in texts)
        assert all(text[i] == char for text in texts for i, char in known.items())


def test_a_self_conditioned_teacher_and_student_continue_a_prompt(
    fmlm: ModuleType, sc_teacher: Path
) -> None:
    result = fmlm.main(
        ["--teacher", str(sc_teacher), "--smoke", "--context", "prefix", "--prompt", "abc"]
    )
    per_step = {"steps": 1, "self_conditioned_steps": 2, "teacher_steps": 1}
    for key, calls in per_step.items():  # the 1-call jump, the 2-call map, the teacher's sampler
        for n_steps, (nfe, texts) in samples(result, key).items():
            assert nfe == calls * n_steps
            assert texts and all(text.startswith("abc") for text in texts), key
    flags = "--smoke --infill _a_ --block 4 --guidance 2 --solver heun".split()
    result = fmlm.main(["--teacher", str(sc_teacher), *flags])
    per_step = {"steps": 2, "self_conditioned_steps": 4, "teacher_steps": 4}  # 2 blocks
    for key, calls in per_step.items():
        for n_steps, (nfe, texts) in samples(result, key).items():
            assert nfe == calls * n_steps, key
            assert all(text[1] == "a" for text in texts), key

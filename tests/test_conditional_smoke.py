"""benchmarks/conditional.py: the exact conditional likelihood against enumeration, and a smoke run."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flowlm as fl
from flowlm.data import MarkovChain

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import conditional  # noqa: E402

V, L = 3, 5
CHAIN = MarkovChain(V, order=1, seed=2, concentration=1.0)
ALL = torch.tensor(list(itertools.product(range(V), repeat=L)))


def brute_force(tokens: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """log p(x_U | x_K) by summing p over every sequence that agrees with x on K."""
    log_p = CHAIN.log_likelihood(ALL)
    result = []
    for row, mask in zip(tokens, known, strict=True):
        agrees = (ALL[:, mask] == row[mask]).all(1)
        log_known = torch.logsumexp(log_p[agrees], 0)
        result.append(CHAIN.log_likelihood(row[None])[0] - log_known)
    return torch.stack(result)


def test_the_exact_conditional_likelihood_matches_enumeration() -> None:
    generator = torch.Generator().manual_seed(0)
    tokens = CHAIN.sample(40, L, generator)
    known = torch.rand(40, L, generator=generator) < 0.5
    known[0], known[1] = False, True  # nothing known (the joint), everything known (0)
    exact = conditional.conditional_log_likelihood(CHAIN, tokens, known)
    assert torch.allclose(exact, brute_force(tokens, known), atol=1e-10)
    assert exact[1] == pytest.approx(0.0, abs=1e-12)
    assert exact[0] == pytest.approx(CHAIN.log_likelihood(tokens[:1])[0].item(), abs=1e-12)


def test_the_exact_conditional_likelihood_has_the_markov_closed_forms() -> None:
    tokens = CHAIN.sample(10, L, torch.Generator().manual_seed(1))
    transition = CHAIN.transition
    prefix = fl.Context.prefix(tokens, 2).known
    steps = transition[tokens[:, 1:-1], tokens[:, 2:]].log().sum(1)  # Π P(x_{i-1}, x_i), i >= 2
    assert torch.allclose(conditional.conditional_log_likelihood(CHAIN, tokens, prefix), steps)
    infill = torch.tensor([True, False, False, True, True]).expand(10, L)
    a, b = tokens[:, 0], tokens[:, 3]
    inside = transition[tokens[:, :3], tokens[:, 1:4]].log().sum(1)
    ratio = inside - torch.linalg.matrix_power(transition, 3)[a, b].log()
    assert torch.allclose(conditional.conditional_log_likelihood(CHAIN, tokens, infill), ratio)


def test_grouped_tv_is_exact_on_a_point_mass() -> None:
    keys, generated = torch.full((50,), 2), torch.full((50,), 1)
    tv = conditional.grouped_tv(keys, generated, CHAIN.transition)
    assert tv == pytest.approx(1 - CHAIN.transition[2, 1].item(), abs=1e-12)


def test_the_first_generated_laws_match_enumeration() -> None:
    tokens = CHAIN.sample(12, L, torch.Generator().manual_seed(3))
    log_p = CHAIN.log_likelihood(ALL)
    for name, known in [
        ("continuation", torch.tensor([True, True, False, False, False])),
        ("infill", torch.tensor([True, False, False, True, True])),
    ]:
        task = conditional.Task(name, tokens, known.expand(12, L))
        keys, laws = task.first_law(CHAIN)
        assert torch.allclose(laws.sum(1), torch.ones(len(laws), dtype=torch.float64))
        first = task.first_generated
        for row, key in zip(tokens, keys, strict=True):
            agrees = (ALL[:, known] == row[known]).all(1)
            weights = torch.softmax(log_p[agrees], 0)
            exact = torch.zeros(V, dtype=torch.float64).index_add_(0, ALL[agrees, first], weights)
            assert torch.allclose(laws[key], exact, atol=1e-12)


def run(out_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / "conditional.py"), "--out-dir", str(out_dir), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_smoke_run_writes_every_row_and_target(tmp_path: Path) -> None:
    completed = run(tmp_path, "--smoke")
    assert completed.returncode == 0, completed.stderr
    assert "|---|" in completed.stdout
    report = json.loads((tmp_path / "conditional.json").read_text())
    assert report["benchmark"] == "conditional" and report["quick"] is True
    assert (tmp_path / "conditional.md").read_text().startswith("# Conditional generation")
    methods = {(row["method"], row["task"]) for row in report["rows"]}
    for method in ("data", "FLM", "FMLM", "MDLM", "replacement"):
        assert {(method, "continuation"), (method, "infill")} <= methods
    assert ("prompt-blind", "continuation") in methods
    for row in report["rows"]:
        assert row.get("known_exact", True) is True
        if row["method"] == "FLM":
            assert row["nfe"] == row["steps"]
        if row["method"] == "FMLM blocks of 4":
            assert row["nfe"] == 3 * row["steps"]  # (16 - 4)/4 blocks
    assert len(report["targets"]) == 9
    assert all(isinstance(target["pass"], bool) for target in report["targets"])
    assert completed.stdout.count("PASS") + completed.stdout.count("FAIL") >= 9


def test_a_bad_prompt_length_is_one_error_line(tmp_path: Path) -> None:
    completed = run(tmp_path, "--smoke", "--prompt", "8")
    assert completed.returncode == 2
    assert completed.stderr.strip().startswith("error:") and len(completed.stderr.splitlines()) == 1

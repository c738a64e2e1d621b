"""Tests of flowlm.data.tasks: the examples' tasks and their quality measures."""

import math
from pathlib import Path

import pytest
import torch

from flowlm.data.tasks import MIN_DOCUMENTS, TASKS, build_task


def test_alpha_repeat_draws_valid_sequences_and_judges_them() -> None:
    task = build_task("alpha-repeat", 5)
    tokens = task.draw(64, torch.Generator().manual_seed(0))
    assert tokens.shape == (64, 5) and task.vocab_size == 26
    assert task.quality(tokens)["valid_rate"] == 1.0
    broken = tokens.clone()
    broken[:, 0] = (broken[:, 0] + 1) % 26  # every sequence now has two symbols
    assert task.quality(broken)["valid_rate"] == 0.0
    assert task.decode(tokens[:1])[0] == task.decode(tokens[:1])[0][0] * 5


def test_markov_reports_the_chains_exact_perplexity_of_its_own_samples() -> None:
    task = build_task("markov", 64)
    tokens = task.draw(512, torch.Generator().manual_seed(0))
    perplexity = task.quality(tokens)["exact_ppl"]
    rate = float(task.description.split("entropy rate ")[1].split(" ")[0])
    assert math.isclose(math.log(perplexity), rate, rel_tol=0.05)  # samples of the chain itself


def test_the_validation_sequences_are_fixed_by_the_seed() -> None:
    assert torch.equal(
        build_task("markov", 8, seed=3).validation, build_task("markov", 8, seed=3).validation
    )
    assert not torch.equal(
        build_task("markov", 8, seed=3).validation, build_task("markov", 8, seed=4).validation
    )


def test_your_text_is_cut_into_enough_documents_and_judged_by_its_words(tmp_path: Path) -> None:
    text = "the cat sat on the mat and the dog sat on the log. " * 40
    (tmp_path / "one.txt").write_text(text)
    task = build_task("corpus", 16, tmp_path / "one.txt")
    assert f"{MIN_DOCUMENTS - 1} training and 1 validation documents" in task.description
    words = task.tokenizer.encode("on the cat sat on the mat on").unsqueeze(0)
    nonsense = task.tokenizer.encode("on tha cot sda an tho mta on").unsqueeze(0)
    assert task.quality(words)["known_words"] == 1.0
    assert task.quality(nonsense)["known_words"] == 0.0
    assert 0 < task.quality(words)["distinct_2"] <= 1


@pytest.mark.parametrize(
    ("name", "length", "text", "message"),
    [
        ("poetry", 8, None, "unknown task 'poetry'"),
        ("markov", 0, None, "--length must be at least 1, got 0"),
        (
            "markov",
            8,
            Path("x.txt"),
            "--text is an option of the corpus task; it has no use with markov",
        ),
    ],
)
def test_bad_tasks_are_refused(name: str, length: int, text: Path | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_task(name, length, text)


def test_a_window_longer_than_the_text_is_refused(tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("In the beginning. " * 30)
    with pytest.raises(ValueError, match="--length 64 is longer than the validation split"):
        build_task("corpus", 64, tmp_path / "short.txt")


def test_every_task_is_buildable_by_name() -> None:
    assert TASKS == ("corpus", "alpha-repeat", "markov")

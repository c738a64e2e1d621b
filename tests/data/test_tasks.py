"""Tests of flowlm.data.tasks: the examples' tasks and their quality measures."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flowlm.data import CharTokenizer, SubwordTokenizer
from flowlm.data.tasks import MIN_DOCUMENTS, TASKS, build_task, task_of


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
    assert TASKS == ("corpus", "words", "alpha-repeat", "markov")


def settings(**fields: object) -> SimpleNamespace:
    """DataSettings of the corpus task with `fields` changed."""
    defaults = dict(task="corpus", length=16, seed=0, text=None, tokenizer="char", lines=False)
    defaults |= dict(dataset=None, split="train", column="text", streaming=False, limit=None)
    return SimpleNamespace(**defaults | fields)


def test_a_bpe_corpus_task_judges_the_decoded_words(tmp_path: Path) -> None:
    text = "the cat sat on the mat and the dog sat on the log. " * 40
    (tmp_path / "one.txt").write_text(text)
    task = task_of(settings(text=str(tmp_path / "one.txt"), tokenizer="bpe:300"))
    assert isinstance(task.tokenizer, SubwordTokenizer) and task.vocab_size <= 300
    words = task.tokenizer.encode(" on the cat sat on the mat on").unsqueeze(0)
    assert words.numel() < len(" on the cat sat on the mat on")  # merges shorten the text
    assert task.quality(words)["known_words"] == 1.0
    nonsense = task.tokenizer.encode(" on tha cot sda an tho mta on").unsqueeze(0)
    assert task.quality(nonsense)["known_words"] == 0.0
    again = task_of(settings(text=str(tmp_path / "one.txt")), tokenizer=task.tokenizer)
    assert again.tokenizer is task.tokenizer  # a saved tokenizer is used as it is
    assert torch.equal(again.validation, task.validation)


def test_a_saved_vocabulary_must_be_the_synthetic_tasks() -> None:
    with pytest.raises(ValueError, match="trained on another vocabulary than markov's"):
        task_of(settings(task="markov"), tokenizer=CharTokenizer("ab"))
    assert task_of(settings(task="markov")).tokenizer == build_task("markov", 16).tokenizer


@pytest.mark.parametrize("flag", ["--tokenizer", "--lines", "--dataset"])
def test_corpus_options_are_refused_by_the_synthetic_tasks(flag: str) -> None:
    given = {"--tokenizer": {"tokenizer": "bpe:300"}, "--lines": {"lines": True}}
    given["--dataset"] = {"dataset": "x.jsonl"}
    with pytest.raises(ValueError, match=f"{flag} is an option of the corpus task"):
        task_of(settings(task="alpha-repeat", **given[flag]))


def test_lines_hold_out_whole_lines_and_mask_padding(tmp_path: Path) -> None:
    lines = [f"line number {i} " + "x" * (i % 7) for i in range(40)]
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n\n")
    task = task_of(settings(text=str(tmp_path / "lines.txt"), lines=True, length=24))
    assert task.decode(task.validation) == [lines[10], lines[30]]
    tokens = task.draw(200, torch.Generator().manual_seed(0))
    mask = task.mask(tokens)
    assert mask is not None and torch.equal(mask, tokens != task.tokenizer.pad_id)
    lengths = mask.sum(1).tolist()
    assert lengths == [len(text) for text in task.decode(tokens)]
    assert set(task.decode(tokens)) == set(lines) - {lines[10], lines[30]}  # 200 draws of 38

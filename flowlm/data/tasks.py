"""The examples' tasks: sequences to learn, fixed validation sequences and quality measures.

- ``corpus``: text, tokenized by any `Tokenizer` (characters by default, or a BPE, a
  ``tokenizer.json``, a Hugging Face tokenizer), judged by the fraction of distinct token
  bigrams and of whole words seen in training. Its text is the embedded King James Bible or
  your own files, cut into random windows; or one sequence per line, padded (``lines``,
  LM1B's unwrapped form); or a ``datasets`` dataset packed into windows (the reference's
  ``lm1b-wrap``) or one row per sequence.
- ``words``: one word of the corpus per sequence (lowercase letters, drawn by their frequency
  in the text, padded); judged by the fraction of samples that are real words and the
  number of distinct ones, against the number of distinct words in as many data draws.
- ``alpha-repeat``: one of 26 letters repeated; judged by the valid rate and mode coverage.
- ``markov``: a fixed order-1 chain over 16 symbols; judged by the exact perplexity.
"""

import math
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args, runtime_checkable

import torch
from jaxtyping import Int
from torch import Tensor

from flowlm._types import TokenMask, Tokens
from flowlm.data.corpus import (
    DOCUMENT_SEPARATOR,
    Document,
    TextCorpus,
    load_kjv,
    load_text,
    validation_positions,
)
from flowlm.data.hf_datasets import load_dataset_documents
from flowlm.data.protocol import Tokenizer
from flowlm.data.sequences import SequenceCorpus
from flowlm.data.specs import build_tokenizer
from flowlm.data.synthetic import AlphaRepeat, MarkovChain
from flowlm.data.tokenizer import EOS, PAD, CharTokenizer
from flowlm.metrics import distinct_n

__all__ = ["TASKS", "DataSettings", "Task", "TaskName", "TaskSettings", "build_task", "task_of"]

TaskName = Literal["corpus", "words", "alpha-repeat", "markov"]
TASKS: tuple[TaskName, ...] = get_args(TaskName)
ALPHA_SYMBOLS = 26
MARKOV_SYMBOLS = 16
MARKOV_ORDER = 1
MARKOV_SEED = 0
"""The Markov task is one fixed chain, whatever the run's seed."""
MIN_DOCUMENTS = 20
"""Your text is cut into this many pieces when it has fewer files, so 5% can be held out."""
VALIDATION_SEQUENCES = 64
VALIDATION_FRACTION = 0.05
"""The share of documents (or lines) of the corpus task held out for validation."""


@dataclass(frozen=True)
class Task:
    """Sequences to learn, fixed validation sequences, their vocabulary and quality measures.

    Attributes:
        name: one of `TASKS`.
        description: one line for a run's header.
        tokenizer: the vocabulary; checkpoints store its state.
        length: positions per sequence.
        draw: ``draw(batch_size, generator)`` returns training sequences (a CPU generator).
        validation: fixed sequences for the validation loss.
        quality: the task's measures of a batch of samples (entropy comes separately).
        padded: whether sequences end in padding (``lines``): then `mask` leaves it out of
            the loss.
        ends_at_pad: whether a sequence ends at its first padding token (``words``): then
            `mask` counts the positions up to and including it, the end marker, and leaves
            out the rest.

    Examples:
        >>> task = build_task("alpha-repeat", length=4)
        >>> tokens = task.draw(3, torch.Generator().manual_seed(0))
        >>> task.quality(tokens)
        {'valid_rate': 1.0, 'mode_coverage': 0.11538461538461539}
    """

    name: TaskName
    description: str
    tokenizer: Tokenizer
    length: int
    draw: Callable[[int, torch.Generator], Tokens]
    validation: Tokens
    quality: Callable[[Tokens], dict[str, float]]
    padded: bool = False
    ends_at_pad: bool = False

    @property
    def vocab_size(self) -> int:
        """Symbols of the vocabulary, $V$."""
        return self.tokenizer.vocab_size

    def decode(self, tokens: Tokens) -> list[str]:
        """The text of each sequence (padding dropped)."""
        return self.tokenizer.decode_batch(tokens)

    def mask(self, tokens: Tokens) -> TokenMask | None:
        """True where a token counts in the loss; ``None`` when all count.

        Padded sequences (``lines``) leave out every padding token; sequences that end at
        their first padding token (``words``) keep it, as the end marker, and leave out what
        follows it.

        Examples:
            >>> build_task("markov", length=4).mask(torch.zeros(2, 4, dtype=torch.long)) is None
            True
        """
        if self.padded:
            return tokens != self.tokenizer.pad_id
        if self.ends_at_pad:
            pads = (tokens == self.tokenizer.pad_id).long()
            return pads.cumsum(dim=-1) - pads == 0  # no padding before this position
        return None


@runtime_checkable
class DataSettings(Protocol):
    """The settings of a run that make its task: the examples' ``Config`` has them all."""

    @property
    def task(self) -> str:
        """One of `TASKS`."""
        ...

    @property
    def length(self) -> int:
        """Tokens per sequence."""
        ...

    @property
    def seed(self) -> int:
        """Seeds the synthetic tasks' validation sequences."""
        ...

    @property
    def text(self) -> str | None:
        """A ``.txt`` file or folder for the corpus task."""
        ...

    @property
    def tokenizer(self) -> str:
        """A spec: ``char | bpe:N | PATH/tokenizer.json | hf:NAME``."""
        ...

    @property
    def lines(self) -> bool:
        """One sequence per line (or dataset row), padded."""
        ...

    @property
    def dataset(self) -> str | None:
        """A ``datasets`` name or a local file."""
        ...

    @property
    def split(self) -> str:
        """The dataset's split."""
        ...

    @property
    def column(self) -> str:
        """The dataset's text column."""
        ...

    @property
    def streaming(self) -> bool:
        """Read the dataset lazily."""
        ...

    @property
    def limit(self) -> int | None:
        """Read at most this many dataset rows."""
        ...


@dataclass(frozen=True)
class TaskSettings:
    """The data flags of the example scripts, as the first fields of their settings dataclass.

    With a ``seed`` field added (as the examples' ``Config`` does), the settings are
    `DataSettings`. Every field is a flag of `flowlm.train.add_settings`: ``--task``,
    ``--text``, ``--tokenizer``, ``--lines``, ``--dataset``, ``--split``, ``--column``,
    ``--streaming``, ``--limit``, ``--length``.

    Attributes:
        task: one of `TASKS`.
        text: a ``.txt`` file or a folder of them, for the corpus task (default: the Bible).
        tokenizer: ``char | bpe:N | PATH/tokenizer.json | hf:NAME``.
        lines: one sequence per line (or dataset row), padded; the loss is masked.
        dataset: a Hugging Face dataset or a local ``.txt/.json/.jsonl/.csv`` file.
        split: the dataset's split.
        column: the dataset's text column.
        streaming: read the dataset lazily.
        limit: read at most this many dataset rows.
        length: tokens per sequence.

    Examples:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class Settings(TaskSettings):
        ...     seed: int = 0
        >>> task_of(Settings(task="alpha-repeat", length=8)).vocab_size
        26
    """

    task: str = "corpus"
    text: str | None = None
    tokenizer: str = "char"
    lines: bool = False
    dataset: str | None = None
    split: str = "train"
    column: str = "text"
    streaming: bool = False
    limit: int | None = None
    length: int = 64


def task_of(settings: DataSettings, tokenizer: Tokenizer | None = None) -> Task:
    """The task of a run's settings, with a saved ``tokenizer`` (else the spec's new one).

    A checkpoint's tokenizer is reused as it is, so a BPE is not retrained and a Hub
    tokenizer is not downloaded on ``--resume``.

    Raises:
        ValueError: settings `build_task` refuses, or a synthetic task's saved vocabulary is
            not the task's.

    Examples:
        >>> from types import SimpleNamespace
        >>> settings = SimpleNamespace(task="markov", length=8, seed=0, text=None,
        ...     tokenizer="char", lines=False, dataset=None, split="train", column="text",
        ...     streaming=False, limit=None)
        >>> task_of(settings).vocab_size
        16
    """
    task = build_task(
        settings.task,
        settings.length,
        None if settings.text is None else Path(settings.text),
        settings.seed,
        tokenizer=settings.tokenizer if tokenizer is None else tokenizer,
        lines=settings.lines,
        dataset=settings.dataset,
        split=settings.split,
        column=settings.column,
        streaming=settings.streaming,
        limit=settings.limit,
    )
    if tokenizer is not None and task.tokenizer != tokenizer:
        raise ValueError(f"the checkpoint was trained on another vocabulary than {task.name}'s")
    return task


def build_task(
    name: str,
    length: int,
    text: Path | None = None,
    seed: int = 0,
    *,
    tokenizer: str | Tokenizer = "char",
    lines: bool = False,
    dataset: str | None = None,
    split: str = "train",
    column: str = "text",
    streaming: bool = False,
    limit: int | None = None,
) -> Task:
    """The task ``name`` with sequences of ``length`` tokens.

    The corpus task's data: ``dataset`` if given (`load_dataset_documents`), else ``text``,
    else the King James Bible. Its sequences: one per line (or dataset row) cut and padded
    to ``length`` with ``lines`` (`SequenceCorpus.from_lines`); else a dataset's rows packed
    into windows (`SequenceCorpus.packed`); else random windows of the text
    (`TextCorpus.sample_windows`). 5% of the documents (or lines) are held out, and a
    tokenizer spec is trained on the other 95% (``char``: on all the text, so that every
    character encodes).

    Args:
        name: one of `TASKS`.
        length: positions per sequence, at least 1.
        text: a ``.txt`` file or a folder of them for the corpus task (default: the King
            James Bible).
        seed: seeds the synthetic tasks' validation sequences.
        tokenizer: the corpus task's tokenizer, or its spec (`flowlm.data.build_tokenizer`).
        lines: one sequence per line, padded; the loss leaves the padding out (`Task.mask`).
        dataset: a Hugging Face dataset name or a local ``.txt``/``.json``/``.jsonl``/
            ``.csv`` file, for the corpus task.
        split: the dataset's split.
        column: the dataset's text column.
        streaming: read the dataset lazily (with ``limit``, only the rows used).
        limit: read at most this many dataset rows.

    Raises:
        ValueError: an unknown task, corpus options given to a synthetic task, both a text
            and a dataset, or too little text for ``length``.

    The words task takes the corpus's text (``text``, else the King James Bible): its words
    are the runs of letters of the lowercased text, those of at most ``length`` letters are
    kept, and each sequence is one of them drawn with its frequency in the text, padded to
    ``length``.

    Examples:
        >>> build_task("markov", length=8).quality(torch.zeros(2, 8, dtype=torch.long)) == {}
        False
    """
    if length < 1:
        raise ValueError(f"--length must be at least 1, got {length}")
    if name != "corpus":
        given = {"--dataset": dataset is not None, "--lines": lines}
        given["--text"] = text is not None and name != "words"
        given["--tokenizer"] = tokenizer != "char" and not isinstance(tokenizer, CharTokenizer)
        for flag in (flag for flag, present in given.items() if present):
            raise ValueError(f"{flag} is an option of the corpus task; it has no use with {name}")
    validation_generator = torch.Generator().manual_seed(seed)
    if name == "words":
        documents = load_kjv() if text is None else load_text(text)
        source = "the King James Bible" if text is None else str(text)
        return _words_task(source, documents, length, validation_generator)
    if name == "alpha-repeat":
        alpha = AlphaRepeat(ALPHA_SYMBOLS, length)
        return Task(
            name="alpha-repeat",
            description=f"alpha-repeat: one of {ALPHA_SYMBOLS} letters repeated {length} times",
            tokenizer=CharTokenizer(string.ascii_lowercase[:ALPHA_SYMBOLS]),
            length=length,
            draw=alpha.sample,
            validation=alpha.sample(VALIDATION_SEQUENCES, validation_generator),
            quality=lambda tokens: {
                "valid_rate": alpha.valid_rate(tokens),
                "mode_coverage": alpha.mode_coverage(tokens),
            },
        )
    if name == "markov":
        chain = MarkovChain(MARKOV_SYMBOLS, order=MARKOV_ORDER, seed=MARKOV_SEED)
        rate = chain.entropy_rate()
        return Task(
            name="markov",
            description=(
                f"markov: order-{MARKOV_ORDER} chain over {MARKOV_SYMBOLS} symbols, length "
                f"{length}, entropy rate {rate:.3f} nats (perplexity {math.exp(rate):.3f})"
            ),
            tokenizer=CharTokenizer(string.hexdigits[:MARKOV_SYMBOLS]),
            length=length,
            draw=lambda batch_size, generator: chain.sample(batch_size, length, generator),
            validation=chain.sample(VALIDATION_SEQUENCES, length, validation_generator),
            quality=lambda tokens: {"exact_ppl": chain.exact_perplexity(tokens)},
        )
    if name == "corpus":
        if text is not None and dataset is not None:
            raise ValueError("--text and --dataset both give the corpus text: give one")
        if dataset is not None:
            source = f"{dataset} ({split})"
            documents = load_dataset_documents(
                dataset, split, column, streaming=streaming, limit=limit
            )
        elif text is None:
            source, documents = "the King James Bible", load_kjv()
        else:
            source, documents = str(text), load_text(text)
        if lines:
            return _line_task(source, documents, tokenizer, length)
        if dataset is not None:
            return _packed_task(source, documents, tokenizer, length)
        return _window_task(source, documents, tokenizer, length)
    raise ValueError(f"unknown task {name!r}: choose one of {TASKS}")


def _words_task(
    source: str, documents: list[Document], length: int, validation_generator: torch.Generator
) -> Task:
    r"""One word of the documents per sequence, drawn by its frequency, padded to ``length``.

    A sample is a real word when its letters before the first padding token (all of them
    when there is none) are a word of the list. The measures of ``n`` samples:
    ``real_words``, the fraction that are; ``distinct_words``, how many different real words
    they hold; ``data_distinct_words``, the expected number of different words in ``n``
    draws of the data, $\sum_w 1 - (1 - p_w)^n$ (exact); and ``distinct_ratio``, the
    quotient of the two.
    """
    counts = Counter(
        word
        for _, text in documents
        for word in re.findall(f"[{string.ascii_lowercase}]+", text.lower())
        if len(word) <= length
    )
    if not counts:
        raise ValueError(f"{source} has no word of at most --length {length} letters")
    words = sorted(counts, key=lambda word: (-counts[word], word))
    frequencies = torch.tensor([counts[word] for word in words], dtype=torch.float64)
    probabilities = frequencies / frequencies.sum()
    tokenizer = CharTokenizer(string.ascii_lowercase, specials=(PAD,))
    rows = torch.stack([_padded(tokenizer, word, length) for word in words])

    def draw(batch_size: int, generator: torch.Generator) -> Tokens:
        return rows[torch.multinomial(probabilities, batch_size, True, generator=generator)]

    known = set(words)

    def quality(tokens: Tokens) -> dict[str, float]:
        texts = _until_first_pad(tokenizer, tokens)
        real = [text for text in texts if text in known]
        expected = -torch.expm1(len(texts) * torch.log1p(-probabilities)).sum().item()
        return {
            "real_words": len(real) / len(texts),
            "distinct_words": float(len(set(real))),
            "data_distinct_words": expected,
            "distinct_ratio": len(set(real)) / expected,
        }

    return Task(
        name="words",
        description=(
            f"words: the {len(words)} words of at most {length} letters of {source} "
            f"({frequencies.sum():.0f} occurrences), drawn by frequency, padded to {length}"
        ),
        tokenizer=tokenizer,
        length=length,
        draw=draw,
        validation=draw(VALIDATION_SEQUENCES, validation_generator),
        quality=quality,
        ends_at_pad=True,
    )


def _padded(tokenizer: CharTokenizer, word: str, length: int) -> Int[Tensor, " length"]:
    """The ids of ``word`` followed by padding up to ``length``."""
    padding = torch.full((length - len(word),), tokenizer.pad_id or 0, dtype=torch.long)
    return torch.cat([tokenizer.encode(word), padding])


def _until_first_pad(tokenizer: CharTokenizer, tokens: Tokens) -> list[str]:
    """The text of each sequence before its first padding token."""
    texts: list[str] = []
    for row in tokens.cpu().tolist():
        end = row.index(tokenizer.pad_id) if tokenizer.pad_id in row else len(row)
        texts.append(tokenizer.decode(row[:end]))
    return texts


def _window_task(
    source: str, documents: list[Document], tokenizer: str | Tokenizer, length: int
) -> Task:
    """Random windows of the concatenated documents of the training split."""
    documents = _enough_documents(documents)
    tokenizer, training = _tokenizer_and_training_texts(
        documents, tokenizer, (), separator=DOCUMENT_SEPARATOR
    )
    corpus = TextCorpus.split(documents, VALIDATION_FRACTION, tokenizer)
    for split in ("train", "validation"):
        available = corpus.tokens(split).numel()
        if available < length:
            raise ValueError(
                f"--length {length} is longer than the {split} split of {source} "
                f"({available} tokens): lower --length or give more text"
            )
    windows = min(VALIDATION_SEQUENCES, corpus.tokens("validation").numel() // length)
    return Task(
        name="corpus",
        description=(
            f"corpus: {source}, {len(corpus.train)} training and {len(corpus.validation)} "
            f"validation documents, {tokenizer.vocab_size} tokens, windows of {length}"
        ),
        tokenizer=tokenizer,
        length=length,
        draw=lambda batch_size, generator: corpus.sample_windows(
            "train", batch_size, length, generator
        ),
        validation=corpus.fixed_windows("validation", length, count=windows),
        quality=_word_quality(tokenizer, training),
    )


def _line_task(
    source: str, documents: list[Document], tokenizer: str | Tokenizer, length: int
) -> Task:
    """One sequence per non-empty line of the documents, cut and padded to ``length``."""
    lines = [line for _, text in documents for line in text.split("\n") if line.strip()]
    tokenizer, training = _tokenizer_and_training_texts(
        [(str(i), line) for i, line in enumerate(lines)], tokenizer, (PAD,)
    )
    corpus = SequenceCorpus.from_lines(lines, tokenizer, length, VALIDATION_FRACTION)
    return _sequence_task(
        f"corpus: {source}, {len(training)} training and {len(lines) - len(training)} "
        f"validation lines, {tokenizer.vocab_size} tokens, padded to {length}",
        corpus,
        training,
        padded=True,
    )


def _packed_task(
    source: str, documents: list[Document], tokenizer: str | Tokenizer, length: int
) -> Task:
    """The documents' tokens, each followed by a separator, cut into windows of ``length``."""
    tokenizer, training = _tokenizer_and_training_texts(documents, tokenizer, (EOS,))
    corpus = SequenceCorpus.packed(documents, tokenizer, length, VALIDATION_FRACTION)
    return _sequence_task(
        f"corpus: {source}, {len(training)} training and {len(documents) - len(training)} "
        f"validation documents, {tokenizer.vocab_size} tokens, packed into windows of {length}",
        corpus,
        training,
        padded=False,
    )


def _sequence_task(
    description: str, corpus: SequenceCorpus, training: list[str], padded: bool
) -> Task:
    """A task drawing rows of ``corpus``, validated on up to `VALIDATION_SEQUENCES` of its own."""
    held_out = corpus.validation.shape[0]
    if held_out == 0:
        raise ValueError(f"{description}: no validation sequence; give more text")
    picks = torch.arange(min(VALIDATION_SEQUENCES, held_out)) * held_out
    picks = picks // min(VALIDATION_SEQUENCES, held_out)  # evenly through the held-out rows
    return Task(
        name="corpus",
        description=description,
        tokenizer=corpus.tokenizer,
        length=corpus.length,
        draw=lambda batch_size, generator: corpus.sample("train", batch_size, generator)[0],
        validation=corpus.validation[picks],
        quality=_word_quality(corpus.tokenizer, training),
        padded=padded,
    )


def _tokenizer_and_training_texts(
    documents: list[Document],
    tokenizer: str | Tokenizer,
    specials: tuple[str, ...],
    separator: str = "",
) -> tuple[Tokenizer, list[str]]:
    """The tokenizer, and the texts of the documents the corpora train on.

    A spec is built on the training texts, ``char`` on all the text and the ``separator``
    placed between documents (so every character encodes).
    """
    held_out = validation_positions(len(documents), VALIDATION_FRACTION, "documents")
    training = [text for i, (_, text) in enumerate(documents) if i not in held_out]
    if isinstance(tokenizer, str):
        texts = [separator, *(text for _, text in documents)] if tokenizer == "char" else training
        tokenizer = build_tokenizer(tokenizer, texts, specials)
    return tokenizer, training


def _word_quality(
    tokenizer: Tokenizer, training: list[str]
) -> Callable[[Tokens], dict[str, float]]:
    """The corpus measures: distinct token bigrams, and whole words of the text seen in training."""
    known_words = {word for text in training for word in text.split()}

    def quality(tokens: Tokens) -> dict[str, float]:
        return {
            "distinct_2": distinct_n(tokens, 2, tokenizer.vocab_size).item(),
            "known_words": _known_word_rate(tokenizer.decode_batch(tokens), known_words),
        }

    return quality


def _enough_documents(documents: list[Document]) -> list[Document]:
    """Your documents, or, with fewer than `MIN_DOCUMENTS`, their text cut into that many."""
    if len(documents) >= MIN_DOCUMENTS:
        return documents
    text = "\n\n".join(document for _, document in documents)
    cuts = [len(text) * i // MIN_DOCUMENTS for i in range(MIN_DOCUMENTS + 1)]
    return [(f"part {i}", text[cuts[i] : cuts[i + 1]]) for i in range(MIN_DOCUMENTS)]


def _known_word_rate(texts: list[str], known_words: set[str]) -> float:
    """Fraction of the whole words of the samples (not the cut first and last) seen in training."""
    words = [word for text in texts for word in text.split()[1:-1]]
    return sum(word in known_words for word in words) / len(words) if words else 0.0

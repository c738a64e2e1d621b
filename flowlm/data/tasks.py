"""The examples' tasks: sequences to learn, fixed validation sequences and quality measures.

- ``corpus``: windows of characters of the embedded King James Bible (or your own text),
  judged by the fraction of distinct character bigrams and of whole words seen in training.
- ``alpha-repeat``: one of 26 letters repeated; judged by the valid rate and mode coverage.
- ``markov``: a fixed order-1 chain over 16 symbols; judged by the exact perplexity.
"""

import math
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch

from flowlm._types import Tokens
from flowlm.data.corpus import Document, TextCorpus, load_kjv, load_text
from flowlm.data.synthetic import AlphaRepeat, MarkovChain
from flowlm.data.tokenizer import CharTokenizer
from flowlm.metrics import distinct_n

__all__ = ["TASKS", "Task", "TaskName", "build_task"]

TaskName = Literal["corpus", "alpha-repeat", "markov"]
TASKS: tuple[TaskName, ...] = get_args(TaskName)
ALPHA_SYMBOLS = 26
MARKOV_SYMBOLS = 16
MARKOV_ORDER = 1
MARKOV_SEED = 0
"""The Markov task is one fixed chain, whatever the run's seed."""
MIN_DOCUMENTS = 20
"""Your text is cut into this many pieces when it has fewer files, so 5% can be held out."""
VALIDATION_SEQUENCES = 64


@dataclass(frozen=True)
class Task:
    """Sequences to learn, fixed validation sequences, their vocabulary and quality measures.

    Attributes:
        name: one of `TASKS`.
        description: one line for a run's header.
        tokenizer: the vocabulary; checkpoints store it.
        length: positions per sequence.
        draw: ``draw(batch_size, generator)`` returns training sequences (a CPU generator).
        validation: fixed sequences for the validation loss.
        quality: the task's measures of a batch of samples (entropy comes separately).

    Examples:
        >>> task = build_task("alpha-repeat", length=4)
        >>> tokens = task.draw(3, torch.Generator().manual_seed(0))
        >>> task.quality(tokens)
        {'valid_rate': 1.0, 'mode_coverage': 0.11538461538461539}
    """

    name: TaskName
    description: str
    tokenizer: CharTokenizer
    length: int
    draw: Callable[[int, torch.Generator], Tokens]
    validation: Tokens
    quality: Callable[[Tokens], dict[str, float]]

    @property
    def vocab_size(self) -> int:
        """Symbols of the vocabulary, $V$."""
        return self.tokenizer.vocab_size

    def decode(self, tokens: Tokens) -> list[str]:
        """The text of each sequence."""
        return self.tokenizer.decode_batch(tokens)


def build_task(name: str, length: int, text: Path | None = None, seed: int = 0) -> Task:
    """The task ``name`` with sequences of ``length`` tokens.

    Args:
        name: one of `TASKS`.
        length: positions per sequence, at least 1.
        text: a ``.txt`` file or a folder of them for the corpus task (default: the King
            James Bible).
        seed: seeds the synthetic tasks' validation sequences.

    Raises:
        ValueError: an unknown task, a text given to a synthetic task, or a text shorter than
            a window.

    Examples:
        >>> build_task("markov", length=8).quality(torch.zeros(2, 8, dtype=torch.long)) == {}
        False
    """
    if length < 1:
        raise ValueError(f"--length must be at least 1, got {length}")
    if text is not None and name != "corpus":
        raise ValueError(f"--text gives the corpus task its text; it has no use with {name}")
    validation_generator = torch.Generator().manual_seed(seed)
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
        return _corpus_task(length, text)
    raise ValueError(f"unknown task {name!r}: choose one of {TASKS}")


def _corpus_task(length: int, text: Path | None) -> Task:
    if text is None:
        source, documents = "the King James Bible", load_kjv()
    else:
        source, documents = str(text), _enough_documents(load_text(text))
    corpus = TextCorpus.split(documents)
    for split in ("train", "validation"):
        available = corpus.tokens(split).numel()
        if available < length:
            raise ValueError(
                f"--length {length} is longer than the {split} split of {source} "
                f"({available} characters): lower --length or give more text"
            )
    windows = min(VALIDATION_SEQUENCES, corpus.tokens("validation").numel() // length)
    vocab_size = corpus.tokenizer.vocab_size
    known_words = {word for _, document in corpus.train for word in document.split()}

    def quality(tokens: Tokens) -> dict[str, float]:
        return {
            "distinct_2": distinct_n(tokens, 2, vocab_size).item(),
            "known_words": _known_word_rate(corpus.tokenizer.decode_batch(tokens), known_words),
        }

    return Task(
        name="corpus",
        description=(
            f"corpus: {source}, {len(corpus.train)} training and {len(corpus.validation)} "
            f"validation documents, {vocab_size} characters, windows of {length}"
        ),
        tokenizer=corpus.tokenizer,
        length=length,
        draw=lambda batch_size, generator: corpus.sample_windows(
            "train", batch_size, length, generator
        ),
        validation=corpus.fixed_windows("validation", length, count=windows),
        quality=quality,
    )


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

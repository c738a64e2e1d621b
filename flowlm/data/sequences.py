"""Fixed-length sequences: one per line (padded), or documents packed into windows.

The two ways the paper's reference code feeds LM1B: unwrapped, each sentence one sequence
padded to the length, and wrapped (``lm1b-wrap``), every document's tokens concatenated with
an end-of-sequence id after each and cut into windows. `SequenceCorpus` holds the rows of
both splits with a padding mask, and draws batches from them.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from flowlm._types import TokenMask, Tokens
from flowlm.data.corpus import Document, Split, validation_positions
from flowlm.data.protocol import Tokenizer


def load_lines(path: str | Path) -> list[str]:
    r"""The non-empty lines of a text file, or of every ``.txt`` file of a folder (by name).

    Lines keep their inner spaces; the line break (``\n`` or ``\r\n``) is dropped, and a
    line of only whitespace counts as empty.

    Raises:
        FileNotFoundError: there is nothing at ``path``.
        ValueError: a folder holds no ``.txt`` file, or no line has text.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = (Path(folder) / "a.txt").write_text("one line\n\n  \nanother\r\n")
        ...     load_lines(folder)
        ['one line', 'another']
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no text file or folder at {path}")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"the folder {path} holds no .txt files")
    lines = [
        line.removesuffix("\r")
        for file in files
        for line in file.read_text(encoding="utf-8").split("\n")
        if line.strip()
    ]
    if not lines:
        raise ValueError(f"{path} holds no non-empty line")
    return lines


@dataclass(frozen=True, eq=False)
class SequenceCorpus:
    """Rows of ``length`` token ids for training and validation, with their padding masks.

    Masks are True on real tokens and False on padding (`Tokenizer.pad_id`), so a loss
    reduced with the mask ignores padding. Build one with `from_lines` or `packed`.

    Args:
        train: the training rows.
        train_mask: True where a training token is not padding.
        validation: the held-out rows (possibly none).
        validation_mask: True where a validation token is not padding.
        tokenizer: what encoded the rows.

    Examples:
        >>> from flowlm.data import CharTokenizer
        >>> tokenizer = CharTokenizer("abc", specials=("<pad>",))
        >>> corpus = SequenceCorpus.from_lines(["ab", "cab", "abcabc"], tokenizer, 4, 0.0)
        >>> corpus.train
        tensor([[1, 2, 0, 0],
                [3, 1, 2, 0],
                [1, 2, 3, 1]])
        >>> tokenizer.decode_batch(corpus.train)
        ['ab', 'cab', 'abca']
    """

    train: Int[Tensor, "train seq"]
    train_mask: Bool[Tensor, "train seq"]
    validation: Int[Tensor, "validation seq"]
    validation_mask: Bool[Tensor, "validation seq"]
    tokenizer: Tokenizer

    @property
    def length(self) -> int:
        """Tokens per row.

        Examples:
            >>> from flowlm.data import CharTokenizer
            >>> SequenceCorpus.from_lines(["ab"], CharTokenizer("ab", ("<pad>",)), 5, 0.0).length
            5
        """
        return self.train.shape[1]

    @classmethod
    def from_lines(
        cls,
        lines: list[str],
        tokenizer: Tokenizer,
        length: int,
        validation_fraction: float = 0.05,
    ) -> "SequenceCorpus":
        """One sequence per line: encoded, cut after ``length`` tokens, padded to ``length``.

        Whole lines are held out for validation, at `validation_positions`. No BOS or EOS is
        added: the padding after a line marks its end.

        Raises:
            ValueError: the tokenizer has no padding id, ``length`` is not positive, or
                there are no lines or too few to hold some out.

        Examples:
            >>> from flowlm.data import CharTokenizer
            >>> tokenizer = CharTokenizer("ab", ("<pad>",))
            >>> corpus = SequenceCorpus.from_lines(["a", "b", "ab", "ba"], tokenizer, 2, 0.25)
            >>> tokenizer.decode_batch(corpus.validation), corpus.validation_mask
            (['ab'], tensor([[True, True]]))
        """
        pad_id = tokenizer.pad_id
        if pad_id is None:
            raise ValueError(
                "one-sequence-per-line data is padded, but the tokenizer has no padding id: "
                "give a CharTokenizer the '<pad>' special (specials=('<pad>',)) or use a "
                "subword tokenizer"
            )
        _check_length(length)
        if not lines:
            raise ValueError("there are no lines")
        held_out = validation_positions(len(lines), validation_fraction, "lines")
        kept = [ids[:length] for ids in tokenizer.encode_batch(lines)]
        counts = torch.tensor([ids.numel() for ids in kept])
        mask = torch.arange(length) < counts[:, None]
        rows = torch.full((len(lines), length), pad_id, dtype=torch.long)
        rows[mask] = torch.cat(kept)  # row-major order: each line's ids fill its row's prefix
        is_validation = torch.zeros(len(lines), dtype=torch.bool)
        is_validation[list(held_out)] = True
        return cls(
            train=rows[~is_validation],
            train_mask=mask[~is_validation],
            validation=rows[is_validation],
            validation_mask=mask[is_validation],
            tokenizer=tokenizer,
        )

    @classmethod
    def packed(
        cls,
        documents: list[Document],
        tokenizer: Tokenizer,
        length: int,
        validation_fraction: float = 0.05,
    ) -> "SequenceCorpus":
        """Documents packed into windows (the reference's ``lm1b-wrap``): no padding.

        Whole documents are held out for validation, at `validation_positions`. In each
        split, every document's ids are followed by one separator id (the tokenizer's
        `Tokenizer.eos_id`, else its `Tokenizer.bos_id`), all concatenated in order and cut
        into consecutive windows of ``length``; the tokens after the last full window are
        dropped. Every mask is all True.

        Raises:
            ValueError: the tokenizer has neither an EOS nor a BOS id, ``length`` is not
                positive, or a split holds fewer than ``length`` tokens.

        Examples:
            >>> from flowlm.data import CharTokenizer
            >>> tokenizer = CharTokenizer("abc", specials=("<eos>",))
            >>> corpus = SequenceCorpus.packed([("1", "ab"), ("2", "cab")], tokenizer, 3, 0.0)
            >>> tokenizer.decode_batch(corpus.train)
            ['ab<eos>', 'cab']
        """
        separator = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
        if separator is None:
            raise ValueError(
                "packing documents needs a separator id, but the tokenizer has neither an "
                "EOS nor a BOS id: give a CharTokenizer the '<eos>' special "
                "(specials=('<eos>',)) or use a subword tokenizer"
            )
        _check_length(length)
        if not documents:
            raise ValueError("there are no documents to pack")
        held_out = validation_positions(len(documents), validation_fraction, "documents")
        encoded = tokenizer.encode_batch([text for _, text in documents])
        ending = torch.tensor([separator])

        def windows(in_split: list[Tensor], split: Split) -> Int[Tensor, "rows seq"]:
            if not in_split:
                return torch.zeros((0, length), dtype=torch.long)
            stream = torch.cat([piece for ids in in_split for piece in (ids, ending)])
            if stream.numel() < length:
                raise ValueError(
                    f"the {split} split holds {stream.numel()} tokens, fewer than one window "
                    f"of {length}; lower the length or give more text"
                )
            count = stream.numel() // length
            return stream[: count * length].view(count, length)

        train = windows([ids for i, ids in enumerate(encoded) if i not in held_out], "train")
        validation = windows([ids for i, ids in enumerate(encoded) if i in held_out], "validation")
        return cls(
            train=train,
            train_mask=torch.ones_like(train, dtype=torch.bool),
            validation=validation,
            validation_mask=torch.ones_like(validation, dtype=torch.bool),
            tokenizer=tokenizer,
        )

    def rows(self, split: Split) -> tuple[Int[Tensor, "rows seq"], Bool[Tensor, "rows seq"]]:
        """Every row of a split with its mask.

        Examples:
            >>> from flowlm.data import CharTokenizer
            >>> tokenizer = CharTokenizer("ab", ("<pad>",))
            >>> SequenceCorpus.from_lines(["ab", "b"], tokenizer, 2, 0.0).rows("train")[1]
            tensor([[ True,  True],
                    [ True, False]])
        """
        if split == "train":
            return self.train, self.train_mask
        return self.validation, self.validation_mask

    def sample(
        self, split: Split, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[Tokens, TokenMask]:
        """``batch_size`` rows of a split drawn uniformly with replacement, with their masks.

        Raises:
            ValueError: the split has no rows.

        Examples:
            >>> from flowlm.data import CharTokenizer
            >>> tokenizer = CharTokenizer("ab", ("<pad>",))
            >>> corpus = SequenceCorpus.from_lines(["ab", "b", "ba"], tokenizer, 2, 0.0)
            >>> tokens, mask = corpus.sample("train", 5, torch.Generator().manual_seed(0))
            >>> tokens.shape, bool((mask == (tokens != 0)).all())
            (torch.Size([5, 2]), True)
        """
        tokens, mask = self.rows(split)
        if tokens.shape[0] == 0:
            raise ValueError(f"the {split} split has no rows")
        picks = torch.randint(tokens.shape[0], (batch_size,), generator=generator)
        return tokens[picks], mask[picks]


def _check_length(length: int) -> None:
    if length < 1:
        raise ValueError(f"the sequence length must be positive, got {length}")

"""A character-level tokenizer whose vocabulary is a string, saved with checkpoints."""

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import torch
from jaxtyping import Int
from torch import Tensor

from flowlm._types import Tokens

UNKNOWN = "<unk>"
"""The special that unknown characters encode to, when a tokenizer has it."""


@dataclass(frozen=True)
class CharTokenizer:
    """One token per character, over an explicit alphabet.

    Ids ``0 .. len(specials) - 1`` are the specials (strings such as ``"<pad>"``), then one id
    per character of ``alphabet``, in order. ``encode`` never produces a special, except
    ``"<unk>"`` for characters outside the alphabet when that special is present; without it,
    unknown characters raise. ``decode`` writes specials as their strings.

    Args:
        alphabet: the characters, each once; their order fixes the ids.
        specials: extra tokens placed first, each a distinct string not in the alphabet.

    Examples:
        >>> tokenizer = CharTokenizer("abc", specials=("<pad>",))
        >>> tokenizer.vocab_size
        4
        >>> tokenizer.encode("cab").tolist()
        [3, 1, 2]
        >>> tokenizer.decode([0, 1, 2])
        '<pad>ab'
    """

    alphabet: str
    specials: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.alphabet:
            raise ValueError("the alphabet of a CharTokenizer must not be empty")
        repeated = sorted({char for char in self.alphabet if self.alphabet.count(char) > 1})
        if repeated:
            raise ValueError(f"the alphabet repeats the characters {repeated}")
        if len(set(self.specials)) != len(self.specials) or "" in self.specials:
            raise ValueError(f"specials must be distinct non-empty strings, got {self.specials}")
        clashes = [special for special in self.specials if special in self.alphabet]
        if clashes:
            raise ValueError(f"specials {clashes} are also characters of the alphabet")

    @classmethod
    def from_text(cls, text: str, specials: tuple[str, ...] = ()) -> "CharTokenizer":
        """The tokenizer whose alphabet is the sorted distinct characters of ``text``.

        Examples:
            >>> CharTokenizer.from_text("hello world").alphabet
            ' dehlorw'
        """
        return cls("".join(sorted(set(text))), specials)

    @property
    def vocab_size(self) -> int:
        """Number of ids: specials plus characters.

        Examples:
            >>> CharTokenizer("ab", ("<unk>",)).vocab_size
            3
        """
        return len(self.specials) + len(self.alphabet)

    @cached_property
    def _ids(self) -> dict[str, int]:
        return {char: len(self.specials) + i for i, char in enumerate(self.alphabet)}

    @cached_property
    def _symbols(self) -> tuple[str, ...]:
        return self.specials + tuple(self.alphabet)

    def encode(self, text: str) -> Int[Tensor, " length"]:
        """Token ids of ``text`` as a 1-d ``torch.long`` tensor.

        Raises:
            ValueError: a character is outside the alphabet and there is no ``"<unk>"``.

        Examples:
            >>> CharTokenizer("ab").encode("abba")
            tensor([0, 1, 1, 0])
            >>> CharTokenizer("ab", ("<unk>",)).encode("abc").tolist()
            [1, 2, 0]
        """
        if UNKNOWN in self.specials:
            unknown_id = self.specials.index(UNKNOWN)
            ids = [self._ids.get(char, unknown_id) for char in text]
        else:
            try:
                ids = [self._ids[char] for char in text]
            except KeyError as error:
                char = error.args[0]
                raise ValueError(
                    f"character {char!r} (U+{ord(char):04X}, first at position "
                    f"{text.index(char)}) is not in the tokenizer's alphabet; add it to the "
                    f"alphabet or give the tokenizer an {UNKNOWN!r} special"
                ) from None
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Int[Tensor, " length"] | list[int]) -> str:
        """The text of a 1-d sequence of ids; specials appear as their strings.

        Examples:
            >>> CharTokenizer("ab").decode(torch.tensor([1, 0]))
            'ba'
        """
        values = ids.tolist() if isinstance(ids, Tensor) else ids
        outside = [value for value in values if not 0 <= value < self.vocab_size]
        if outside:
            raise ValueError(f"token ids {sorted(set(outside))} are outside [0, {self.vocab_size})")
        return "".join(self._symbols[value] for value in values)

    def decode_batch(self, tokens: Tokens) -> list[str]:
        """The text of each row of a batch of ids.

        Examples:
            >>> CharTokenizer("ab").decode_batch(torch.tensor([[0, 1], [1, 1]]))
            ['ab', 'bb']
        """
        return [self.decode(row) for row in tokens]

    def state_dict(self) -> dict[str, str | list[str]]:
        """The vocabulary as plain JSON-able values, to save with a checkpoint.

        Examples:
            >>> CharTokenizer("ab", ("<pad>",)).state_dict()
            {'alphabet': 'ab', 'specials': ['<pad>']}
        """
        return {"alphabet": self.alphabet, "specials": list(self.specials)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, str | list[str]]) -> "CharTokenizer":
        """The tokenizer saved by `state_dict`.

        Examples:
            >>> tokenizer = CharTokenizer("ab", ("<pad>",))
            >>> CharTokenizer.from_state_dict(tokenizer.state_dict()) == tokenizer
            True
        """
        alphabet, specials = state["alphabet"], state["specials"]
        if not isinstance(alphabet, str) or isinstance(specials, str):
            raise ValueError(f"not a CharTokenizer state dict: {dict(state)!r:.200}")
        return cls(alphabet, tuple(specials))

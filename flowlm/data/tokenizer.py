"""A character-level tokenizer whose vocabulary is a string, saved with checkpoints."""

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import torch
from jaxtyping import Int
from torch import Tensor

from flowlm._types import Tokens
from flowlm.data.protocol import TokenizerState

UNKNOWN = "<unk>"
"""The special that unknown characters encode to, when a tokenizer has it."""
PAD = "<pad>"
"""The special that is the padding id, when a tokenizer has it."""
BOS = "<bos>"
"""The special that is the beginning-of-sequence id, when a tokenizer has it."""
EOS = "<eos>"
"""The special that is the end-of-sequence (document separator) id, when a tokenizer has it."""
CHAR_KIND = "char"
"""The ``"kind"`` of a `CharTokenizer`'s `CharTokenizer.state`."""


@dataclass(frozen=True)
class CharTokenizer:
    """One token per character, over an explicit alphabet: a `Tokenizer`.

    Ids ``0 .. len(specials) - 1`` are the specials (strings such as ``"<pad>"``), then one id
    per character of ``alphabet``, in order. ``encode`` never produces a special, except
    ``"<unk>"`` for characters outside the alphabet when that special is present; without it,
    unknown characters raise. ``decode`` drops the padding id and writes the other specials
    as their strings. The specials ``"<pad>"``, ``"<bos>"`` and ``"<eos>"``, when present,
    are the `pad_id`, `bos_id` and `eos_id`.

    Args:
        alphabet: the characters, each once; their order fixes the ids.
        specials: extra tokens placed first, each a distinct string not in the alphabet.

    Examples:
        >>> tokenizer = CharTokenizer("abc", specials=("<pad>",))
        >>> tokenizer.vocab_size
        4
        >>> tokenizer.encode("cab").tolist()
        [3, 1, 2]
        >>> tokenizer.decode([1, 2, 0, 0])
        'ab'
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

    def _special_id(self, special: str) -> int | None:
        return self.specials.index(special) if special in self.specials else None

    @property
    def pad_id(self) -> int | None:
        """The id of the ``"<pad>"`` special, or ``None``.

        Examples:
            >>> CharTokenizer("ab", ("<eos>", "<pad>")).pad_id
            1
        """
        return self._special_id(PAD)

    @property
    def bos_id(self) -> int | None:
        """The id of the ``"<bos>"`` special, or ``None``.

        Examples:
            >>> CharTokenizer("ab").bos_id is None
            True
        """
        return self._special_id(BOS)

    @property
    def eos_id(self) -> int | None:
        """The id of the ``"<eos>"`` special, or ``None``.

        Examples:
            >>> CharTokenizer("ab", ("<eos>",)).eos_id
            0
        """
        return self._special_id(EOS)

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

    def encode_batch(self, texts: list[str]) -> list[Int[Tensor, " length"]]:
        """`encode` of each text.

        Examples:
            >>> CharTokenizer("ab").encode_batch(["ab", "b"])
            [tensor([0, 1]), tensor([1])]
        """
        return [self.encode(text) for text in texts]

    def decode(self, ids: Int[Tensor, " length"] | list[int]) -> str:
        """The text of a 1-d sequence of ids: padding dropped, other specials as their strings.

        Examples:
            >>> CharTokenizer("ab").decode(torch.tensor([1, 0]))
            'ba'
            >>> CharTokenizer("ab", ("<pad>", "<eos>")).decode([2, 1, 3, 0])
            'a<eos>b'
        """
        values = ids.tolist() if isinstance(ids, Tensor) else ids
        outside = [value for value in values if not 0 <= value < self.vocab_size]
        if outside:
            raise ValueError(f"token ids {sorted(set(outside))} are outside [0, {self.vocab_size})")
        pad_id = self.pad_id
        return "".join(self._symbols[value] for value in values if value != pad_id)

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

    def state(self) -> TokenizerState:
        """The `Tokenizer` state: `state_dict` tagged with ``"kind": "char"``.

        `flowlm.data.tokenizer_from_state` rebuilds the tokenizer from it.

        Examples:
            >>> CharTokenizer("ab").state()
            {'kind': 'char', 'alphabet': 'ab', 'specials': []}
        """
        return {"kind": CHAR_KIND, **self.state_dict()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, object]) -> "CharTokenizer":
        """The tokenizer saved by `state_dict` (or by `state`: the ``"kind"`` is ignored).

        Examples:
            >>> tokenizer = CharTokenizer("ab", ("<pad>",))
            >>> CharTokenizer.from_state_dict(tokenizer.state_dict()) == tokenizer
            True
        """
        alphabet, specials = state.get("alphabet"), state.get("specials")
        if not (
            isinstance(alphabet, str)
            and isinstance(specials, list)
            and all(isinstance(special, str) for special in specials)
        ):
            raise ValueError(f"not a CharTokenizer state dict: {dict(state)!r:.200}")
        return cls(alphabet, tuple(str(special) for special in specials))

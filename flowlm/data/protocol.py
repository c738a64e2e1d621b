"""The tokenizer protocol: what flowlm's corpora, checkpoints and judges need from a tokenizer.

Any object with these members is a `Tokenizer`; `CharTokenizer` and `SubwordTokenizer` are the
two implementations shipped with flowlm. The protocol is runtime-checkable, so a field or an
argument annotated `Tokenizer` accepts a duck-typed tokenizer under the runtime type checks of
``jaxtyping.install_import_hook(..., "beartype.beartype")``.
"""

from typing import Protocol, runtime_checkable

from jaxtyping import Int
from torch import Tensor

from flowlm._types import Tokens

TokenizerState = dict[str, object]
"""A tokenizer's JSON-able description (``json.dumps`` accepts it), from which it is rebuilt."""


@runtime_checkable
class Tokenizer(Protocol):
    """Text to token ids in ``[0, vocab_size)`` and back, with a state to save in checkpoints.

    The contract, tested for every implementation:

    - ``decode(encode(text)) == text`` for text the tokenizer covers (characters of a
      `CharTokenizer`'s alphabet; any text for a byte-level BPE);
    - ``encode`` never returns ``pad_id``, and ``decode`` drops it wherever it appears, so
      padded rows decode to their text; other specials are written as their strings;
    - ``tokenizer_from_state(json.loads(json.dumps(t.state())))`` equals ``t``.

    ``pad_id``, ``bos_id`` and ``eos_id`` are ``None`` when the tokenizer has no such token.

    Examples:
        >>> from flowlm.data import CharTokenizer
        >>> isinstance(CharTokenizer("ab"), Tokenizer)
        True
    """

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        ...

    @property
    def pad_id(self) -> int | None:
        """The padding id, or ``None``."""
        ...

    @property
    def bos_id(self) -> int | None:
        """The beginning-of-sequence id, or ``None``."""
        ...

    @property
    def eos_id(self) -> int | None:
        """The end-of-sequence (document separator) id, or ``None``."""
        ...

    def encode(self, text: str) -> Int[Tensor, " length"]:
        """Token ids of ``text``, a 1-d ``torch.long`` tensor, no special added."""
        ...

    def encode_batch(self, texts: list[str]) -> list[Int[Tensor, " length"]]:
        """`encode` of each text (subword implementations encode in parallel)."""
        ...

    def decode(self, ids: Int[Tensor, " length"] | list[int]) -> str:
        """The text of a 1-d sequence of ids, padding dropped."""
        ...

    def decode_batch(self, tokens: Tokens) -> list[str]:
        """`decode` of each row of a batch."""
        ...

    def state(self) -> TokenizerState:
        """A JSON-able description; `tokenizer_from_state` rebuilds the tokenizer from it."""
        ...

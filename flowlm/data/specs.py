"""Making a tokenizer from a short spec (a command-line flag) or from a saved state.

The spec grammar, for a flag such as ``--tokenizer``:

| spec | tokenizer |
|---|---|
| ``char`` | `CharTokenizer` over the characters of the text |
| ``bpe:N`` | byte-level BPE with ``N`` ids trained on the text (`train_bpe`) |
| ``PATH/tokenizer.json`` | that file (`SubwordTokenizer.from_file`) |
| ``hf:NAME`` | a `transformers` tokenizer, e.g. ``hf:gpt2`` (`SubwordTokenizer.from_pretrained`) |
"""

from collections.abc import Mapping, Sequence

from flowlm.data.hf import SUBWORD_KIND, SubwordTokenizer, train_bpe
from flowlm.data.protocol import Tokenizer
from flowlm.data.tokenizer import CHAR_KIND, CharTokenizer

TOKENIZER_SPECS = "char | bpe:N | PATH/tokenizer.json | hf:NAME"
"""The accepted forms of a tokenizer spec, as error messages and help texts show them."""


def build_tokenizer(
    spec: str, text: str | Sequence[str], specials: tuple[str, ...] = ()
) -> Tokenizer:
    """The tokenizer a spec names (see the module's table), trained on ``text`` if needed.

    Args:
        spec: ``char``, ``bpe:N``, a path ending in ``.json``, or ``hf:NAME``.
        text: the corpus (one string or one per document): the alphabet of ``char``, the
            training text of ``bpe:N``; unused by the others.
        specials: the specials of a ``char`` tokenizer (e.g. ``("<pad>",)`` for padded
            lines); subword tokenizers bring their own.

    Raises:
        ValueError: the spec is none of the accepted forms, or ``N`` is not an integer.
        FileNotFoundError: a ``.json`` spec names no file.
        OSError: a ``hf:`` tokenizer is neither cached nor downloadable.

    Examples:
        >>> build_tokenizer("char", "hello").vocab_size
        4
        >>> build_tokenizer("bpe:300", "hello hello").vocab_size <= 300
        True
        >>> build_tokenizer("word", "hello")
        Traceback (most recent call last):
        ...
        ValueError: unknown tokenizer 'word': expected char | bpe:N | PATH/tokenizer.json | hf:NAME
    """
    texts = [text] if isinstance(text, str) else text
    if spec == "char":
        return CharTokenizer("".join(sorted({char for part in texts for char in part})), specials)
    if spec.startswith("bpe:"):
        size = spec.removeprefix("bpe:")
        if not size.isdigit():
            raise ValueError(f"tokenizer {spec!r}: N in bpe:N must be a whole number, got {size!r}")
        return train_bpe(texts, int(size))
    if spec.startswith("hf:") and len(spec) > len("hf:"):
        return SubwordTokenizer.from_pretrained(spec.removeprefix("hf:"))
    if spec.endswith(".json"):
        return SubwordTokenizer.from_file(spec)
    raise ValueError(f"unknown tokenizer {spec!r}: expected {TOKENIZER_SPECS}")


def tokenizer_from_state(state: Mapping[str, object]) -> Tokenizer:
    """Rebuild the tokenizer whose `Tokenizer.state` is ``state`` (e.g. from a checkpoint).

    A state without ``"kind"`` is a `CharTokenizer.state_dict` (what older checkpoints
    hold).

    Raises:
        ValueError: ``state`` describes no known tokenizer.

    Examples:
        >>> import json
        >>> tokenizer = CharTokenizer("ab", ("<pad>",))
        >>> tokenizer_from_state(json.loads(json.dumps(tokenizer.state()))) == tokenizer
        True
        >>> tokenizer_from_state({"alphabet": "ab", "specials": []})
        CharTokenizer(alphabet='ab', specials=())
    """
    kind = state.get("kind", CHAR_KIND)
    if kind == CHAR_KIND:
        return CharTokenizer.from_state_dict(state)
    if kind == SUBWORD_KIND:
        return SubwordTokenizer.from_state(dict(state))
    raise ValueError(f"unknown tokenizer kind {kind!r}: expected {CHAR_KIND!r} or {SUBWORD_KIND!r}")

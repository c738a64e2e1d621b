from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from flowlm.data import CharTokenizer, SequenceCorpus, load_lines, train_bpe
from flowlm.data.corpus import validation_positions

PADDED = CharTokenizer("abc", specials=("<pad>", "<eos>"))
LINES = ["abc", "a", "cabba", "bb", "cc", "abcabcabc"]


def test_load_lines_of_a_file_and_of_a_folder(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("third\n")
    (tmp_path / "a.txt").write_text("first line\n\n   \n second\r\n")
    (tmp_path / "skip.md").write_text("not text")
    assert load_lines(tmp_path / "a.txt") == ["first line", " second"]
    assert load_lines(tmp_path) == ["first line", " second", "third"]


def test_load_lines_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no text file or folder"):
        load_lines(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"holds no \.txt files"):
        load_lines(tmp_path)
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no non-empty line"):
        load_lines(tmp_path)


@settings(deadline=None, max_examples=50)
@given(
    st.lists(st.text(alphabet="abc", min_size=1, max_size=12), min_size=2, max_size=12),
    st.integers(1, 8),
    st.sampled_from([0.0, 0.2, 0.45]),
)
def test_lines_are_truncated_padded_and_held_out_by_line(
    lines: list[str], length: int, fraction: float
) -> None:
    corpus = SequenceCorpus.from_lines(lines, PADDED, length, fraction)
    held_out = validation_positions(len(lines), fraction, "lines")
    for split, indices in (
        ("train", [i for i in range(len(lines)) if i not in held_out]),
        ("validation", sorted(held_out)),
    ):
        tokens, mask = corpus.rows(split)
        assert tokens.shape == mask.shape == (len(indices), length)
        for row, index in enumerate(indices):
            kept = lines[index][:length]  # one token per character
            assert PADDED.decode(tokens[row]) == kept
            assert mask[row].tolist() == [True] * len(kept) + [False] * (length - len(kept))
            assert (tokens[row][~mask[row]] == PADDED.pad_id).all()


def test_lines_with_a_bpe_decode_back_to_the_lines() -> None:
    text = "in the beginning was the word\nand the word was with god\nlet there be light"
    lines = text.split("\n")
    tokenizer = train_bpe(text, 300)
    corpus = SequenceCorpus.from_lines(lines, tokenizer, length=40, validation_fraction=0.0)
    assert tokenizer.decode_batch(corpus.train) == lines
    counts = [tokenizer.encode(line).numel() for line in lines]
    assert corpus.train_mask.sum(1).tolist() == counts


def test_lines_need_a_padding_id() -> None:
    with pytest.raises(ValueError, match="the tokenizer has no padding id"):
        SequenceCorpus.from_lines(["ab"], CharTokenizer("ab"), 4, 0.0)


@pytest.mark.parametrize("length", [0, -3])
def test_lengths_must_be_positive(length: int) -> None:
    with pytest.raises(ValueError, match="sequence length must be positive"):
        SequenceCorpus.from_lines(["ab"], PADDED, length, 0.0)
    with pytest.raises(ValueError, match="sequence length must be positive"):
        SequenceCorpus.packed([("a", "ab")], PADDED, length, 0.0)


def test_too_few_lines_to_hold_out() -> None:
    with pytest.raises(ValueError, match="there are no lines"):
        SequenceCorpus.from_lines([], PADDED, 4, 0.0)
    with pytest.raises(ValueError, match="cannot hold out 1 of 1 lines"):
        SequenceCorpus.from_lines(["ab"], PADDED, 4, 0.5)


@settings(deadline=None, max_examples=50)
@given(
    st.lists(st.text(alphabet="abc", min_size=0, max_size=9), min_size=2, max_size=10),
    st.integers(1, 5),
)
def test_packing_cuts_the_separated_stream_into_windows(texts: list[str], length: int) -> None:
    assume(sum(len(text) + 1 for text in texts) >= length)
    documents = [(str(i), text) for i, text in enumerate(texts)]
    corpus = SequenceCorpus.packed(documents, PADDED, length, validation_fraction=0.0)
    stream = "".join(text + "<eos>" for text in texts)
    stream_ids = torch.cat(
        [torch.cat([PADDED.encode(t), torch.tensor([PADDED.eos_id])]) for t in texts]
    )
    count = stream_ids.numel() // length
    assert torch.equal(corpus.train, stream_ids[: count * length].view(count, length))
    assert corpus.train_mask.all() and corpus.validation.shape == (0, length)
    assert "".join(PADDED.decode_batch(corpus.train)) == PADDED.decode(stream_ids[: count * length])
    assert PADDED.decode(stream_ids) == stream


def test_packing_holds_out_whole_documents() -> None:
    documents = [(str(i), "ab" * (i + 1)) for i in range(10)]
    corpus = SequenceCorpus.packed(documents, PADDED, 3, validation_fraction=0.2)
    held_out = sorted(validation_positions(10, 0.2, "documents"))
    assert held_out == [2, 7]
    validation_stream = "".join(PADDED.decode_batch(corpus.validation))
    expected = "".join(documents[i][1] + "<eos>" for i in held_out)
    assert expected.startswith(validation_stream)
    train_stream = "".join(PADDED.decode_batch(corpus.train))
    expected_train = "".join(documents[i][1] + "<eos>" for i in range(10) if i not in held_out)
    assert expected_train.startswith(train_stream)
    assert len(expected_train) - len(train_stream) < 3 * len("<eos>")  # less than one window


def test_packing_uses_bos_when_there_is_no_eos_and_needs_one_of_them() -> None:
    with_bos = CharTokenizer("ab", specials=("<bos>", "<pad>"))
    corpus = SequenceCorpus.packed([("1", "ab"), ("2", "b")], with_bos, 5, 0.0)
    assert corpus.train.tolist() == [[2, 3, 0, 3, 0]]
    with pytest.raises(ValueError, match="neither an EOS nor a BOS id"):
        SequenceCorpus.packed([("1", "ab")], CharTokenizer("ab"), 2, 0.0)


def test_packing_a_split_shorter_than_a_window_raises() -> None:
    with pytest.raises(ValueError, match="the validation split holds 3 tokens, fewer than"):
        SequenceCorpus.packed([("1", "abcabc"), ("2", "ab"), ("3", "abc")], PADDED, 4, 0.3)


def test_sample_draws_rows_with_their_masks() -> None:
    corpus = SequenceCorpus.from_lines(LINES, PADDED, 4, 0.0)
    generator = torch.Generator().manual_seed(0)
    tokens, mask = corpus.sample("train", 256, generator)
    assert tokens.shape == mask.shape == (256, 4)
    rows = {tuple(row) for row in corpus.train.tolist()}
    assert {tuple(row) for row in tokens.tolist()} == rows  # 256 draws hit all 6 rows
    assert torch.equal(mask, tokens != PADDED.pad_id)
    with pytest.raises(ValueError, match="the validation split has no rows"):
        corpus.sample("validation", 2)
    assert corpus.length == 4

"""Loading local text/JSON files through Hugging Face datasets, then packing them."""

import json
import sys
from pathlib import Path

import pytest
import torch

from flowlm.data import SequenceCorpus, TextCorpus, load_dataset_documents, train_bpe

pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

RECORDS = [
    {"text": "In the beginning God created the heaven and the earth.", "id": 1},
    {"text": "", "id": 2},
    {"text": "And the earth was without form, and void.", "id": 3},
    {"text": "And God said, Let there be light: and there was light.", "id": 4},
    {"text": "And God saw the light, that it was good.", "id": 5},
]
TEXTS = [record["text"] for record in RECORDS if record["text"]]


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "verses.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in RECORDS), encoding="utf-8")
    return path


@pytest.mark.parametrize("streaming", [False, True])
def test_a_local_json_lines_file_gives_one_document_per_record(
    jsonl: Path, tmp_path: Path, streaming: bool
) -> None:
    documents = load_dataset_documents(
        str(jsonl), streaming=streaming, cache_dir=tmp_path / "cache"
    )
    assert [text for _, text in documents] == TEXTS  # the empty record is skipped
    assert [name for name, _ in documents] == ["train/0", "train/2", "train/3", "train/4"]


def test_a_local_text_file_gives_one_document_per_line(tmp_path: Path) -> None:
    path = tmp_path / "verses.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    documents = load_dataset_documents(str(path), split="test", cache_dir=tmp_path / "cache")
    assert documents == [(f"test/{i}", text) for i, text in enumerate(TEXTS)]


def test_limit_reads_only_the_first_rows(jsonl: Path, tmp_path: Path) -> None:
    documents = load_dataset_documents(
        str(jsonl), streaming=True, limit=3, cache_dir=tmp_path / "cache"
    )
    assert [text for _, text in documents] == TEXTS[:2]  # rows 0, 1 (empty) and 2


def test_packed_like_lm1b_wrap(jsonl: Path, tmp_path: Path) -> None:
    documents = load_dataset_documents(str(jsonl), cache_dir=tmp_path / "cache")
    tokenizer = train_bpe(TEXTS, 300)
    corpus = SequenceCorpus.packed(documents, tokenizer, length=8, validation_fraction=0.25)
    assert tokenizer.eos_id is not None
    held_out = [2]  # validation_positions(4, 0.25): floor(0.5 * 4) = 2
    train_texts = [text for i, text in enumerate(TEXTS) if i not in held_out]
    stream = torch.cat(
        [
            torch.cat([tokenizer.encode(text), torch.tensor([tokenizer.eos_id])])
            for text in train_texts
        ]
    )
    count = stream.numel() // 8
    assert torch.equal(corpus.train, stream[: count * 8].view(count, 8))
    validation_text = tokenizer.decode(corpus.validation.flatten())
    assert corpus.validation.shape[0] >= 1 and (TEXTS[2] + "<eos>").startswith(validation_text)
    assert TextCorpus.split(documents, 0.25, tokenizer).validation == (documents[2],)


def test_a_missing_column_names_the_columns(jsonl: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has no column 'body': it has \['text', 'id'\]"):
        load_dataset_documents(str(jsonl), column="body", cache_dir=tmp_path / "cache")


def test_a_column_that_is_not_text_raises(jsonl: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="column 'id' holds int, not text"):
        load_dataset_documents(str(jsonl), column="id", cache_dir=tmp_path / "cache")


def test_an_unknown_file_format_raises(tmp_path: Path) -> None:
    path = tmp_path / "verses.xml"
    path.write_text("<verse/>")
    with pytest.raises(ValueError, match=r"cannot tell the format of .*verses.xml"):
        load_dataset_documents(str(path))


def test_a_missing_split_raises_clearly(jsonl: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="could not load split 'validation'"):
        load_dataset_documents(str(tmp_path), split="validation", cache_dir=tmp_path / "cache")


def test_a_bad_limit_raises(jsonl: Path) -> None:
    with pytest.raises(ValueError, match="limit must be positive, got 0"):
        load_dataset_documents(str(jsonl), limit=0)


def test_a_missing_datasets_package_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, jsonl: Path
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r'pip install "flowlm\[hf\]"'):
        load_dataset_documents(str(jsonl))

"""Documents from the Hugging Face ``datasets`` library: local files or Hub datasets.

`load_dataset_documents` turns one split of a dataset into `Document` pairs, which
`TextCorpus.split`, `SequenceCorpus.packed` and (their texts) `SequenceCorpus.from_lines`
take. ``datasets`` is optional (``pip install "flowlm[hf]"``) and imported by the call only.
"""

import importlib
from itertools import islice
from pathlib import Path

from flowlm.data.corpus import Document

LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}
"""The ``datasets`` builder of a local file, by extension (a ``.txt`` row is one line)."""


def load_dataset_documents(
    name_or_path: str,
    split: str = "train",
    column: str = "text",
    *,
    config: str | None = None,
    streaming: bool = False,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
) -> list[Document]:
    r"""One split of a dataset as documents ``(f"{split}/{row}", text)``, in dataset order.

    ``name_or_path`` is a local file (its builder from `LOCAL_BUILDERS`: ``.txt`` gives one
    document per line, ``.json``/``.jsonl``/``.csv`` one per record), a local folder, or a
    Hub name such as ``lm1b`` or ``Skylion007/openwebtext`` (downloaded into the Hugging Face
    cache). With ``streaming=True`` rows are read on the fly instead of preparing the whole
    dataset first, so ``limit`` rows of a large dataset cost only those rows. Rows whose text
    is empty are skipped.

    Args:
        name_or_path: a local file or folder, or a Hub dataset name.
        split: the split to read, e.g. ``"train"`` or ``"test"``.
        column: the column holding the text.
        config: the dataset's configuration name, if it has several.
        streaming: read rows lazily (for large Hub datasets).
        limit: read at most this many rows.
        cache_dir: where ``datasets`` keeps downloads and prepared data (by default the
            Hugging Face cache, ``~/.cache/huggingface/datasets``).

    Raises:
        ImportError: ``datasets`` is not installed.
        ValueError: the dataset or split cannot be loaded, or has no such column.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "notes.jsonl"
        ...     _ = path.write_text('{"text": "first"}\n{"text": "second"}\n')
        ...     load_dataset_documents(str(path), cache_dir=folder)
        [('train/0', 'first'), ('train/1', 'second')]
    """
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as missing:
        raise ImportError(
            'loading a dataset needs the package "datasets", an optional dependency of '
            'flowlm: run `pip install "flowlm[hf]"`'
        ) from missing
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    path = Path(name_or_path)
    if path.is_file():
        builder = LOCAL_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(
                f"cannot tell the format of {path}: expected one of {sorted(LOCAL_BUILDERS)}"
            )
        arguments = {"path": builder, "data_files": {split: str(path)}}
    else:
        arguments = {"path": name_or_path, "name": config}
    try:
        rows = datasets.load_dataset(
            **arguments,
            split=split,
            streaming=streaming,
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    except (OSError, ValueError, ConnectionError) as error:
        raise ValueError(
            f"could not load split {split!r} of the dataset {name_or_path!r} (a local file or "
            f"folder, or a Hub name; offline, a Hub dataset must be in the cache): {error}"
        ) from error
    columns = rows.column_names
    if columns is not None and column not in columns:
        raise ValueError(f"the dataset {name_or_path!r} has no column {column!r}: it has {columns}")
    documents: list[Document] = []
    for index, row in enumerate(islice(iter(rows), limit)):
        text = row[column]
        if not isinstance(text, str):
            raise ValueError(f"column {column!r} holds {type(text).__name__}, not text")
        if text:
            documents.append((f"{split}/{index}", text))
    return documents

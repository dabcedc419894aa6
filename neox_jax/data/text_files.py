"""Reading the corpus files other tools write: JSON lines or arrays, parquet, plain text.

Shared by preprocessing (``neox_jax.data.preprocess``) and the retrieval corpus
(``neox_jax.retrieval.rag.read_corpus``), so a file one of them reads the other reads too.

* ``.jsonl`` / ``.json`` / ``.ndjson``: one JSON value per line, or one JSON array (as
  pandas' and datasets' ``to_json(lines=False)`` write it);
* ``.parquet``: rows of a table (pyarrow, which the ``[datasets]`` extra brings);
* anything else: UTF-8 text.

Each may be compressed (``.gz``, ``.bz2``, ``.xz``, or ``.zst`` with the zstandard package:
GPT-NeoX reads The Pile's ``.jsonl.zst`` this way); it is read through.
"""

from __future__ import annotations

import bz2
import gzip
import io
import itertools
import json
import lzma
import os
from collections.abc import Iterator, Sequence

from neox_jax.errors import UserError
from neox_jax.optional import require

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


# "utf-8-sig" reads UTF-8, dropping the byte-order mark Windows tools put first (json.loads
# refuses one, and it is no text of the document).
_UTF8 = "utf-8-sig"


def open_text(path):
    """``path`` opened for reading UTF-8 text, decompressed by its suffix."""
    path = os.fspath(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding=_UTF8)
    if path.endswith(".bz2"):
        return bz2.open(path, "rt", encoding=_UTF8)
    if path.endswith(".xz"):
        return lzma.open(path, "rt", encoding=_UTF8)
    if path.endswith(".zst"):
        zstd = require("zstandard", f"reading the zstandard-compressed {path}")
        raw = zstd.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)  # noqa: SIM115
        return io.TextIOWrapper(raw, encoding=_UTF8)
    return open(path, encoding=_UTF8)


def file_kind(path) -> str:
    """``"json"``, ``"parquet"`` or ``"text"``, by the name with any compression removed."""
    name = os.fspath(path).lower()
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    if name.endswith(JSON_SUFFIXES):
        return "json"
    return "parquet" if name.endswith(".parquet") else "text"


def is_corpus_file(path, text_suffixes: Sequence[str]) -> bool:
    """Whether a folder's file is JSON, parquet or one of ``text_suffixes`` (compressed too)."""
    name = os.fspath(path).lower()
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    return file_kind(name) != "text" or name.endswith(tuple(text_suffixes))


def json_records(path) -> Iterator[tuple[int, object]]:
    """``(line or item number, value or JSONDecodeError)`` of a JSON-lines or JSON-array file.

    Blank lines are no records; an unparsable line comes back as its ``JSONDecodeError``
    so the caller decides whether to stop or skip.
    """
    with open_text(path) as f:
        skipped, first = 0, f.read(1)
        while first.isspace():  # leading blank lines: counted, so line numbers stay right
            skipped, first = skipped + (first == "\n"), f.read(1)
        if first == "[":
            try:
                yield from enumerate(json.loads(first + f.read()), start=1)
            except json.JSONDecodeError as e:
                yield skipped + e.lineno, e
            return
        lines = itertools.chain([first + f.readline()], f)
        for line_no, line in enumerate(lines, start=skipped + 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, e


def parquet_rows(path, columns: Sequence[str], what: str) -> Iterator[dict]:
    """The rows of a parquet file as dicts of ``columns`` (those it has, at least the first).

    Args:
      path: the file.
      columns: wanted columns; the first is required (the text), the others optional.
      what: the setting that names the first column, for the error.
    """
    pq = require("pyarrow.parquet", f"reading the parquet file {path}")
    table = pq.ParquetFile(path)
    names = table.schema_arrow.names
    if columns[0] not in names:
        raise UserError(
            f"{path} has no column {columns[0]!r} (columns: {names[:8]}); set {what} to the "
            "column holding the text"
        )
    present = [c for c in columns if c in names]
    for batch in table.iter_batches(columns=present):
        yield from batch.to_pylist()

"""Tokenize jsonl / text corpora into a Megatron indexed dataset (``.bin`` / ``.idx``).

The counterpart of GPT-NeoX ``tools/datasets/preprocess_data.py``: one document per
jsonl line (text under ``--jsonl_key``) or per text file (or per blank-line-separated
block), tokenized in a process pool that preserves input order, one sequence per
document, with the tokenizer's end-of-document id appended by default. Unlike
GPT-NeoX the output goes to exactly ``<output_prefix>.bin/.idx`` (no
``_text_document`` suffix), and nothing is written there unless the whole corpus
was processed.

    python -m neox_jax.data.preprocess --config=configs/preprocess.py \\
        --config.input=a.jsonl,b.txt --config.tokenizer=/path/to/tokenizer.json \\
        --config.output_prefix=data/pile_text --config.workers=8

(the old flags, ``--input= --tokenizer= --output_prefix= ...``, still work).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from neox_jax import cli, config_checks
from neox_jax.data.indexed_dataset import IndexedDatasetBuilder, best_dtype
from neox_jax.data.text_files import file_kind, json_records, open_text, parquet_rows
from neox_jax.errors import UserError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PreprocessStats:
    """What ``preprocess`` wrote.

    Attributes:
      output_prefix: dataset prefix written.
      documents: documents stored (one sequence each).
      tokens: tokens stored, end-of-document tokens included.
      skipped_empty: documents dropped because they tokenized to nothing.
      skipped_malformed: jsonl lines dropped (``on_malformed="skip"``).
      input_bytes: characters of text read.
      seconds: wall time.
    """

    output_prefix: str
    documents: int
    tokens: int
    skipped_empty: int
    skipped_malformed: int
    input_bytes: int
    seconds: float


class MalformedInputError(UserError):
    """A jsonl line that is not an object holding a string under the key."""


def iter_documents(
    files: Sequence[str],
    jsonl_key: str = "text",
    text_split: str = "file",
    on_malformed: str = "fail",
    malformed: list[str] | None = None,
) -> Iterator[str]:
    """Yields the text of every document, in file order.

    Args:
      files: paths; ``.jsonl``/``.json``/``.ndjson`` hold one JSON object per line (or
        one JSON array of objects), ``.parquet`` a column ``jsonl_key`` (read with pyarrow),
        anything else is plain UTF-8 text; ``.gz``/``.bz2``/``.xz``/``.zst`` (zstandard)
        compressed files are read through. A null text is an empty document.
      jsonl_key: key of the text in each JSON object.
      text_split: ``"file"`` (a text file is one document) or ``"blank_line"`` (each
        block separated by one or more blank lines is a document).
      on_malformed: ``"fail"`` raises ``MalformedInputError`` at the first bad jsonl
        line, ``"skip"`` logs it, appends ``"file:line: reason"`` to ``malformed`` and
        goes on.
      malformed: list collecting the skipped lines' descriptions.

    Yields:
      Document texts; empty documents are yielded too (the caller drops them).
    """
    if text_split not in ("file", "blank_line"):
        raise ValueError(f"text_split must be 'file' or 'blank_line', got {text_split!r}")
    if on_malformed not in ("fail", "skip"):
        raise ValueError(f"on_malformed must be 'fail' or 'skip', got {on_malformed!r}")
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file {path} does not exist")
        try:
            yield from _iter_file(path, jsonl_key, text_split, on_malformed, malformed)
        except UnicodeDecodeError as e:
            raise UserError(
                f"input file {path} is not UTF-8 text (byte {e.start}: {e.reason}); "
                "convert it to UTF-8 first"
            ) from None


def _iter_file(path, jsonl_key, text_split, on_malformed, malformed) -> Iterator[str]:
    kind = file_kind(path)
    if kind == "json":
        yield from _iter_jsonl(path, jsonl_key, on_malformed, malformed)
        return
    if kind == "parquet":
        yield from _iter_parquet(path, jsonl_key)
        return
    with open_text(path) as f:
        text = f.read()
    if text_split == "file":
        yield text
    else:
        yield from _blank_line_blocks(text)


def _record_problem(record, key: str) -> str | None:
    if isinstance(record, json.JSONDecodeError):
        return f"invalid JSON ({record.msg} at column {record.colno})"
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if key not in record:
        return f"no key {key!r} (keys: {sorted(record)[:8]})"
    if record[key] is not None and not isinstance(record[key], str):
        return f"{key!r} is {type(record[key]).__name__}, not a string"
    return None


def _iter_jsonl(path, key, on_malformed, malformed) -> Iterator[str]:
    for line_no, record in json_records(path):
        problem = _record_problem(record, key)
        if problem is None:
            yield record[key] or ""  # a null (as datasets writes a missing value) is empty
            continue
        where = f"{path}:{line_no}: {problem}"
        if on_malformed == "fail":
            raise MalformedInputError(
                f"{where}; fix the line or pass on_malformed='skip' (--on_malformed=skip)"
            )
        logger.warning("skipping malformed jsonl line %s", where)
        if malformed is not None:
            malformed.append(where)


def _iter_parquet(path, key) -> Iterator[str]:
    for row in parquet_rows(path, [key], what="--config.jsonl_key"):
        text = row[key]
        if text is not None and not isinstance(text, str):
            raise MalformedInputError(f"{path}: column {key!r} holds {type(text).__name__}")
        yield text or ""  # a null is an empty document


def _blank_line_blocks(text: str) -> Iterator[str]:
    block: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block)
            block = []
    if block:
        yield "".join(block)


# Per-process tokenizer, set by _init_worker (the GPT-NeoX Encoder.initializer idea).
_WORKER: dict = {}


def _init_worker(tokenizer, tokenizer_path, append_eod) -> None:
    if tokenizer is None:
        from neox_jax.data.tokenizer import load_tokenizer  # lazy: optional heavy deps

        tokenizer = load_tokenizer(tokenizer_path)
    _WORKER["tokenizer"] = tokenizer
    _WORKER["append_eod"] = append_eod


def _encode(text: str) -> tuple[np.ndarray, int]:
    tok = _WORKER["tokenizer"]
    ids = list(tok.encode(text)) if text else []
    # GPT-NeoX appends eod to the last sentence only when the text produced tokens.
    if ids and _WORKER["append_eod"]:
        ids.append(tok.eos_id)
    return np.asarray(ids, dtype=np.int64), len(text)


def _batched(it: Iterable, n: int) -> Iterator[list]:
    it = iter(it)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _encoded_docs(docs, workers, chunksize, init_args) -> Iterator[tuple[np.ndarray, int]]:
    if workers <= 1:
        _init_worker(*init_args)
        yield from map(_encode, docs)
        return
    # "spawn": forking a process that has started JAX's threads can deadlock the child.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        # Feed imap a bounded window at a time: imap drains its input eagerly, which
        # on a large corpus would hold every document in memory (GPT-NeoX bounds it
        # with a semaphore for the same reason).
        for window in _batched(docs, workers * chunksize * 64):
            yield from pool.imap(_encode, window, chunksize=chunksize)


def preprocess(
    files: Sequence[str],
    tokenizer_path: str | None = None,
    output_prefix: str = "",
    *,
    tokenizer=None,
    jsonl_key: str = "text",
    append_eod: bool = True,
    text_split: str = "file",
    on_malformed: str = "fail",
    workers: int = 1,
    chunksize: int = 32,
    progress: bool = True,
) -> PreprocessStats:
    """Tokenizes ``files`` into the indexed dataset ``output_prefix``.

    Args:
      files: input paths (see ``iter_documents``).
      tokenizer_path: path for ``neox_jax.data.tokenizer.load_tokenizer``; each
        worker loads its own copy.
      output_prefix: output path without ``.bin`` / ``.idx``.
      tokenizer: alternatively an object with ``encode(text) -> list[int]``,
        ``eos_id`` and ``vocab_size`` (must pickle when ``workers > 1`` under a
        spawn start method).
      jsonl_key: key of the text in each jsonl object.
      append_eod: append ``eos_id`` to every document, as GPT-NeoX's ``--append-eod``.
      text_split: ``"file"`` or ``"blank_line"`` for plain text inputs.
      on_malformed: ``"fail"`` or ``"skip"`` for bad jsonl lines.
      workers: tokenizer processes; 1 tokenizes in this process.
      chunksize: documents per task sent to a worker.
      progress: show a tqdm progress bar.

    Returns:
      ``PreprocessStats``.

    Raises:
      ValueError: bad arguments, a malformed line with ``on_malformed="fail"``, or
        a corpus with no non-empty document. Nothing is left at ``output_prefix``.
    """
    if (tokenizer is None) == (tokenizer_path is None):
        raise ValueError("pass exactly one of tokenizer_path and tokenizer")
    if not output_prefix:
        raise ValueError("output_prefix is required")
    if not files:
        raise ValueError("no input files given")
    if tokenizer is None:
        from neox_jax.data.tokenizer import load_tokenizer

        main_tok = load_tokenizer(tokenizer_path)
    else:
        main_tok = tokenizer
    if append_eod and main_tok.eos_id is None:
        raise ValueError("append_eod=True but the tokenizer has no eos_id")
    dtype = best_dtype(main_tok.vocab_size)

    start = time.time()
    malformed: list[str] = []
    docs = iter_documents(files, jsonl_key, text_split, on_malformed, malformed)
    encoded = _encoded_docs(docs, workers, chunksize, (tokenizer, tokenizer_path, append_eod))
    n_docs = n_tokens = n_empty = n_bytes = 0
    from tqdm import tqdm

    try:
        with (
            IndexedDatasetBuilder(output_prefix, dtype) as builder,
            tqdm(desc="tokenizing", unit="doc", disable=not progress) as bar,
        ):
            for ids, n_chars in encoded:
                n_bytes += n_chars
                bar.update(1)
                if ids.size == 0:
                    n_empty += 1
                    continue
                builder.add_document(ids)
                n_docs += 1
                n_tokens += int(ids.size)
            if n_docs == 0:
                # Raising inside the block makes the builder discard its temp files.
                raise ValueError(
                    f"empty corpus: no document in {list(files)} produced any token "
                    f"({n_empty} empty, {len(malformed)} malformed skipped); nothing "
                    f"written to {output_prefix}"
                )
    finally:
        encoded.close()  # shuts the worker pool down now, even on error
    stats = PreprocessStats(
        output_prefix=output_prefix,
        documents=n_docs,
        tokens=n_tokens,
        skipped_empty=n_empty,
        skipped_malformed=len(malformed),
        input_bytes=n_bytes,
        seconds=time.time() - start,
    )
    logger.info("preprocess: %s", stats)
    return stats


LEGACY_FLAGS = {
    n: n
    for n in ("input", "tokenizer", "output_prefix", "jsonl_key", "append_eod", "text_split",
              "on_malformed", "workers", "chunksize")
}  # fmt: skip


def main(config) -> PreprocessStats:
    """Preprocess as ``configs/preprocess.py`` describes; prints what was written."""
    config_checks.preprocess(config)
    stats = preprocess(
        [p for p in config.input.split(",") if p],
        config.tokenizer,
        config.output_prefix,
        jsonl_key=config.jsonl_key,
        append_eod=config.append_eod,
        text_split=config.text_split,
        on_malformed=config.on_malformed,
        workers=config.workers,
        chunksize=config.chunksize,
        progress=sys.stderr.isatty(),  # a bar in a terminal, not in logs
    )
    print(
        f"wrote {stats.output_prefix}.bin/.idx: {stats.documents} documents, "
        f"{stats.tokens} tokens ({stats.skipped_empty} empty and {stats.skipped_malformed} "
        f"malformed skipped) in {stats.seconds:.1f}s"
    )
    return stats


COMMAND = cli.Command(
    main, "neox_jax.data.preprocess", default_config="preprocess.py", legacy=LEGACY_FLAGS
)

if __name__ == "__main__":
    COMMAND.run()

"""Packed pretraining samples straight from a tensorflow-datasets catalog dataset.

Reads a random-access tfds data source (``tfds.data_source`` / a builder's
``as_data_source``; ``array_record`` files, no TensorFlow needed), tokenizes
documents on the fly and packs them into the same ``seq_len + 1`` windows with the
same contract as ``PretrainSource``: epochs of all documents in an order that
depends only on ``(seed, epoch)``, and sample ``g`` = stream tokens
``[g*L, g*L + L + 1)``, so a batch is a pure function of ``(seed, step)``.

Documents are tokenized in stream order the first time they are reached, and only
their lengths are kept for good (8 bytes per document); tokens live in a bounded
LRU cache and are re-tokenized if an old window is asked for again. Every host
tokenizes the stream up to its own rows, so use ``preprocess`` + ``PretrainSource``
for large corpora: this source suits small and medium datasets and quick trials.
There is no sample-level shuffle beyond the document order.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from neox_jax.data.pretrain_data import (
    EpochStream,
    SampleSource,
    assemble_window,
    document_order,
    stack_rows,
)
from neox_jax.errors import UserError


def record_text(record, text_key: str) -> str:
    """The text of one dataset record (a dict holding ``text_key``, or the text itself).

    A null (None) text is an empty document, as an empty string is: Arrow-backed datasets
    (parquet, jsonl with ``null``) give None for missing values, never to be read as "None".
    """
    if isinstance(record, dict):
        if text_key not in record:
            raise UserError(
                f"dataset records have no {text_key!r} field (they have {sorted(record)}); "
                "set data.text_key to the field holding the text"
            )
        record = record[text_key]
    if isinstance(record, np.ndarray):
        record = record.item()
    if record is None:
        return ""
    if isinstance(record, bytes):
        return record.decode("utf-8")
    if not isinstance(record, str):
        raise UserError(
            f"the {text_key!r} field holds {type(record).__name__} values, not text; set "
            "data.text_key to a text field"
        )
    return record


class TfdsSource(SampleSource):
    """GPT-NeoX-style packed samples over a tfds data source, tokenized on the fly.

    Args:
      dataset: a tfds catalog name (``"wikipedia/20230601.en"``), or any object with
        ``__len__`` and ``__getitem__`` returning a dict (or the text itself), such
        as a builder's ``as_data_source(split)``.
      tokenizer: object with ``encode(text) -> list[int]`` and ``eos_id``.
      seq_len: model sequence length L; rows hold L + 1 tokens.
      global_batch_size: rows per global step.
      split: tfds split (when ``dataset`` is a name).
      data_dir: tfds data directory (when ``dataset`` is a name).
      download: let tfds download and prepare the dataset if missing (off by
        default: nothing is fetched unless asked).
      seed: document-order seed.
      text_key: feature holding the text.
      append_eod: append ``eos_id`` to every non-empty document, as preprocessing does.
      shuffle: False keeps the source order.
      reset_at_eod: also return ``segment_ids`` and ``positions``.
      cache_docs: tokenized documents kept in memory.
    """

    def __init__(
        self,
        dataset: str | Any,
        tokenizer,
        seq_len: int,
        global_batch_size: int,
        *,
        split: str = "train",
        data_dir: str | None = None,
        download: bool = False,
        seed: int = 0,
        text_key: str = "text",
        append_eod: bool = True,
        shuffle: bool = True,
        reset_at_eod: bool = False,
        cache_docs: int = 65536,
    ):
        super().__init__(seq_len, global_batch_size)
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        if isinstance(dataset, str):
            from neox_jax.optional import require

            tfds = require("tensorflow_datasets", "data.source='tfds'")

            dataset = tfds.data_source(dataset, split=split, data_dir=data_dir, download=download)
        self.source = dataset
        self.tokenizer = tokenizer
        self.seed, self.shuffle, self.reset_at_eod = seed, shuffle, reset_at_eod
        self.text_key, self.append_eod = text_key, append_eod
        if append_eod and tokenizer.eos_id is None:
            raise ValueError("append_eod=True but the tokenizer has no eos_id")
        self.num_docs = len(dataset)
        if self.num_docs == 0:
            raise ValueError("the tfds data source is empty")
        docs = np.arange(self.num_docs, dtype=np.int64)
        self._order0 = document_order(docs, seed, 0, shuffle)
        self._sizes = np.full(self.num_docs, -1, np.int64)  # -1: not tokenized yet
        self._ends0 = np.zeros(self.num_docs, np.int64)  # epoch-0 stream end of each doc
        self._known = 0  # epoch-0 documents tokenized so far
        self._stream: EpochStream | None = None  # built once epoch 0 is fully known
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._cache_docs = cache_docs

    def _text(self, doc: int) -> str:
        return record_text(self.source[doc], self.text_key)

    def _tokens(self, doc: int) -> np.ndarray:
        if doc in self._cache:
            self._cache.move_to_end(doc)
            return self._cache[doc]
        text = self._text(doc)
        ids = list(self.tokenizer.encode(text)) if text else []
        if ids and self.append_eod:  # empty documents stay empty, as in preprocess
            ids.append(self.tokenizer.eos_id)
        tokens = np.asarray(ids, dtype=np.int32)
        self._cache[doc] = tokens
        if len(self._cache) > self._cache_docs:
            self._cache.popitem(last=False)
        return tokens

    def _fetch(self, doc: int, offset: int, count: int) -> np.ndarray:
        return self._tokens(doc)[offset : offset + count]

    def _learn_until(self, pos: int) -> None:
        """Tokenizes epoch-0 documents in stream order until ``pos`` is covered."""
        while self._known < self.num_docs and (
            self._known == 0 or self._ends0[self._known - 1] <= pos
        ):
            doc = int(self._order0[self._known])
            size = len(self._tokens(doc))
            self._sizes[doc] = size
            prev = self._ends0[self._known - 1] if self._known else 0
            self._ends0[self._known] = prev + size
            self._known += 1
        if self._known == self.num_docs and self._stream is None:
            # Every length is known: later epochs need no tokenizing to be located.
            # Raises if every document is empty.
            self._stream = EpochStream(
                np.arange(self.num_docs), self._sizes, self.seed, self.shuffle
            )

    def _locate(self, pos: int) -> tuple[int, int, int]:
        if self._stream is None:
            self._learn_until(pos)
        if self._stream is not None:
            return self._stream.locate(pos)
        j = int(np.searchsorted(self._ends0[: self._known], pos, side="right"))
        doc = int(self._order0[j])
        size = int(self._sizes[doc])
        return doc, int(self._ends0[j]) - size, size

    @property
    def tokens_per_epoch(self) -> int | None:
        """Tokens in one pass, once the first epoch has been tokenized (else None)."""
        return None if self._stream is None else self._stream.tokens_per_epoch

    def window(self, stream_sample: int) -> dict[str, np.ndarray]:
        """Stream tokens ``[i*L, i*L + L + 1)``."""
        return assemble_window(
            self._locate,
            self._fetch,
            int(stream_sample) * self.seq_len,
            self.seq_len + 1,
            self.reset_at_eod,
        )

    def samples(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        if np.any(indices < 0):
            raise ValueError("sample indices must be >= 0")
        return stack_rows([self.window(i) for i in indices], self.seq_len)

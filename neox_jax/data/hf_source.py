"""Hugging Face ``datasets`` as a pretraining source, tokenized on the fly.

    --config.data.source=hf --config.data.hf_name=allenai/c4 --config.data.hf_config=en \\
        --config.data.hf_split=train --config.data.tokenizer=tokenizer.json

``hf_name`` is anything ``datasets.load_dataset`` takes (a Hub dataset id, a local folder of
jsonl/parquet/csv files, a builder name such as "json" with ``hf_data_files``), one such
file (``.jsonl.gz`` too), or a folder written by ``Dataset.save_to_disk``. Offline, a Hub id
that ``datasets`` has not prepared before is read from the Hub cache's snapshot of it. The
text is the ``data.text_key`` field; a null text is an empty document; a plain-text file is
one document (datasets' ``sample_by="document"``), as preprocessing reads it. Documents are
packed into ``seq_len + 1`` windows exactly as preprocessing packs them (an eos after every
document).

Two modes (``data.hf_streaming``):

* streaming (default): an ``IterableDataset`` read as it downloads, never stored whole.
  Each host reads its own shard (``datasets.distributed.split_dataset_by_node``) and fills
  its own rows of each batch in stream order, so batches depend on the host count. The
  stream is deterministic, so a resumed run reads it again up to its position (cheap for
  short runs; use ``preprocess`` for long ones) and continues with the same batches.
* map-style (``hf_streaming=False``): the dataset is prepared in the local cache and read
  by index like a tfds source (``TfdsSource``): epochs in a seeded order, batches a pure
  function of ``(seed, step)`` on any host count.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from neox_jax.data.pretrain_data import SampleSource, assemble_window, stack_rows
from neox_jax.data.tfds_source import TfdsSource, record_text
from neox_jax.errors import UserError
from neox_jax.optional import require


def load_hf_dataset(
    name: str,
    split: str,
    *,
    config_name: str = "",
    data_files: str = "",
    streaming: bool = True,
):
    """The ``datasets`` split named by ``name`` (see the module docstring)."""
    datasets = require("datasets", "data.source='hf'")
    if not name:
        raise UserError("data.source='hf' needs data.hf_name (a Hub dataset id or a folder)")
    if os.path.isdir(name) and any(
        os.path.isfile(os.path.join(name, f)) for f in ("state.json", "dataset_dict.json")
    ):  # written by save_to_disk
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"{name} has no split {split!r}; it has {sorted(ds)}")
            ds = ds[split]
        return ds.to_iterable_dataset() if streaming else ds
    files = [f.strip() for f in data_files.split(",") if f.strip()] or None
    builder, kwargs = name, {}
    if os.path.isfile(name):  # one data file: load_dataset takes its builder and the file
        builder, config_name, files = _file_builder(name), "", {split: [name]}
    listed = files if files is not None else ([name] if os.path.isdir(name) else [])
    if _text_files_only(listed.get(split, []) if isinstance(listed, dict) else listed):
        kwargs["sample_by"] = "document"  # a text file is one document, as preprocess reads it
    try:
        return datasets.load_dataset(
            builder, config_name or None, split=split, data_files=files, streaming=streaming,
            **kwargs,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"data.hf_name={name!r}, split {split!r}: {e}") from e
    except ConnectionError as e:  # offline, or the Hub unreachable
        if (folder := _cached_snapshot(name)) is None:
            raise UserError(
                f"data.hf_name={name!r}: the Hub cannot be reached ({e}) and the dataset is "
                "in neither the datasets cache nor the Hub cache; load it once online or pass "
                "a local folder of its files"
            ) from None
    return load_hf_dataset(
        folder, split, config_name=config_name, data_files=data_files, streaming=streaming
    )


# Data-file suffixes and the datasets builder reading them; compressed files (.gz, ...) are
# read through, as load_dataset does for a folder of them.
_BUILDERS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet",
             ".csv": "csv", ".txt": "text", ".arrow": "arrow"}  # fmt: skip
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def _file_builder(path: str, strict: bool = True) -> str | None:
    suffixes = [x.lower() for x in Path(path).suffixes]
    while suffixes and suffixes[-1] in _COMPRESSED:
        suffixes.pop()
    if not suffixes or suffixes[-1] not in _BUILDERS:
        if not strict:
            return None
        raise UserError(
            f"data.hf_name={path!r} is a file of a kind datasets cannot be told apart by name; "
            f"use one ending in {', '.join(_BUILDERS)} (optionally compressed), or a folder"
        )
    return _BUILDERS[suffixes[-1]]


def _text_files_only(paths: list[str]) -> bool:
    """Whether the data files among ``paths`` (folders searched) are all plain text: datasets'
    text builder then gives one record per line unless told ``sample_by="document"``."""
    found = []
    for path in map(Path, paths):
        found += [path] if not path.is_dir() else [
            f for f in path.rglob("*") if f.is_file() and not f.name.startswith(".")
        ]  # fmt: skip
    kinds = {_file_builder(str(f), strict=False) for f in found} - {None}
    return kinds == {"text"}


def _cached_snapshot(repo_id: str) -> str | None:
    """The Hub cache's snapshot folder of the dataset repository ``repo_id``, or None."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
    except Exception:  # noqa: BLE001 - not an id, not cached: the caller reports it
        return None


class HfStreamSource(SampleSource):
    """Packed windows from a streamed dataset: this host's rows, in stream order.

    Args:
      open_stream: () -> iterable of records (dicts with ``text_key``, or texts); called
        again to restart from the beginning. Already this host's shard.
      tokenizer: object with ``encode(text) -> list[int]`` and ``eos_id``.
      seq_len: model sequence length L; rows hold L + 1 tokens (stride L, as packed data).
      global_batch_size: rows per global step, B.
      text_key: field holding the text.
      reset_at_eod: also return ``segment_ids`` and ``positions``.
    """

    def __init__(
        self,
        open_stream,
        tokenizer,
        seq_len: int,
        global_batch_size: int,
        *,
        text_key: str = "text",
        reset_at_eod: bool = False,
    ):
        super().__init__(seq_len, global_batch_size)
        if tokenizer.eos_id is None:
            raise UserError(
                "data.source='hf' appends eos after each document: the tokenizer has none"
            )
        self.open_stream, self.tokenizer = open_stream, tokenizer
        self.text_key, self.reset_at_eod = text_key, reset_at_eod
        self._restart()

    def _restart(self) -> None:
        self._records: Iterator = iter(self.open_stream())
        self._starts: list[int] = []  # stream position of each held document
        self._docs: list[np.ndarray] = []
        self._end = 0  # stream position after the last held document
        self._next_row = 0  # this host's next local row

    def _text(self, record) -> str:
        return record_text(record, self.text_key)

    def _fill(self, end: int) -> None:
        """Tokenizes documents until the stream reaches position ``end``."""
        while self._end < end:
            try:
                text = self._text(next(self._records))
            except StopIteration:
                raise UserError(
                    "the streamed dataset ended: it holds fewer tokens than the run reads "
                    "(lower train.steps, or use data.hf_streaming=False to repeat epochs)"
                ) from None
            if not text:
                continue  # empty documents stay empty, as in preprocess
            ids = np.asarray([*self.tokenizer.encode(text), self.tokenizer.eos_id], np.int32)
            self._starts.append(self._end)
            self._docs.append(ids)
            self._end += len(ids)

    def _drop_before(self, pos: int) -> None:
        keep = max(0, bisect.bisect_right(self._starts, pos) - 1)
        del self._starts[:keep], self._docs[:keep]

    def _locate(self, pos: int) -> tuple[int, int, int]:
        i = bisect.bisect_right(self._starts, pos) - 1
        return i, self._starts[i], len(self._docs[i])

    def _fetch(self, i: int, offset: int, count: int) -> np.ndarray:
        return self._docs[i][offset : offset + count]

    def _row(self, local: int) -> dict[str, np.ndarray]:
        start, length = local * self.seq_len, self.seq_len + 1
        self._fill(start + length)
        self._drop_before(start)
        return assemble_window(self._locate, self._fetch, start, length, self.reset_at_eod)

    def samples(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """This host's rows of one step: ``indices`` are its contiguous global rows."""
        indices = np.asarray(indices, np.int64)
        if len(indices) == 0:
            return stack_rows([], self.seq_len)
        # Host-local numbering: step s's n rows are local rows [s*n, (s+1)*n).
        first = int(indices[0]) // self.global_batch_size * len(indices)
        if first < self._next_row:  # an earlier step again (eval passes): read from the top
            self._restart()
        rows = [self._row(first + k) for k in range(len(indices))]
        self._next_row = first + len(indices)
        return stack_rows(rows, self.seq_len)


def make_hf_source(data_cfg, tokenizer, batch: int, split: str, process: tuple[int, int]):
    """A pretraining source over ``data.hf_name``'s ``split`` (see the module docstring)."""
    streaming = bool(data_cfg.hf_streaming)
    kw = dict(config_name=data_cfg.hf_config, data_files=data_cfg.hf_data_files)
    if not streaming:
        ds = load_hf_dataset(data_cfg.hf_name, split, streaming=False, **kw)
        return TfdsSource(
            ds, tokenizer, data_cfg.seq_len, batch, seed=data_cfg.seed,
            text_key=data_cfg.text_key, reset_at_eod=data_cfg.reset_at_eod,
        )  # fmt: skip

    def open_stream():
        from datasets.distributed import split_dataset_by_node

        ds = load_hf_dataset(data_cfg.hf_name, split, streaming=True, **kw)
        rank, world = process
        return split_dataset_by_node(ds, rank=rank, world_size=world) if world > 1 else ds

    return HfStreamSource(
        open_stream, tokenizer, data_cfg.seq_len, batch,
        text_key=data_cfg.text_key, reset_at_eod=data_cfg.reset_at_eod,
    )  # fmt: skip

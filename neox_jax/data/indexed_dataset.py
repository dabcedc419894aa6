"""Megatron / GPT-NeoX memory-mapped indexed datasets (``MMIDIDX`` version 1).

A dataset is a pair of files sharing a prefix:

* ``<prefix>.bin``: every token of every sequence, concatenated, raw little-endian.
* ``<prefix>.idx``: the index, little-endian::

      magic    9 bytes   b"MMIDIDX\\x00\\x00"
      version  <Q        1
      dtype    <B        token dtype code (see ``DTYPE_CODES``)
      N        <Q        number of sequences
      D        <Q        number of doc-index entries
      sizes    int32[N]  tokens per sequence
      pointers int64[N]  byte offset of each sequence in the .bin
      doc_idx  int64[D]  0, then the sequence count at the end of every document

This is the layout written by ``MMapIndexedDatasetBuilder`` / ``MMapIndexedDataset.Index``
in GPT-NeoX ``megatron/data/indexed_dataset.py`` (and Megatron-LM
``megatron/core/datasets/indexed_dataset.py``), so files made by GPT-NeoX's
``tools/datasets/preprocess_data.py`` load here and files written here load there.
GPT-NeoX's preprocessing stores one sequence per document, so ``doc_idx`` is then
``arange(N + 1)``; the reader accepts several sequences per document too. Refused by
name: float token dtypes (codes 6 and 7, which GPT-NeoX and Megatron-LM assign to
different widths) and Megatron-LM's multimodal indexes (an int8 mode per sequence after
``doc_idx``).
"""

from __future__ import annotations

import os
import struct
import tempfile

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic(9) + version(<Q) + dtype code(<B) + N(<Q) + D(<Q); '<' means no padding.
HEADER = struct.Struct("<9sQBQQ")
HEADER_SIZE = HEADER.size  # 34 bytes
_CHECK_CHUNK = 1 << 22  # sequences validated per step on open

# Token dtype codes. Integer codes 1-5 and 8 agree across fairseq, GPT-NeoX and
# Megatron-LM. The float codes do not: GPT-NeoX writes 6 for float32 and 7 for float64,
# Megatron-core 6 for float64 and 7 for float32, so a reader cannot tell which it has.
# Token ids are integers, so both are refused by name rather than read as the wrong width.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    8: np.dtype(np.uint16),
}
FLOAT_CODES = {6: "float32 in GPT-NeoX, float64 in Megatron-LM",
               7: "float64 in GPT-NeoX, float32 in Megatron-LM"}  # fmt: skip
_WRITABLE_CODES: dict[np.dtype, int] = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.uint16): 8,
}


def index_path(prefix: str) -> str:
    """Returns the ``.idx`` path of a dataset prefix."""
    return f"{prefix}.idx"


def data_path(prefix: str) -> str:
    """Returns the ``.bin`` path of a dataset prefix."""
    return f"{prefix}.bin"


def best_dtype(vocab_size: int | None) -> np.dtype:
    """Token dtype GPT-NeoX picks for a vocabulary (``__best_fitting_dtype``).

    Args:
      vocab_size: number of token ids, or None when unknown.

    Returns:
      ``uint16`` when ``vocab_size < 65500``, else ``int32``.
    """
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def exists(prefix: str) -> bool:
    """Whether both files of the dataset at ``prefix`` exist."""
    return os.path.isfile(index_path(prefix)) and os.path.isfile(data_path(prefix))


def encode_header(dtype, num_sequences: int, num_doc_entries: int) -> bytes:
    """Packs the 34-byte ``.idx`` header.

    Args:
      dtype: token dtype (an integer dtype of ``DTYPE_CODES``).
      num_sequences: N, the number of sequences.
      num_doc_entries: D, the length of ``doc_idx``.

    Returns:
      The header bytes.
    """
    dtype = np.dtype(dtype)
    if dtype not in _WRITABLE_CODES:
        raise ValueError(
            f"cannot write token dtype {dtype}; use one of {sorted(map(str, _WRITABLE_CODES))}"
        )
    return HEADER.pack(MAGIC, VERSION, _WRITABLE_CODES[dtype], num_sequences, num_doc_entries)


class IndexedDatasetBuilder:
    """Writes an indexed dataset; nothing appears under ``prefix`` until ``finalize``.

    Tokens stream into a temporary ``.bin`` beside the target. ``finalize`` writes a
    temporary ``.idx``, fsyncs both, removes any old ``.idx``, then renames ``.bin``
    and finally ``.idx`` into place. The ``.idx`` is the commit marker: a crash at
    any point leaves either no dataset (no ``.idx``), the old one, or the new one,
    never a new ``.bin`` under an index that does not describe it.

    Use as a context manager to clean up the temporary files on error::

        with IndexedDatasetBuilder("out/name", best_dtype(tok.vocab_size)) as b:
            for doc in docs:
                b.add_document(doc)
        # finalized here when the block raised nothing

    Args:
      prefix: output path without ``.bin`` / ``.idx``.
      dtype: token dtype, an integer dtype (see ``best_dtype``).
    """

    def __init__(self, prefix: str, dtype=np.uint16):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        encode_header(self.dtype, 0, 0)  # rejects unwritable dtypes before any I/O
        self._info = np.iinfo(self.dtype)
        directory = os.path.dirname(os.path.abspath(self.prefix))
        os.makedirs(directory, exist_ok=True)
        base = os.path.basename(self.prefix)
        fd, self._tmp_bin = tempfile.mkstemp(prefix=f".{base}.", suffix=".bin.tmp", dir=directory)
        # mkstemp creates 0600 files; give the dataset the permissions open() would.
        os.chmod(self._tmp_bin, 0o666 & ~_umask())
        self._bin = os.fdopen(fd, "wb")
        self._tmp_idx = self._tmp_bin[: -len(".bin.tmp")] + ".idx.tmp"
        self._sizes: list[int] = []
        self._doc_idx: list[int] = [0]
        self._done = False

    def add_item(self, tokens) -> None:
        """Appends one sequence to the current document (Megatron ``add_item``).

        Args:
          tokens: 1-D sequence of token ids that fit ``dtype``.
        """
        self._check_open()
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {arr.shape}")
        if arr.size:
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._info.min or hi > self._info.max:
                raise ValueError(
                    f"token ids [{lo}, {hi}] do not fit {self.dtype}; "
                    "build with a wider dtype (best_dtype(vocab_size))"
                )
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError(f"sequence of {arr.size} tokens exceeds the int32 size field")
        self._bin.write(arr.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self._sizes.append(int(arr.size))

    def end_document(self) -> None:
        """Closes the current document (Megatron ``end_document``)."""
        self._check_open()
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens) -> None:
        """Appends one document stored as one sequence, as GPT-NeoX preprocessing does.

        Args:
          tokens: 1-D sequence of token ids.
        """
        self.add_item(tokens)
        self.end_document()

    @property
    def num_sequences(self) -> int:
        return len(self._sizes)

    @property
    def num_tokens(self) -> int:
        return int(sum(self._sizes))

    def finalize(self) -> None:
        """Writes the index and atomically publishes both files under ``prefix``."""
        self._check_open()
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            sizes = np.asarray(self._sizes, dtype=np.int64)
            pointers = np.zeros(len(sizes), dtype=np.int64)
            np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
            doc_idx = np.asarray(self._doc_idx, dtype=np.int64)
            with open(self._tmp_idx, "wb") as f:
                f.write(encode_header(self.dtype, len(sizes), len(doc_idx)))
                f.write(sizes.astype("<i4").tobytes())
                f.write(pointers.astype("<i8").tobytes())
                f.write(doc_idx.astype("<i8").tobytes())
                f.flush()
                os.fsync(f.fileno())
            # Order matters: drop the old commit marker, publish data, then the index.
            if os.path.exists(index_path(self.prefix)):
                os.remove(index_path(self.prefix))
            os.replace(self._tmp_bin, data_path(self.prefix))
            os.replace(self._tmp_idx, index_path(self.prefix))
            _fsync_dir(os.path.dirname(os.path.abspath(self.prefix)))
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        """Discards everything written so far; ``prefix`` is left untouched."""
        if not self._bin.closed:
            self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)
        self._done = True

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError(f"builder for {self.prefix!r} is already finalized or aborted")

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._done:
            return
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: str) -> None:
    # Makes the renames durable on POSIX; not supported (and not needed) everywhere.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class IndexedDataset:
    """Memory-mapped reader of an ``MMIDIDX`` v1 dataset.

    Both files are validated on open (header, sizes, bounds of every sequence), so
    a corrupt or truncated dataset fails here with a ``ValueError`` naming the file
    rather than later with garbage tokens. Arrays returned are read-only views of
    the memory map.

    Args:
      prefix: path without ``.bin`` / ``.idx``.
    """

    def __init__(self, prefix: str):
        self.prefix = str(prefix)
        self._open()

    def _open(self) -> None:
        idx_file, bin_file = index_path(self.prefix), data_path(self.prefix)
        for path in (idx_file, bin_file):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"indexed dataset file {path} does not exist; pass the prefix that both "
                    "'.bin' and '.idx' are appended to"
                )
        idx_bytes = os.path.getsize(idx_file)
        if idx_bytes < HEADER_SIZE:
            raise ValueError(
                f"{idx_file}: truncated index, {idx_bytes} bytes is shorter than the "
                f"{HEADER_SIZE}-byte header"
            )
        with open(idx_file, "rb") as f:
            magic, version, code, n, d = HEADER.unpack(f.read(HEADER_SIZE))
        if magic != MAGIC:
            raise ValueError(
                f"{idx_file}: bad magic {magic!r}, expected {MAGIC!r} (not an MMIDIDX "
                "index; legacy 'TNTIDX' lazy/cached datasets are not supported)"
            )
        if version != VERSION:
            raise ValueError(f"{idx_file}: unsupported index version {version}, expected 1")
        if code in FLOAT_CODES:
            raise ValueError(
                f"{idx_file}: token dtype code {code} is a float type ({FLOAT_CODES[code]}); "
                "token ids must be integers: write the dataset again with an integer dtype "
                "(GPT-NeoX's and Megatron-LM's preprocess_data.py pick uint16 or int32)"
            )
        if code not in DTYPE_CODES:
            raise ValueError(
                f"{idx_file}: unknown dtype code {code}, expected one of {sorted(DTYPE_CODES)}"
            )
        expected = HEADER_SIZE + 12 * n + 8 * d
        if n and idx_bytes == expected + n:
            raise ValueError(
                f"{idx_file}: the index ends with one int8 'sequence mode' per sequence: a "
                "Megatron-LM multimodal dataset (IndexedDatasetBuilder(multimodal=True)), whose "
                "sequences are not all text tokens; it is not read here. Preprocess the text "
                "alone into a dataset without modes (multimodal=False)."
            )
        if idx_bytes != expected:
            raise ValueError(
                f"{idx_file}: index is {idx_bytes} bytes but its header ({n} sequences, "
                f"{d} doc-index entries) needs exactly {expected}; the file is truncated "
                "or corrupt"
            )
        self._dtype = DTYPE_CODES[code]
        self._idx_mmap = _mmap(idx_file)
        self._sizes = np.frombuffer(self._idx_mmap, dtype="<i4", count=n, offset=HEADER_SIZE)
        self._pointers = np.frombuffer(
            self._idx_mmap, dtype="<i8", count=n, offset=HEADER_SIZE + 4 * n
        )
        self._doc_idx = np.frombuffer(
            self._idx_mmap, dtype="<i8", count=d, offset=HEADER_SIZE + 12 * n
        )
        self._bin_mmap = _mmap(bin_file)
        self._validate(idx_file, bin_file)

    def _validate(self, idx_file: str, bin_file: str) -> None:
        n = len(self._sizes)
        bin_bytes = len(self._bin_mmap)
        # In chunks, so opening a corpus of 10^8 sequences needs no GiB-sized temporaries.
        for lo in range(0, n, _CHECK_CHUNK):
            sizes = self._sizes[lo : lo + _CHECK_CHUNK]
            pointers = self._pointers[lo : lo + _CHECK_CHUNK]
            if int(sizes.min()) < 0:
                raise ValueError(f"{idx_file}: negative sequence size; the index is corrupt")
            if int(pointers.min()) < 0:
                raise ValueError(f"{idx_file}: negative sequence pointer; the index is corrupt")
            ends = pointers + sizes.astype(np.int64) * self._dtype.itemsize
            last = int(np.argmax(ends))
            if int(ends[last]) > bin_bytes:
                raise ValueError(
                    f"{bin_file}: data file is {bin_bytes} bytes but {idx_file} says sequence "
                    f"{lo + last} ends at byte {int(ends[last])}; the .bin is truncated or "
                    "belongs to another index"
                )
        doc = self._doc_idx
        if len(doc) and (doc[0] != 0 or np.any(np.diff(doc) < 0) or doc[-1] > n):
            raise ValueError(
                f"{idx_file}: doc_idx must start at 0, never decrease and stay <= {n} "
                "(the sequence count); the index is corrupt"
            )

    # Pickle by prefix so datasets can cross process boundaries without copying maps.
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, idx):
        """One sequence as a 1-D array, or a list of them for a contiguous slice."""
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices into an IndexedDataset must be contiguous")
            return [self.get(i) for i in range(start, stop)]
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Part of one sequence, like GPT-NeoX ``MMapIndexedDataset.get``.

        Args:
          idx: sequence index (negative counts from the end).
          offset: first token within the sequence.
          length: number of tokens; None means to the end of the sequence.

        Returns:
          Read-only 1-D array of ``dtype``.
        """
        n = len(self)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {idx} out of range for {n} sequences in {self.prefix}")
        size = int(self._sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) out of range for sequence {i} of size {size}"
            )
        ptr = int(self._pointers[i]) + offset * self._dtype.itemsize
        return np.frombuffer(self._bin_mmap, dtype=self._dtype, count=length, offset=ptr)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def sizes(self) -> np.ndarray:
        """int32[N]: tokens per sequence."""
        return self._sizes

    @property
    def pointers(self) -> np.ndarray:
        """int64[N]: byte offset of each sequence in the ``.bin``."""
        return self._pointers

    @property
    def doc_idx(self) -> np.ndarray:
        """int64[D]: sequence index where each document starts, plus the final count."""
        return self._doc_idx

    @property
    def num_tokens(self) -> int:
        return int(self._sizes.sum(dtype=np.int64))


def _mmap(path: str) -> np.ndarray:
    # np.memmap refuses empty files; an empty dataset is still a valid dataset.
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")

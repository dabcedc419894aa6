"""Pythia's pre-tokenized, pre-shuffled training data: the batch behind every step.

EleutherAI publishes the exact sequences each Pythia model trained on
(``EleutherAI/pile-{standard,deduped}-pythia-preshuffled``): an ``MMIDIDX`` indexed
dataset (``document.idx`` + ``document.bin``, the ``.bin`` also offered as shards
``document-00000-of-00020.bin`` ... which Pythia's ``utils/unshard_memmap.py`` joins)
whose item ``i`` is training sequence ``i``: 2049 tokens (2048 inputs plus the last
target). Step ``s`` trained on items ``[s*B, (s+1)*B)`` with ``B = 1024``
(Pythia's ``utils/batch_viewer.py``).

``PreshuffledData`` reads either form (the shards without joining them) and is a
``SampleSource``, so ``--config.data.source=preshuffled`` trains on it in that order and
``python -m neox_jax.batch_viewer`` prints or saves the batch of a step.
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np

from neox_jax.data.indexed_dataset import DTYPE_CODES, HEADER, HEADER_SIZE, MAGIC, VERSION
from neox_jax.data.pretrain_data import SampleSource
from neox_jax.errors import UserError

PYTHIA_BATCH = 1024  # sequences per step in every Pythia run
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.bin$")


def _read_index(path: str) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """``(token dtype, sizes int32[N], pointers int64[N])`` of an ``MMIDIDX`` ``.idx``."""
    if not os.path.isfile(path):
        raise UserError(
            f"{path} does not exist; pass the dataset prefix (e.g. .../document for "
            "document.idx and document.bin or its shards document-00000-of-000NN.bin)."
        )
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if len(head) < HEADER_SIZE:
        raise UserError(f"{path}: {size} bytes is shorter than the {HEADER_SIZE}-byte header.")
    magic, version, code, n, d = HEADER.unpack(head)
    if magic != MAGIC or version != VERSION or code not in DTYPE_CODES:
        raise UserError(f"{path} is not an MMIDIDX v1 index (magic {magic!r}, version {version}).")
    need = HEADER_SIZE + 12 * n + 8 * d
    if size != need:
        raise UserError(f"{path}: {size} bytes, but its header needs {need}; it is damaged.")
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    sizes = np.frombuffer(raw, dtype="<i4", count=n, offset=HEADER_SIZE)
    pointers = np.frombuffer(raw, dtype="<i8", count=n, offset=HEADER_SIZE + 4 * n)
    return DTYPE_CODES[code], sizes, pointers


def data_files(prefix: str) -> list[str]:
    """``prefix.bin``, else the shards ``prefix-00000-of-000NN.bin`` in order (all of them)."""
    if os.path.isfile(f"{prefix}.bin"):
        return [f"{prefix}.bin"]
    found = {}
    for path in glob.glob(f"{glob.escape(prefix)}-*-of-*.bin"):
        m = _SHARD.search(path)
        if m and path[: m.start()] == prefix:
            found[int(m[1])] = (path, int(m[2]))
    if not found:
        raise UserError(f"neither {prefix}.bin nor its shards {prefix}-00000-of-000NN.bin exist.")
    last = {of for _, of in found.values()}
    # Pythia names shard i of K as "-i-of-(K-1)".
    want = max(last) + 1
    missing = [i for i in range(want) if i not in found]
    if len(last) != 1 or missing:
        raise UserError(
            f"shards of {prefix} are incomplete: missing "
            f"{[f'{prefix}-{i:05d}-of-{want - 1:05d}.bin' for i in missing]}"
            if missing
            else f"shards of {prefix} disagree on their count ({sorted(last)})."
        )
    return [found[i][0] for i in range(want)]


class PreshuffledData(SampleSource):
    """Pythia's pre-shuffled sequences; global sample ``g`` is item ``g``.

    Args:
      prefix: path without ``.idx`` / ``.bin`` (``.../document``).
      batch_size: sequences per step (Pythia: 1024).

    Attributes:
      seq_len: L, each item holds L + 1 tokens (Pythia: 2048).
    """

    def __init__(self, prefix: str, batch_size: int = PYTHIA_BATCH):
        self.prefix = str(prefix)
        self.dtype, self.sizes, self.pointers = _read_index(f"{self.prefix}.idx")
        if len(self.sizes) == 0:
            raise UserError(f"{self.prefix}.idx holds no sequences.")
        uneven = np.flatnonzero(self.sizes != self.sizes[0])
        if len(uneven):
            i = int(uneven[0])
            raise UserError(
                f"{self.prefix} is not pre-shuffled training data: item {i} has "
                f"{int(self.sizes[i])} tokens but item 0 has {int(self.sizes[0])} (every item "
                "of the format is one training sequence); read it with data.source=indexed."
            )
        super().__init__(int(self.sizes[0]) - 1, batch_size)
        self.files = data_files(self.prefix)
        self._maps = [np.memmap(f, dtype=np.uint8, mode="r") for f in self.files]
        self._starts = np.cumsum([0] + [len(m) for m in self._maps])  # byte offset of each
        end = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize
        if end > self._starts[-1]:
            raise UserError(
                f"{self.prefix}: the data holds {int(self._starts[-1])} bytes but the index "
                f"needs {end}; the .bin (or a shard) is truncated or belongs to another index."
            )

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_steps(self) -> int:
        """Complete steps the data holds."""
        return len(self) // self.global_batch_size

    def item(self, i: int) -> np.ndarray:
        """Item ``i``: int32[L + 1] tokens."""
        if not 0 <= i < len(self):
            raise UserError(f"item {i} is outside the {len(self)} sequences of {self.prefix}.")
        lo = int(self.pointers[i])
        hi = lo + (self.seq_len + 1) * self.dtype.itemsize
        first = int(np.searchsorted(self._starts, lo, side="right")) - 1
        pieces = []
        while lo < hi:  # an item may straddle two shards
            start, stop = int(self._starts[first]), int(self._starts[first + 1])
            take = min(hi, stop) - lo
            pieces.append(self._maps[first][lo - start : lo - start + take])
            lo, first = lo + take, first + 1
        raw = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return raw.view(self.dtype).astype(np.int32)

    def samples(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self.item(int(i)) for i in np.asarray(indices, dtype=np.int64)]
        if not rows:
            return {"tokens": np.zeros((0, self.seq_len + 1), np.int32)}
        return {"tokens": np.stack(rows)}

    def batch(self, step: int) -> np.ndarray:
        """int32[B, L + 1]: the sequences of step ``step``."""
        if not 0 <= step < self.num_steps:
            raise UserError(
                f"step {step} is outside the {self.num_steps} steps of {self.prefix} "
                f"({len(self)} sequences of {self.seq_len + 1} tokens, {self.global_batch_size} "
                "per step)."
            )
        return self.global_batch(step)["tokens"]

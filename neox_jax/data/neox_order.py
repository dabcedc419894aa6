"""GPT-NeoX's own sample order, computed the way GPT-NeoX computes it.

GPT-NeoX (``megatron/data/gpt2_dataset.py``, ``data_utils.py``, ``blendable_dataset.py``
and ``helpers.cpp``) turns an indexed dataset into training samples with three arrays,
built once for a fixed number of samples ``ns``:

* the split: ``--split 969,30,1`` cuts the dataset's sequences into contiguous train /
  valid / test ranges of ``round(fraction * count)`` sequences, the rounding surplus
  taken off every boundary (``split_ranges``);
* ``doc_idx``: the split's sequence ids repeated for ``E`` epochs (the fewest whose
  packed stream holds ``ns`` samples of ``L + 1`` tokens, overlapping by one), shuffled
  all together by ``np.random.RandomState(seed)`` (``build_doc_idx``);
* ``sample_idx``: ``[N + 1, 2]`` rows ``(position in doc_idx, offset)`` where sample
  ``i`` starts, i.e. stream token ``i * L``, ``N = (E * T - 1) // L`` (``T`` the tokens
  of one epoch); sample ``i`` is tokens ``[i*L, i*L + L]`` of the stream, inclusive
  (``build_sample_idx``, GPT-NeoX's C++ loop done with cumsum + searchsorted);
* ``shuffle_idx``: ``arange(N)`` shuffled by the same RandomState, continuing its
  stream after the ``doc_idx`` shuffle (``build_shuffle_idx``).

A blend of datasets (``train_data_paths`` + ``train_data_weights``) gives dataset ``k``
``ceil(ns * w_k * 1.005)`` samples and picks, for global sample ``n``, the dataset whose
count lags ``w_k * max(n, 1)`` the most (``blending_indices``).

Each function states which GPT-NeoX computation it matches; tests check them against a
direct transcription of the published algorithm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from neox_jax.errors import UserError

# GPT-NeoX's blend over-provisions every dataset by 0.5% (data_utils.py).
BLEND_MARGIN = 1.005
_INT32_MAX = np.iinfo(np.int32).max
_UINT32_MAX = np.iinfo(np.uint32).max
# Documents per chunk when locating sample starts: bounds build_sample_idx's memory.
_DOC_CHUNK = 1 << 22


def split_ranges(split: str, count: int) -> list[int]:
    """GPT-NeoX's ``get_train_valid_test_split_``: 4 boundaries of train/valid/test.

    Args:
      split: ``"969,30,1"`` or ``"969/30/1"`` (fewer parts are padded with 0).
      count: number of sequences in the dataset.

    Returns:
      ``[0, a, b, count]``: train is ``[0, a)``, valid ``[a, b)``, test ``[b, count)``.
    """
    sep = "," if "," in split else "/" if "/" in split else None
    try:
        parts = [float(s) for s in (split.split(sep) if sep else [split])]
    except ValueError:
        raise UserError(
            f"split {split!r} must be numbers separated by ',' or '/' (e.g. '969,30,1')."
        ) from None
    parts = (parts + [0.0, 0.0])[:3]
    total = sum(parts)
    if total <= 0 or min(parts) < 0:
        raise UserError(f"split {split!r} needs non-negative parts with a positive sum.")
    bounds = [0]
    for part in (p / total for p in parts):
        bounds.append(bounds[-1] + int(round(part * float(count))))
    surplus = bounds[-1] - count
    return [bounds[0]] + [b - surplus for b in bounds[1:]]


def num_epochs(tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    """GPT-NeoX's ``_num_epochs``: the fewest epochs E >= 1 with
    ``(E * T - 1) // L >= num_samples`` (the last sample needs one token more)."""
    if tokens_per_epoch < 1:
        raise UserError("the split holds no tokens; check the dataset and the split string.")
    return max(1, -(-(num_samples * seq_len + 1) // tokens_per_epoch))


def build_doc_idx(documents: np.ndarray, epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """GPT-NeoX's ``_build_doc_idx``: ``documents`` tiled ``epochs`` times, one shuffle.

    Returns:
      int32[epochs * len(documents)].
    """
    doc_idx = np.tile(np.asarray(documents, dtype=np.int32), epochs)
    rng.shuffle(doc_idx)
    return doc_idx


def sample_idx_dtype(epochs: int, tokens_per_epoch: int, seq_len: int) -> type:
    """int32 unless ``2 * (N + 1)`` (N in floating point, as GPT-NeoX computes it) reaches
    int32's maximum; GPT-NeoX then uses its int64 builder."""
    n = (epochs * tokens_per_epoch - 1) / seq_len
    return np.int32 if 2 * (n + 1) < _INT32_MAX else np.int64


def build_sample_idx(
    sizes: np.ndarray, doc_idx: np.ndarray, seq_len: int, epochs: int, tokens_per_epoch: int
) -> np.ndarray:
    """GPT-NeoX's ``build_sample_idx`` (helpers.cpp), vectorised.

    Row ``i`` locates stream token ``i * L``: the position ``j`` in ``doc_idx`` of the
    document holding it (empty documents hold nothing, so they are skipped) and the
    offset inside that document. Row 0 is ``(0, 0)`` as GPT-NeoX writes it. The stream
    is walked in chunks of documents so memory stays O(chunk + samples).

    Args:
      sizes: int32[num_sequences] tokens per sequence.
      doc_idx: int[E * D] from ``build_doc_idx``.
      seq_len: L.
      epochs: E.
      tokens_per_epoch: T, the tokens of the split's documents.

    Returns:
      int32 or int64 (``sample_idx_dtype``) [N + 1, 2], ``N = (E * T - 1) // L``.
    """
    n = (epochs * tokens_per_epoch - 1) // seq_len
    out = np.zeros((n + 1, 2), dtype=sample_idx_dtype(epochs, tokens_per_epoch, seq_len))
    start = 0  # stream position of the chunk's first token
    for first in range(0, len(doc_idx), _DOC_CHUNK):
        lengths = np.asarray(sizes)[doc_idx[first : first + _DOC_CHUNK]].astype(np.int64)
        ends = start + np.cumsum(lengths)  # stream position after each document
        stop = int(ends[-1]) if len(ends) else start
        # Samples starting in [start, stop): i*L in that range, excluding sample 0.
        lo, hi = max(1, -(-start // seq_len)), min(n, (stop - 1) // seq_len)
        if hi >= lo:
            pos = np.arange(lo, hi + 1, dtype=np.int64) * seq_len
            j = np.searchsorted(ends, pos, side="right")
            out[lo : hi + 1, 0] = first + j
            out[lo : hi + 1, 1] = pos - (ends[j] - lengths[j])
        start = stop
    return out


def build_shuffle_idx(size: int, rng: np.random.RandomState) -> np.ndarray:
    """GPT-NeoX's ``_build_shuffle_idx``: ``arange(size)`` shuffled (uint32, or int64 when
    ``size`` nears uint32's maximum)."""
    dtype = np.uint32 if size < _UINT32_MAX - 1 else np.int64
    idx = np.arange(size, dtype=dtype)
    rng.shuffle(idx)
    return idx


def build_index(
    documents: np.ndarray, sizes: np.ndarray, num_samples: int, seq_len: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(doc_idx, sample_idx, shuffle_idx)`` as GPT-NeoX's ``_build_index_mappings``
    builds them for ``pack_impl="packed"``: one ``RandomState(seed)`` shuffles
    ``doc_idx`` and then ``shuffle_idx``."""
    documents = np.asarray(documents)
    tokens = int(np.asarray(sizes)[documents].sum(dtype=np.int64))
    epochs = num_epochs(tokens, seq_len, num_samples)
    rng = np.random.RandomState(seed=seed)
    doc_idx = build_doc_idx(documents, epochs, rng)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_len, epochs, tokens)
    shuffle_idx = build_shuffle_idx(sample_idx.shape[0] - 1, rng)
    return doc_idx, sample_idx, shuffle_idx


def normalized_weights(weights: Sequence[float], num_samples: int | None):
    """GPT-NeoX's ``get_normalized_weights_and_num_samples``: weights over their sum and
    ``ceil(num_samples * w * 1.005)`` samples for each dataset."""
    total = sum(weights)
    if not total > 0 or any(w < 0 for w in weights):
        raise UserError(f"blend weights {list(weights)} must be non-negative with a positive sum.")
    w = [x / total for x in weights]
    counts = [int(math.ceil(num_samples * x * BLEND_MARGIN)) for x in w]
    return w, counts


def blending_indices(
    weights: Sequence[float], size: int, start: int = 0, counts: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """GPT-NeoX's ``build_blending_indices`` (helpers.cpp) for global samples
    ``[start, start + size)``.

    Sample ``n`` goes to the first dataset with the largest ``w_k * max(n, 1) - c_k`` (in
    double precision, as the C++ does); ``c_k`` counts the samples given to ``k`` before.

    Args:
      weights: normalised float64 weights (``BlendableDataset`` normalises once more).
      size: how many samples to assign.
      start: first global sample; ``counts`` are the per-dataset counts before it.

    Returns:
      ``(dataset uint8[size], index within the dataset int64[size], counts after)``.
    """
    w = [float(x) for x in weights]
    c = list(counts) if counts is not None else [0] * len(w)
    k_range = range(1, len(w))
    dataset = np.empty(size, np.uint8)
    within = np.empty(size, np.int64)
    for i in range(size):
        n = float(max(start + i, 1))
        best, best_err = 0, w[0] * n - c[0]
        for k in k_range:
            err = w[k] * n - c[k]
            if err > best_err:
                best, best_err = k, err
        dataset[i], within[i] = best, c[best]
        c[best] += 1
    return dataset, within, c

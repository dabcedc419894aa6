"""Packed, shuffled, host-sharded pretraining batches over indexed datasets.

GPT-NeoX ``megatron/data/gpt2_dataset.py`` packs documents into one stream and
cuts sample ``i`` as tokens ``[i*L, i*L + L + 1)`` (``L = seq_len``; the extra token
is the last target, shared with the next sample), without resetting attention at
document boundaries. It builds three arrays: ``doc_idx`` (documents of all epochs,
shuffled), ``sample_idx`` (document and offset where each sample starts; a C++
loop in ``helpers.cpp``) and ``shuffle_idx`` (a permutation of samples), all sized
for a fixed ``num_samples``.

We keep the stream and the cut but make every batch a pure function of
``(seed, step)`` with no sample budget fixed in advance:

* the stream is an unbounded sequence of epochs; epoch ``e`` holds every document
  of the split, permuted by ``(seed, e)``;
* sample starts are located with ``cumsum`` + ``searchsorted`` (the vectorised
  equivalent of ``sample_idx``), computed per epoch and cached;
* stream samples are shuffled within consecutive blocks of ``samples_per_epoch``
  by a permutation depending on ``(seed, block)``, instead of one global shuffle;
* global sample ``g`` of step ``s`` is ``g = s * global_batch + row``, so a host's
  rows are computed without touching the others' and do not depend on the host
  count.

Permutations use ``np.random.RandomState``, whose streams NumPy keeps frozen
across versions, so a resumed run sees the same data after a NumPy upgrade.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import numpy as np

from neox_jax.data.indexed_dataset import IndexedDataset
from neox_jax.errors import UserError

# Tags separating the independent random streams drawn from one seed.
_TAG_DOCS, _TAG_SAMPLES, _TAG_SPLIT = 0, 1, 2


def permute(values: np.ndarray, seed: int, tag: int, counter: int) -> np.ndarray:
    """A copy of ``values`` shuffled by a stream that depends only on its arguments.

    Args:
      values: 1-D array.
      seed: user seed, 0 <= seed < 2**32.
      tag: which stream (documents, samples, split).
      counter: epoch or block number.

    Returns:
      Permuted copy of ``values``.
    """
    mask = (1 << 32) - 1  # legacy seeding takes 32-bit words
    rng = np.random.RandomState([int(seed) & mask, int(tag) & mask, int(counter) & mask])
    return rng.permutation(values)


def document_order(docs: np.ndarray, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Order of the documents ``docs`` in epoch ``epoch`` (a function of seed and epoch)."""
    return permute(docs, seed, _TAG_DOCS, epoch) if shuffle else docs


class _LRU:
    """Tiny LRU cache: epochs and shuffle blocks are reused by neighbouring steps."""

    def __init__(self, size: int, build: Callable):
        self._size, self._build, self._data = size, build, collections.OrderedDict()

    def __call__(self, key):
        if key in self._data:
            self._data.move_to_end(key)
            return self._data[key]
        value = self._data[key] = self._build(key)
        if len(self._data) > self._size:
            self._data.popitem(last=False)
        return value


class EpochStream:
    """Documents of every epoch concatenated, each epoch in its own shuffled order.

    Args:
      docs: ids of the documents of this split (indices into ``sizes``).
      sizes: tokens of every document id.
      seed: shuffle seed.
      shuffle: permute documents per epoch; False keeps ``docs`` order.
    """

    def __init__(self, docs: np.ndarray, sizes: np.ndarray, seed: int, shuffle: bool = True):
        # int32 ids halve the per-epoch order arrays whenever they fit.
        id_dtype = np.int32 if len(sizes) < 2**31 else np.int64
        self.docs = np.asarray(docs, dtype=id_dtype)
        self.sizes = np.asarray(sizes)
        self.seed, self.shuffle = seed, shuffle
        self.tokens_per_epoch = int(self.sizes[self.docs].sum(dtype=np.int64))
        if self.tokens_per_epoch == 0:
            raise ValueError("the split holds no tokens; check the dataset and the split")
        self.epoch = _LRU(2, self._build_epoch)

    def _build_epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        order = document_order(self.docs, self.seed, e, self.shuffle)
        ends = np.cumsum(self.sizes[order], dtype=np.int64)  # stream offset after each doc
        return order, ends

    def locate(self, pos: int) -> tuple[int, int, int]:
        """Finds the document holding stream token ``pos``.

        Returns:
          ``(doc_id, stream position of its first token, its size)``.
        """
        e, q = divmod(pos, self.tokens_per_epoch)
        order, ends = self.epoch(e)
        # side="right" skips empty documents: their end equals the previous end.
        j = int(np.searchsorted(ends, q, side="right"))
        doc = int(order[j])
        size = int(self.sizes[doc])
        return doc, e * self.tokens_per_epoch + int(ends[j]) - size, size


def assemble_window(
    locate: Callable[[int], tuple[int, int, int]],
    fetch: Callable[[int, int, int], np.ndarray],
    start: int,
    length: int,
    with_segments: bool,
) -> dict[str, np.ndarray]:
    """Tokens ``[start, start + length)`` of a document stream.

    Args:
      locate: stream position -> ``(doc_id, doc start position, doc size)``.
      fetch: ``(doc_id, offset, count)`` -> tokens.
      start: first stream position.
      length: number of tokens.
      with_segments: also return ``segment_ids`` (1-based per document within the
        window) and ``positions`` (restarting at 0 at each document start and at the
        window start, like GPT-NeoX ``reset_position_ids``).

    Returns:
      ``{"tokens": int32[length]}`` plus the two int32[length] arrays if asked.
    """
    pieces, seg, pos = [], [], []
    p, end = start, start + length
    while p < end:
        doc, doc_start, size = locate(p)
        offset = p - doc_start
        take = min(size - offset, end - p)
        pieces.append(fetch(doc, offset, take))
        if with_segments:
            seg.append(np.full(take, len(seg) + 1, np.int32))
            pos.append(np.arange(take, dtype=np.int32))
        p += take
    out = {"tokens": np.concatenate(pieces).astype(np.int32)}
    if with_segments:
        out["segment_ids"] = np.concatenate(seg)
        out["positions"] = np.concatenate(pos)
    return out


class SampleSource:
    """Deterministic map from global sample index to a packed ``seq_len + 1`` window.

    Subclasses implement ``samples``; batching and host slicing live here so every
    source honours the same contract: the batch of step ``s`` holds global samples
    ``[s * B, (s + 1) * B)`` and depends only on the source's seed and ``s``.

    Args:
      seq_len: model sequence length L; rows hold L + 1 tokens.
      global_batch_size: rows per global step, B.
    """

    def __init__(self, seq_len: int, global_batch_size: int):
        if seq_len < 1 or global_batch_size < 1:
            raise ValueError(
                f"need seq_len >= 1 and global_batch_size >= 1, got "
                f"{seq_len} and {global_batch_size}"
            )
        self.seq_len = int(seq_len)
        self.global_batch_size = int(global_batch_size)

    def samples(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows for the given global sample indices.

        Args:
          indices: int array [n] of global sample indices >= 0.

        Returns:
          dict with ``tokens`` int32[n, seq_len + 1] (and, for sources built with
          ``reset_at_eod``, ``segment_ids`` and ``positions`` of the same shape).
        """
        raise NotImplementedError

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        """All ``global_batch_size`` rows of ``step``."""
        b = self.global_batch_size
        return self.samples(step * b + np.arange(b, dtype=np.int64))

    def host_batch(self, step: int, process_index: int, process_count: int) -> dict:
        """This host's rows ``[p*B/P, (p+1)*B/P)`` of the global batch of ``step``.

        Args:
          step: global step.
          process_index: this host, ``jax.process_index()``.
          process_count: number of hosts, ``jax.process_count()``.

        Returns:
          Same dict as ``global_batch`` with ``B / P`` rows.
        """
        b = self.global_batch_size
        if process_count < 1 or b % process_count:
            raise ValueError(f"global_batch_size {b} is not divisible by {process_count} hosts")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        per = b // process_count
        first = step * b + process_index * per
        return self.samples(first + np.arange(per, dtype=np.int64))


def stack_rows(rows: list[dict[str, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
    """Stacks per-row dicts of ``assemble_window`` into ``[rows, seq_len + 1]`` arrays."""
    if not rows:
        return {"tokens": np.zeros((0, seq_len + 1), np.int32)}
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def split_documents(
    ds: IndexedDataset, split: str, eval_fraction: float, split_seed: int = 0
) -> np.ndarray:
    """Sequence ids of a train/eval split, held out by document.

    Documents come from ``doc_idx`` when it covers every sequence (a document may
    span several sequences), else each sequence is a document (GPT-NeoX writes one
    sequence per document). A ``round(eval_fraction * D)`` documents (at least one,
    at most D - 1) chosen by a permutation of ``split_seed`` form the eval split; the
    rest is train. Unlike GPT-NeoX's contiguous ``--split`` ranges, the choice is
    spread over the corpus, so a corpus sorted by source still yields a mixed eval set.

    Args:
      ds: the dataset.
      split: ``"all"``, ``"train"`` or ``"eval"``.
      eval_fraction: fraction of documents held out for eval.
      split_seed: seed of the choice, kept apart from the shuffle seed so changing
        the training seed never moves documents between splits.

    Returns:
      Sorted int64 array of sequence ids.
    """
    if split not in ("all", "train", "eval"):
        raise ValueError(f"split must be 'all', 'train' or 'eval', got {split!r}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(ds)
    bounds = np.asarray(ds.doc_idx, dtype=np.int64)
    if len(bounds) < 2 or bounds[-1] != n:
        bounds = np.arange(n + 1, dtype=np.int64)
    num_docs = len(bounds) - 1
    if split == "all" or (split == "train" and eval_fraction == 0.0):
        return np.arange(n, dtype=np.int64)
    if eval_fraction == 0.0:
        raise ValueError("split='eval' needs eval_fraction > 0 (or use a separate eval prefix)")
    if num_docs < 2:
        raise ValueError(f"cannot hold out documents from a dataset of {num_docs} document(s)")
    n_eval = min(max(1, round(eval_fraction * num_docs)), num_docs - 1)
    is_eval = np.zeros(num_docs, bool)
    is_eval[permute(np.arange(num_docs), split_seed, _TAG_SPLIT, 0)[:n_eval]] = True
    chosen = np.nonzero(is_eval if split == "eval" else ~is_eval)[0]
    # Expand documents to their sequence ranges [bounds[d], bounds[d + 1]).
    counts = bounds[chosen + 1] - bounds[chosen]
    firsts = np.repeat(bounds[chosen], counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return firsts + within


class PretrainSource(SampleSource):
    """GPT-NeoX-style packed samples from one indexed dataset.

    Args:
      dataset: an ``IndexedDataset`` or its prefix.
      seq_len: model sequence length L; rows hold L + 1 tokens.
      global_batch_size: rows per global step.
      seed: shuffle seed (documents per epoch and samples per block).
      split: ``"all"``, ``"train"`` or ``"eval"`` (see ``split_documents``).
      eval_fraction: fraction of documents held out for ``"eval"``.
      split_seed: seed choosing the held-out documents.
      shuffle: False keeps document and sample order (a plain sequential pass).
      reset_at_eod: also return ``segment_ids`` and ``positions`` per row.
    """

    def __init__(
        self,
        dataset: IndexedDataset | str,
        seq_len: int,
        global_batch_size: int,
        *,
        seed: int = 0,
        split: str = "all",
        eval_fraction: float = 0.0,
        split_seed: int = 0,
        shuffle: bool = True,
        reset_at_eod: bool = False,
    ):
        super().__init__(seq_len, global_batch_size)
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        self.dataset = dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)
        self.seed, self.shuffle, self.reset_at_eod = seed, shuffle, reset_at_eod
        self.docs = split_documents(self.dataset, split, eval_fraction, split_seed)
        try:
            self.stream = EpochStream(self.docs, self.dataset.sizes, seed, shuffle)
        except ValueError as e:  # name the dataset: a run may blend several
            where = getattr(self.dataset, "prefix", None) or "the dataset"
            raise UserError(f"{where} ({split} split): {e}") from None
        # As GPT-NeoX's _num_epochs: the last window of an epoch needs L + 1 tokens.
        self.samples_per_epoch = max(1, (self.stream.tokens_per_epoch - 1) // self.seq_len)
        self._block = _LRU(2, self._build_block)

    def _build_block(self, block: int) -> np.ndarray:
        s = self.samples_per_epoch
        ids = np.arange(s, dtype=np.int32 if s < 2**31 else np.int64)
        return permute(ids, self.seed, _TAG_SAMPLES, block)

    def stream_index(self, indices: np.ndarray) -> np.ndarray:
        """Maps global sample indices to stream sample indices (the sample shuffle).

        Stream samples ``[b*S, (b+1)*S)`` (``S = samples_per_epoch``) are permuted
        among themselves by ``(seed, b)``: a bijection on the non-negative integers.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if not self.shuffle:
            return indices
        s = self.samples_per_epoch
        blocks, within = np.divmod(indices, s)
        out = np.empty_like(indices)
        for b in np.unique(blocks):
            sel = blocks == b
            out[sel] = b * s + self._block(int(b))[within[sel]]
        return out

    def window(self, stream_sample: int) -> dict[str, np.ndarray]:
        """Stream tokens ``[i*L, i*L + L + 1)`` of stream sample ``i``."""
        return assemble_window(
            self.stream.locate,
            self.dataset.get,
            int(stream_sample) * self.seq_len,
            self.seq_len + 1,
            self.reset_at_eod,
        )

    def samples(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        if np.any(np.asarray(indices) < 0):
            raise ValueError("sample indices must be >= 0")
        return stack_rows([self.window(i) for i in self.stream_index(indices)], self.seq_len)


def blend_schedule(
    weights: Sequence[float], num_samples: int, start_counts: Sequence[int] | None = None
) -> tuple[np.ndarray, list[int]]:
    """Which source each global sample comes from.

    Megatron's ``build_blending_indices`` (``helpers.cpp``) gives sample ``n`` to the
    source whose count lags furthest behind ``w_k * n``. That can drift up to about
    two samples from the exact share; we use Tijdeman's variant of the same greedy
    (R. Tijdeman, "The chairman assignment problem", Discrete Math. 32, 1980): among
    sources with lag ``w_k (n+1) - c_k >= 1/(2K-2)``, pick the one with the earliest
    ``(c_k + 1 - 1/(2K-2)) / w_k``. Every prefix of length n then holds
    ``|c_k - w_k n| <= 1 - 1/(2K-2) < 1`` samples of source k. It depends only on
    the weights (randomness lives inside each source).

    Args:
      weights: positive weights, normalised here.
      num_samples: how many samples to assign.
      start_counts: per-source counts after the samples already assigned, to
        continue a schedule; None starts at sample 0.

    Returns:
      ``(source uint8[num_samples], counts after them)``.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = (w / w.sum()).tolist()
    k_count = len(w)
    if k_count > 255:
        raise ValueError("at most 255 blended sources")
    counts = list(start_counts) if start_counts is not None else [0] * k_count
    n0 = sum(counts)
    delta = 1.0 / (2 * k_count - 2) if k_count > 1 else 0.0
    eps = 1e-9  # float slack on the eligibility test; the bound has margin 1/(2K-2)
    source = np.empty(num_samples, np.uint8)
    for i in range(num_samples):
        t = n0 + i + 1
        best, best_deadline = 0, float("inf")
        for k in range(k_count):
            if w[k] * t - counts[k] >= delta - eps:
                deadline = (counts[k] + 1 - delta) / w[k]
                if deadline < best_deadline:
                    best, best_deadline = k, deadline
        source[i] = best
        counts[best] += 1
    return source, counts


class BlendedSource(SampleSource):
    """Weighted mixture of sources, deterministic per global sample index.

    Global sample ``g`` is the ``c``-th sample of source ``k`` where ``k`` comes
    from ``blend_schedule`` and ``c`` counts the earlier samples given to ``k``;
    each source keeps its own seed and shuffle. The schedule is computed up to the
    largest index asked for (a Python loop, about 1 µs per sample) and kept as one
    byte per sample plus per-source counts every ``_CHUNK`` samples.

    Args:
      sources: ``SampleSource`` objects with equal ``seq_len`` and output keys.
      weights: positive weights, one per source.
      global_batch_size: rows per step; defaults to the first source's.
    """

    _CHUNK = 4096

    def __init__(
        self,
        sources: Sequence[SampleSource],
        weights: Sequence[float],
        global_batch_size: int | None = None,
    ):
        if not sources or len(sources) != len(weights):
            raise ValueError(
                f"need one weight per source, got {len(sources)} sources and {len(weights)} weights"
            )
        if any(not np.isfinite(x) or x <= 0 for x in weights):
            raise ValueError(f"weights must be positive and finite, got {list(weights)}")
        seq_lens = {s.seq_len for s in sources}
        if len(seq_lens) != 1:
            raise ValueError(f"sources disagree on seq_len: {sorted(seq_lens)}")
        super().__init__(seq_lens.pop(), global_batch_size or sources[0].global_batch_size)
        self.sources = list(sources)
        self.weights = np.asarray(weights, np.float64) / np.sum(weights)
        self._source = np.zeros(0, np.uint8)
        self._snapshots = np.zeros((1, len(sources)), np.int64)  # counts at chunk starts

    def _extend(self, need: int) -> None:
        c = self._CHUNK
        have = len(self._source)
        if need <= have:
            return
        # Grow geometrically, in whole chunks, so walking forward costs O(total) once.
        target = -(-max(need, 2 * have) // c) * c
        parts, snaps = [self._source], [self._snapshots]
        counts = self._snapshots[-1].tolist()
        for _ in range(have // c, target // c):
            chunk, counts = blend_schedule(self.weights, c, counts)
            parts.append(chunk)
            snaps.append(np.asarray([counts], np.int64))
        self._source = np.concatenate(parts)
        self._snapshots = np.concatenate(snaps)

    def assignment(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(source, index within that source)`` of each global sample index."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size == 0:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        self._extend(int(indices.max()) + 1)
        src = self._source[indices].astype(np.int32)
        chunk = indices // self._CHUNK
        within = self._snapshots[chunk, src]
        for j, (g, k, ch) in enumerate(zip(indices, src, chunk, strict=True)):
            within[j] += np.count_nonzero(self._source[ch * self._CHUNK : g] == k)
        return src, within

    def samples(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        src, within = self.assignment(indices)
        out: dict[str, np.ndarray] = {}
        for k in np.unique(src):
            sel = src == k
            part = self.sources[int(k)].samples(within[sel])
            if out and set(part) != set(out):
                raise ValueError(
                    "blended sources return different keys; build them all "
                    "with the same reset_at_eod"
                )
            for key, value in part.items():
                if key not in out:
                    out[key] = np.empty((len(indices),) + value.shape[1:], value.dtype)
                out[key][sel] = value
        if not out:
            out["tokens"] = np.zeros((0, self.seq_len + 1), np.int32)
        return out

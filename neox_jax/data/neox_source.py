"""Batches in GPT-NeoX's sample order, with GPT-NeoX's cached index files.

``data.order=neox``: global sample ``g`` (step ``g // B``, row ``g % B``) is the sample
GPT-NeoX's data loader hands out ``g``-th, so step ``s`` trains on the tokens GPT-NeoX's
step ``s`` trains on (GPT-NeoX's ``DistributedBatchSampler`` walks its dataset in
order, ``train_batch_size`` samples per step, micro-batches in row order).

Two forms, as GPT-NeoX's ``build_train_valid_test_data_loaders``:

* ``data_path`` + ``split``: one dataset cut into train / valid / test ranges; the
  datasets are named ``train`` and ``valid`` (no blend);
* ``train_data_paths`` (+ weights) and ``valid_data_paths``: every path in full, named
  ``train_<i>`` / ``valid_<i>``, always blended (one path included).

The three index arrays of each (dataset, name) are read from GPT-NeoX's cache files
``<prefix>_<name>_indexmap_<ns>ns_<L>sl_<seed>s_packedpi_ac_{doc,sample,shuffle}_idx.npy``
(``_packedpi`` when GPT-NeoX's ``allow_chopped`` is false, ``data.neox_allow_chopped``;
older GPT-NeoX versions leave the suffix out), so a run reuses the files GPT-NeoX built,
or built and written there under the name GPT-NeoX reads for that setting. With
``pack_impl="packed"`` (the only one neox_jax runs) ``allow_chopped`` changes nothing but
that name (GPT-NeoX's ``_build_index_mappings`` reads it only for the other packings),
so files of either name hold the same arrays and either is read. Files of the same
dataset built for another seed, sequence length or sample count are refused, naming
which, unless ``index_mode="new"`` asks for new ones beside them.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np

from neox_jax.data import neox_order
from neox_jax.data.indexed_dataset import IndexedDataset
from neox_jax.data.pretrain_data import SampleSource, stack_rows
from neox_jax.errors import UserError

KINDS = ("doc", "sample", "shuffle")
INDEX_MODES = ("auto", "new")
# doc_idx files up to this many entries are checked against the seed by rebuilding
# them (a shuffle of this size takes about a second); larger ones by shape only.
_SEED_CHECK_MAX = 1 << 25
# GPT-NeoX's names: "_packedpi_ac" (allow_chopped) or "_packedpi" since it has pack_impl,
# nothing before; "packed" files are the same arrays either way (see packed_suffix).
PACKED_SUFFIXES = ("_packedpi_ac", "_packedpi", "")
_NAME = re.compile(r"_(\d+)ns_(\d+)sl_(\d+)s(_packedpi_ac|_packedpi)?_doc_idx\.npy$")


@dataclass(frozen=True)
class IndexKey:
    """What GPT-NeoX's index file names record."""

    num_samples: int
    seq_len: int
    seed: int

    def describe(self, other: IndexKey) -> list[str]:
        """The fields of ``self`` (files on disk) that differ from ``other`` (this run)."""
        out = []
        if self.seed != other.seed:
            out.append(f"seed {self.seed} (this run: {other.seed}; --config.data.seed)")
        if self.seq_len != other.seq_len:
            out.append(
                f"seq_length {self.seq_len} (this run: {other.seq_len}; --config.data.seq_len)"
            )
        if self.num_samples != other.num_samples:
            out.append(
                f"{self.num_samples} samples (this run: {other.num_samples}, from train.steps "
                "x data.global_batch_size, or eval's samples)"
            )
        return out


def index_base(prefix: str, name: str, index_dir: str = "") -> str:
    """``<prefix>_<name>_indexmap`` (or the same base name inside ``index_dir``)."""
    where = os.path.join(index_dir, os.path.basename(prefix)) if index_dir else prefix
    return f"{where}_{name}_indexmap"


def packed_suffix(allow_chopped: bool) -> str:
    """The name suffix GPT-NeoX's ``_build_index_mappings`` gives packed index files:
    ``"_{pack_impl}pi"``, then ``"_ac"`` when ``allow_chopped`` (its default, True)."""
    if not isinstance(allow_chopped, bool):
        raise UserError(
            f"data.neox_allow_chopped must be true or false (GPT-NeoX's allow_chopped), "
            f"got {allow_chopped!r}."
        )
    return "_packedpi_ac" if allow_chopped else "_packedpi"


def index_files(base: str, key: IndexKey, suffix: str = "_packedpi_ac") -> dict[str, str]:
    """The three file names GPT-NeoX uses for ``key`` (``suffix``: one of
    ``PACKED_SUFFIXES``; the current GPT-NeoX default when not given)."""
    if suffix not in PACKED_SUFFIXES:
        raise ValueError(f"suffix must be one of {PACKED_SUFFIXES}")
    stem = f"{base}_{key.num_samples}ns_{key.seq_len}sl_{key.seed}s{suffix}"
    return {kind: f"{stem}_{kind}_idx.npy" for kind in KINDS}


def existing_keys(base: str) -> dict[IndexKey, str]:
    """Index files on disk for ``base``: key -> name suffix, for complete triples only."""
    folder, stem = os.path.split(base)
    found = {}
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return found
    for file in names:
        if not file.startswith(stem):
            continue
        m = _NAME.fullmatch(file[len(stem) :])
        if m:
            key = IndexKey(int(m[1]), int(m[2]), int(m[3]))
            files = index_files(base, key, m[4] or "")
            if all(os.path.isfile(f) for f in files.values()):
                found.setdefault(key, m[4] or "")
    return found


def _save_atomic(path: str, array: np.ndarray) -> None:
    """np.save through a temporary file renamed into place: no half-written index."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".npy", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class NeoxDataset:
    """One GPT-NeoX ``GPT2Dataset`` (packed): the tokens of each of its samples.

    Args:
      dataset: the indexed dataset.
      name: GPT-NeoX's name for it (``train``, ``valid``, ``train_0``, ...); part of the
        index file names.
      documents: its sequence ids (a contiguous range of the dataset).
      num_samples: samples GPT-NeoX sizes the index for.
      seq_len: L; samples hold L + 1 tokens.
      seed: GPT-NeoX's ``seed``.
      index_dir: where the index files live; "" = beside the dataset, as GPT-NeoX.
      index_mode: "auto" reads matching files, refuses files built for other settings,
        else builds and writes; "new" builds (and writes) whatever else is there.
      allow_chopped: GPT-NeoX's ``allow_chopped``: which name new files get
        (``packed_suffix``); files of any of GPT-NeoX's names are read.
    """

    def __init__(self, dataset, name, documents, num_samples, seq_len, seed, *,
                 index_dir: str = "", index_mode: str = "auto",
                 allow_chopped: bool = True):  # fmt: skip
        if index_mode not in INDEX_MODES:
            raise UserError(f"data.neox_index={index_mode!r}; choose one of {INDEX_MODES}.")
        self.suffix = packed_suffix(allow_chopped)
        self.dataset, self.name, self.seq_len = dataset, name, int(seq_len)
        self.documents = np.asarray(documents, dtype=np.int32)
        self.key = IndexKey(int(num_samples), int(seq_len), int(seed))
        self.tokens_per_epoch = int(dataset.sizes[self.documents].sum(dtype=np.int64))
        if self.tokens_per_epoch < 2:
            raise UserError(f"{dataset.prefix} ({name}): the split holds fewer than 2 tokens.")
        self.epochs = neox_order.num_epochs(self.tokens_per_epoch, seq_len, num_samples)
        self.base = index_base(dataset.prefix, name, index_dir)
        self.doc_idx, self.sample_idx, self.shuffle_idx = self._load_or_build(index_mode)
        self.num_built = len(self.shuffle_idx)
        # GPT2Dataset.__len__: one less than the shuffled samples (GPT-NeoX's own count).
        self.length = self.num_built - 1

    def _load_or_build(self, mode: str):
        on_disk = existing_keys(self.base)
        if self.key in on_disk:
            files = index_files(self.base, self.key, self.suffix)  # the name GPT-NeoX reads,
            if not all(os.path.isfile(f) for f in files.values()):  # else any other
                files = index_files(self.base, self.key, on_disk[self.key])
            arrays = tuple(np.load(files[k], mmap_mode="r", allow_pickle=False) for k in KINDS)
            self._check(arrays, files["doc"])
            return arrays
        others = [k.describe(self.key) for k in on_disk]
        if others and mode == "auto":
            raise UserError(
                f"GPT-NeoX index files for {self.dataset.prefix} ({self.name}) at "
                f"{self.base}_* were built for another setting: "
                + "; ".join(", ".join(d) for d in others)
                + ". Set the matching values to reuse them, or build new ones beside them "
                "with --config.data.neox_index=new."
            )
        arrays = neox_order.build_index(self.documents, self.dataset.sizes, *self._build_args())
        files = index_files(self.base, self.key, self.suffix)
        try:
            for kind, array in zip(KINDS, arrays, strict=True):
                _save_atomic(files[kind], array)
        except OSError as e:  # a read-only dataset folder: the order is still exact
            logging.warning("could not write GPT-NeoX index files %s_*: %s", self.base, e)
        return arrays

    def _build_args(self):
        return self.key.num_samples, self.key.seq_len, self.key.seed

    def _check(self, arrays, where: str) -> None:
        """Refuse files whose contents contradict their name (renamed or another build)."""
        doc_idx, sample_idx, shuffle_idx = arrays
        n = (self.epochs * self.tokens_per_epoch - 1) // self.seq_len
        problem = None
        found = None
        if doc_idx.ndim == 1 and sample_idx.ndim == 2 and len(sample_idx) > 1:
            found = self._position(doc_idx, sample_idx[1])  # stream position of sample 1
        if found is not None and found != self.seq_len:
            problem = f"it was built for seq_length {found}, not {self.seq_len}"
        elif doc_idx.ndim != 1 or len(doc_idx) != self.epochs * len(self.documents):
            problem = (
                f"doc_idx has {doc_idx.shape} entries, not {self.epochs} epochs x "
                f"{len(self.documents)} documents (built for another split or sample count)"
            )
        elif sample_idx.shape != (n + 1, 2) or shuffle_idx.shape != (n,):
            problem = (
                f"sample_idx {sample_idx.shape} / shuffle_idx {shuffle_idx.shape} do not "
                f"hold the {n} samples of {self.epochs} epochs at seq_length {self.seq_len}"
            )
        elif len(doc_idx) <= _SEED_CHECK_MAX:
            rng = np.random.RandomState(seed=self.key.seed)
            if not np.array_equal(
                neox_order.build_doc_idx(self.documents, self.epochs, rng), doc_idx
            ):
                problem = f"doc_idx is not the shuffle of seed {self.key.seed}"
        if problem:
            raise UserError(
                f"GPT-NeoX index file {where} does not match its name: {problem}. Remove "
                "the three files (doc/sample/shuffle) to rebuild them."
            )

    def _position(self, doc_idx, row) -> int:
        j, offset = int(row[0]), int(row[1])
        return int(self.dataset.sizes[doc_idx[:j]].sum(dtype=np.int64)) + offset

    def __len__(self) -> int:
        return self.length

    def pieces(self, idx: int) -> list[tuple[int, int, int]]:
        """``(sequence id, offset, count)`` pieces of sample ``idx`` (GPT2Dataset.__getitem__).

        An index past the shuffled samples wraps modulo ``len`` as GPT-NeoX's does.
        """
        if idx >= self.num_built:
            idx %= self.length
        i = int(self.shuffle_idx[idx])
        (f, off_f), (last, off_l) = self.sample_idx[i], self.sample_idx[i + 1]
        f, off_f, last, off_l = int(f), int(off_f), int(last), int(off_l)
        if f == last:
            return [(int(self.doc_idx[f]), off_f, off_l - off_f + 1)]
        first = int(self.doc_idx[f])
        out = [(first, off_f, int(self.dataset.sizes[first]) - off_f)]
        out += [(int(d), 0, int(self.dataset.sizes[d])) for d in self.doc_idx[f + 1 : last]]
        return out + [(int(self.doc_idx[last]), 0, off_l + 1)]

    def row(self, idx: int, with_segments: bool) -> dict[str, np.ndarray]:
        """Tokens int32[L + 1] of sample ``idx`` (and segment ids / positions per document)."""
        parts = [p for p in self.pieces(idx) if p[2] > 0]
        tokens = np.concatenate([self.dataset.get(d, o, c) for d, o, c in parts])
        if len(tokens) != self.seq_len + 1:  # packed samples are exact; a bad index is not
            raise UserError(f"{self.base}_*: sample {idx} has {len(tokens)} tokens, not L + 1.")
        out = {"tokens": tokens.astype(np.int32)}
        if with_segments:
            out["segment_ids"] = np.concatenate(
                [np.full(c, s + 1, np.int32) for s, (_, _, c) in enumerate(parts)]
            )
            out["positions"] = np.concatenate([np.arange(c, dtype=np.int32) for *_, c in parts])
        return out


class NeoxSource(SampleSource):
    """GPT-NeoX's order over one dataset (``data_path`` form) or a blend (paths form).

    Global sample ``g`` is GPT-NeoX's ``g``-th sample: ``datasets[0]``'s sample ``g``
    alone, or ``BlendableDataset``'s: dataset ``k`` and its sample ``c`` from
    ``blending_indices`` (computed up to the largest ``g`` asked, about a microsecond
    per sample and dataset, and kept).

    Args:
      datasets: ``NeoxDataset`` objects with one ``seq_len``.
      weights: None for the single form, else one weight per dataset (normalised as
        GPT-NeoX normalises them).
      global_batch_size: rows per step, B.
      reset_at_eod: also return ``segment_ids`` and ``positions``.
    """

    def __init__(self, datasets, weights, global_batch_size, *, reset_at_eod=False,
                 microbatches: int = 1):  # fmt: skip
        super().__init__(datasets[0].seq_len, global_batch_size)
        self.datasets, self.reset_at_eod = list(datasets), reset_at_eod
        # GPT-NeoX's loader yields micro-batches of B / gradient_accumulation_steps samples
        # and drops an incomplete last one; itertools.cycle then replays the pass.
        self.micro_batch = max(1, global_batch_size // max(1, microbatches))
        if weights is None:
            if len(datasets) != 1:
                raise ValueError("several datasets need blend weights")
            self.size = len(datasets[0])
            self.weights = None
        else:
            w = np.asarray(weights, dtype=np.float64)
            self.weights = w / np.sum(w)  # BlendableDataset normalises once more
            self.size = sum(len(d) for d in datasets)
            self._dataset = np.zeros(0, np.uint8)
            self._within = np.zeros(0, np.int64)
            self._counts = [0] * len(datasets)

    def _extend(self, need: int) -> None:
        have = len(self._dataset)
        if need <= have:
            return
        more = min(self.size, max(need, 2 * have, 4096)) - have
        ds, within, self._counts = neox_order.blending_indices(
            self.weights, more, start=have, counts=self._counts
        )
        self._dataset = np.concatenate([self._dataset, ds])
        self._within = np.concatenate([self._within, within])

    def assignment(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(dataset, sample within it)`` of each global sample index."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and indices.min() < 0:
            raise ValueError("sample indices must be >= 0")
        one_pass = self.size // self.micro_batch * self.micro_batch
        if one_pass == 0:
            raise UserError(
                f"GPT-NeoX's order holds {self.size} samples, fewer than one micro-batch of "
                f"{self.micro_batch}; the dataset is too small for this batch size."
            )
        # Past the built samples (an order that fits train.steps only just): replay, as
        # GPT-NeoX's cycled loader does in an uninterrupted run.
        indices = indices % one_pass
        if self.weights is None:
            return np.zeros(len(indices), np.int32), indices
        self._extend(int(indices.max()) + 1 if indices.size else 0)
        return self._dataset[indices].astype(np.int32), self._within[indices]

    def samples(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        which, within = self.assignment(indices)
        rows = [
            self.datasets[int(k)].row(int(i), self.reset_at_eod)
            for k, i in zip(which, within, strict=True)
        ]
        return stack_rows(rows, self.seq_len)


def make_neox_sources(
    prefixes: list[str],
    eval_prefixes: list[str],
    *,
    split: str,
    weights: list[float] | None,
    seq_len: int,
    eval_weights: list[float] | None = None,
    seed: int,
    global_batch_size: int,
    train_samples: int,
    eval_batch_size: int,
    eval_samples: int,
    index_dir: str = "",
    index_mode: str = "auto",
    allow_chopped: bool = True,
    reset_at_eod: bool = False,
    microbatches: int = 1,
) -> tuple[NeoxSource, NeoxSource | None]:
    """``(train, eval or None)`` as GPT-NeoX builds them.

    One prefix, no ``eval_prefixes`` and a ``split`` string: the ``data_path`` form.
    Otherwise the paths form (``split`` unused; eval blends ``eval_prefixes`` by
    ``eval_weights``, equally when None, as GPT-NeoX's ``valid_data_weights``).
    ``train_samples`` is GPT-NeoX's ``train_iters * train_batch_size`` and
    ``eval_samples`` its ``(train_iters // eval_interval + 1) * eval_iters * batch``;
    ``microbatches`` is its ``gradient_accumulation_steps`` (the loader's micro-batches);
    ``allow_chopped`` its ``allow_chopped`` (names the index files, ``packed_suffix``).
    """
    common = dict(
        seq_len=seq_len, seed=seed, index_dir=index_dir, index_mode=index_mode,
        allow_chopped=allow_chopped,
    )  # fmt: skip
    src = dict(reset_at_eod=reset_at_eod, microbatches=microbatches)
    if len(prefixes) == 1 and not eval_prefixes and split:
        ds = IndexedDataset(prefixes[0])
        bounds = neox_order.split_ranges(split, len(ds))
        if bounds[1] <= bounds[0]:
            raise UserError(f"split {split!r} leaves no training documents in {prefixes[0]}.")
        train = NeoxDataset(ds, "train", np.arange(bounds[0], bounds[1]), train_samples, **common)
        evals = None
        if bounds[2] > bounds[1] and eval_samples > 0:
            valid = NeoxDataset(
                ds, "valid", np.arange(bounds[1], bounds[2]), eval_samples, **common
            )
            evals = NeoxSource([valid], None, eval_batch_size, **src)
        return NeoxSource([train], None, global_batch_size, **src), evals

    def blend(paths, kind, samples, batch, blend_weights):
        w, counts = neox_order.normalized_weights(blend_weights, samples)
        sets = []
        for i, (path, count) in enumerate(zip(paths, counts, strict=True)):
            ds = IndexedDataset(path)
            sets.append(NeoxDataset(ds, f"{kind}_{i}", np.arange(len(ds)), count, **common))
        return NeoxSource(sets, w, batch, **src)

    weights = weights or [1.0] * len(prefixes)
    if len(weights) != len(prefixes):
        raise UserError(f"{len(weights)} blend weights for {len(prefixes)} datasets.")
    train = blend(prefixes, "train", train_samples, global_batch_size, weights)
    evals = None
    eval_weights = eval_weights or [1.0] * len(eval_prefixes)
    if len(eval_weights) != len(eval_prefixes):
        raise UserError(f"{len(eval_weights)} eval weights for {len(eval_prefixes)} datasets.")
    if eval_prefixes and eval_samples > 0:
        evals = blend(eval_prefixes, "valid", eval_samples, eval_batch_size, eval_weights)
    return train, evals

"""data.order=neox against a direct transcription of GPT-NeoX's published algorithm.

The reference below follows GPT-NeoX's megatron/data (gpt2_dataset.py: _num_epochs,
_build_doc_idx, _build_shuffle_idx, GPT2Dataset.__getitem__; helpers.cpp:
build_sample_idx and build_blending_indices as plain loops; data_utils.py: the split and
the blend weights) statement by statement, with loops where GPT-NeoX loops, so it shares
no code with neox_jax/data/neox_order.py's vectorised version. Comparisons are exact.
"""

import math
import os

import numpy as np
import pytest

from neox_jax.data import neox_order
from neox_jax.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from neox_jax.data.neox_source import NeoxDataset, index_base, index_files, make_neox_sources
from neox_jax.errors import UserError

# ---------------------------------------------------------------- the reference


def ref_split(splits_string, size):
    splits = [float(s) for s in splits_string.split(",")]
    while len(splits) < 3:
        splits.append(0.0)
    splits = [s / sum(splits[:3]) for s in splits[:3]]
    index = [0]
    for i, s in enumerate(splits):
        index.append(index[i] + int(round(s * float(size))))
    diff = index[-1] - size
    return [index[0]] + [x - diff for x in index[1:]]


def ref_num_epochs(tokens_per_epoch, seq_length, num_samples):
    epochs, total = 0, 0
    while True:
        epochs += 1
        total += tokens_per_epoch
        if ((total - 1) // seq_length) >= num_samples:
            return epochs


def ref_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch):
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = np.zeros([num_samples + 1, 2], dtype=np.int64)
    sample_index, doc_idx_index, doc_offset = 1, 0, 0
    while sample_index <= num_samples:
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = sizes[doc_idx[doc_idx_index]] - doc_offset
            remaining -= doc_length
            if remaining <= 0:
                doc_offset += remaining + doc_length - 1
                remaining = 0
            else:
                doc_idx_index += 1
                doc_offset = 0
        sample_idx[sample_index] = (doc_idx_index, doc_offset)
        sample_index += 1
    return sample_idx


def ref_index(documents, sizes, num_samples, seq_length, seed):
    tokens = np.sum(sizes[documents])
    epochs = ref_num_epochs(tokens, seq_length, num_samples)
    rng = np.random.RandomState(seed=seed)
    doc_idx = np.mgrid[0:epochs, 0 : len(documents)][1]
    doc_idx[:] = documents
    doc_idx = doc_idx.reshape(-1).astype(np.int32)
    rng.shuffle(doc_idx)
    sample_idx = ref_sample_idx(sizes, doc_idx, seq_length, epochs, tokens)
    shuffle_idx = np.arange(0, sample_idx.shape[0] - 1, dtype=np.uint32)
    rng.shuffle(shuffle_idx)
    return doc_idx, sample_idx, shuffle_idx


def ref_parts(ds, index, idx):
    """GPT2Dataset.__getitem__'s pieces of sample ``idx``, one per document."""
    doc_idx, sample_idx, shuffle_idx = index
    idx = shuffle_idx[idx]
    f, last = sample_idx[idx][0], sample_idx[idx + 1][0]
    off_f, off_l = sample_idx[idx][1], sample_idx[idx + 1][1]
    if f == last:
        return [ds.get(doc_idx[f], offset=off_f, length=off_l - off_f + 1)]
    parts = [ds.get(doc_idx[f], offset=off_f)]
    parts += [ds.get(doc_idx[i]) for i in range(f + 1, last)]
    parts.append(ds.get(doc_idx[last], length=off_l + 1))
    return parts


def ref_getitem(ds, index, idx):
    return np.concatenate(ref_parts(ds, index, idx))


def ref_blend(weights, size):
    weights = np.array(weights, dtype=np.float64)
    weights /= np.sum(weights)
    current = [0] * len(weights)
    dataset_index, sample_index = [], []
    for n in range(size):
        x = max(float(n), 1.0)
        best, best_err = 0, weights[0] * x - current[0]
        for k in range(1, len(weights)):
            err = weights[k] * x - current[k]
            if err > best_err:
                best, best_err = k, err
        dataset_index.append(best)
        sample_index.append(current[best])
        current[best] += 1
    return dataset_index, sample_index


# ---------------------------------------------------------------- data


def make_dataset(path, lengths, seed=0, vocab=1000):
    """An indexed dataset whose token values say where they are (for error messages)."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetBuilder(str(path)) as b:
        for n in lengths:
            b.add_document(rng.integers(0, vocab, n).astype(np.uint16))
    return IndexedDataset(str(path))


# Documents shorter than, longer than and equal to the sequence, empty ones, and sizes
# that put sample boundaries exactly on document ends.
DATASETS = {
    "short": [3, 5, 2, 7, 1, 4, 6, 2, 3, 5] * 3,
    "long": [40, 3, 25, 17, 9],
    "mixed_with_empty": [0, 8, 0, 16, 1, 33, 0, 8, 8, 2],
    "exact": [8, 8, 8, 8],
}


@pytest.mark.parametrize("name", list(DATASETS))
@pytest.mark.parametrize("seq_len,num_samples,seed", [(8, 5, 1234), (8, 40, 7), (5, 23, 0)])
def test_index_arrays_equal_reference(tmp_path, name, seq_len, num_samples, seed):
    ds = make_dataset(tmp_path / name, DATASETS[name])
    docs = np.arange(1, len(ds), dtype=np.int32)  # a split that does not start at 0
    ref = ref_index(docs, ds.sizes, num_samples, seq_len, seed)
    ours = neox_order.build_index(docs, ds.sizes, num_samples, seq_len, seed)
    assert len(ref[0]) > len(docs) or num_samples == 5  # several epochs are exercised
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(a, b)
    assert ours[0].dtype == np.int32 and ours[2].dtype == np.uint32
    assert ours[1].dtype == np.int32  # GPT-NeoX's int32 builder for small indexes


def test_sample_idx_chunks_equal_reference(tmp_path, monkeypatch):
    """The chunked walk over documents (chunks of 3 here) gives the same rows."""
    ds = make_dataset(tmp_path / "d", DATASETS["mixed_with_empty"])
    docs = np.arange(len(ds), dtype=np.int32)
    monkeypatch.setattr(neox_order, "_DOC_CHUNK", 3)
    ours = neox_order.build_index(docs, ds.sizes, 30, 6, 3)
    for a, b in zip(ours, ref_index(docs, ds.sizes, 30, 6, 3), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("count", [1, 7, 100, 1001])
@pytest.mark.parametrize("split", ["969,30,1", "949, 50, 1", "1", "8,2", "1,1,1"])
def test_split_ranges_equal_reference(split, count):
    assert neox_order.split_ranges(split, count) == ref_split(split, count)


def test_epochs_and_blend_equal_reference():
    for t, L, n in [(10, 3, 0), (10, 3, 3), (10, 3, 4), (7, 8, 50), (100, 7, 14)]:
        assert neox_order.num_epochs(t, L, n) == ref_num_epochs(t, L, n)
    for weights in ([0.3, 0.7], [1.0, 1.0, 2.0], [0.15, 0.8, 0.05]):
        w, _ = neox_order.normalized_weights(weights, 100)
        ds, within, _ = neox_order.blending_indices(np.asarray(w) / np.sum(w), 500)
        ref_ds, ref_within = ref_blend(weights, 500)
        assert ds.tolist() == ref_ds and within.tolist() == ref_within


def _tokens(source, step):
    return source.global_batch(step)["tokens"]


def test_data_path_form_matches_reference_tokens(tmp_path):
    """One dataset with a split: the train split's rows of every step are GPT-NeoX's."""
    lengths = [3, 30, 0, 5, 12, 9, 1, 17, 4, 8, 26, 2, 7]
    ds = make_dataset(tmp_path / "corpus", lengths)
    L, B, steps = 8, 4, 6
    train, evals = make_neox_sources(
        [ds.prefix], [], split="8,2,1", weights=None, seq_len=L, seed=1234,
        global_batch_size=B, train_samples=steps * B, eval_batch_size=2, eval_samples=6,
    )  # fmt: skip
    bounds = ref_split("8,2,1", len(ds))
    docs = np.arange(bounds[0], bounds[1], dtype=np.int32)
    ref = ref_index(docs, ds.sizes, steps * B, L, 1234)
    for step in range(steps):
        want = [ref_getitem(ds, ref, step * B + r) for r in range(B)]
        np.testing.assert_array_equal(_tokens(train, step), np.stack(want))
    valid_docs = np.arange(bounds[1], bounds[2], dtype=np.int32)
    ref_valid = ref_index(valid_docs, ds.sizes, 6, L, 1234)
    np.testing.assert_array_equal(
        _tokens(evals, 1), np.stack([ref_getitem(ds, ref_valid, i) for i in (2, 3)])
    )
    # The files are where GPT-NeoX looks for them, with its names and dtypes.
    files = index_files(index_base(ds.prefix, "train"), neox_order_key(steps * B, L, 1234))
    for kind, array in zip(("doc", "sample", "shuffle"), ref, strict=True):
        on_disk = np.load(files[kind])
        np.testing.assert_array_equal(on_disk, array)
        assert on_disk.dtype == array.dtype or kind == "sample"


def neox_order_key(ns, L, seed):
    from neox_jax.data.neox_source import IndexKey

    return IndexKey(ns, L, seed)


def test_blend_of_two_datasets_matches_reference(tmp_path):
    a = make_dataset(tmp_path / "a", [5, 20, 3, 9, 11, 2], seed=1)
    b = make_dataset(tmp_path / "b", [31, 4, 4, 6], seed=2, vocab=50)
    L, B, steps, weights = 6, 5, 4, [0.3, 0.7]
    train, _ = make_neox_sources(
        [a.prefix, b.prefix], [], split="", weights=weights, seq_len=L, seed=42,
        global_batch_size=B, train_samples=steps * B, eval_batch_size=B, eval_samples=0,
    )  # fmt: skip
    total = steps * B
    counts = [int(math.ceil(total * w / sum(weights) * 1.005)) for w in weights]
    refs = [
        ref_index(np.arange(len(d), dtype=np.int32), d.sizes, n, L, 42)
        for d, n in zip((a, b), counts, strict=True)
    ]
    size = sum(len(r[2]) - 1 for r in refs)
    which, within = ref_blend(weights, size)
    for step in range(steps):
        want = []
        for g in range(step * B, (step + 1) * B):
            k = which[g]
            want.append(ref_getitem((a, b)[k], refs[k], within[g]))
        np.testing.assert_array_equal(_tokens(train, step), np.stack(want))
    assert os.path.isfile(index_files(index_base(b.prefix, "train_1"),
                                      neox_order_key(counts[1], L, 42))["doc"])  # fmt: skip


def test_reuses_gpt_neox_files_and_refuses_other_settings(tmp_path):
    ds = make_dataset(tmp_path / "c", [7, 13, 2, 21, 5])
    docs = np.arange(len(ds), dtype=np.int32)
    base = index_base(ds.prefix, "train_0")
    # Files as an older GPT-NeoX names them (no _packedpi_ac), written by the reference.
    files = index_files(base, neox_order_key(12, 4, 99), suffix="")
    for kind, array in zip(("doc", "sample", "shuffle"), ref_index(docs, ds.sizes, 12, 4, 99),
                           strict=True):  # fmt: skip
        np.save(files[kind], array)
    stamp = os.stat(files["doc"]).st_mtime_ns
    reused = NeoxDataset(ds, "train_0", docs, 12, 4, 99)
    assert isinstance(reused.doc_idx, np.memmap) and os.stat(files["doc"]).st_mtime_ns == stamp
    with pytest.raises(UserError, match=r"seed 99 \(this run: 5"):
        NeoxDataset(ds, "train_0", docs, 12, 4, 5)
    with pytest.raises(UserError, match=r"seq_length 4 \(this run: 6"):
        NeoxDataset(ds, "train_0", docs, 12, 6, 99)
    NeoxDataset(ds, "train_0", docs, 12, 6, 99, index_mode="new")  # built beside them
    # A file renamed to claim another seq length is refused by its contents.
    for kind, path in files.items():
        os.replace(path, index_files(base, neox_order_key(12, 3, 99), suffix="_packedpi")[kind])
    with pytest.raises(UserError, match="built for seq_length 4, not 3"):
        NeoxDataset(ds, "train_0", docs, 12, 3, 99)


def test_past_its_samples_the_order_replays_as_gpt_neox_s_cycled_loader(tmp_path):
    """GPT-NeoX's loader yields micro-batches of B / accumulation samples, drops an
    incomplete last one and cycles: sample g past them is sample g mod (whole
    micro-batches x their size)."""
    ds = make_dataset(tmp_path / "d", [50, 50])
    train, _ = make_neox_sources(
        [ds.prefix], [], split="1", weights=None, seq_len=8, seed=1,
        global_batch_size=4, train_samples=4, eval_batch_size=2, eval_samples=0,
        microbatches=2,
    )  # fmt: skip
    size = len(train.datasets[0])  # GPT2Dataset's len: 12 samples built, 11 used
    one_pass = size // 2 * 2
    assert size == 11 and one_pass == 10
    ref = ref_index(np.arange(2, dtype=np.int32), ds.sizes, 4, 8, 1)
    want = [ref_getitem(ds, ref, g % one_pass) for g in range(12, 16)]
    np.testing.assert_array_equal(_tokens(train, 3), np.stack(want))


def test_config_order_neox_sizes_the_order_as_gpt_neox(tmp_path):
    """--config.data.order=neox through the trainer's make_sources: GPT-NeoX's
    train_iters x batch samples for train and (iters // eval_interval + 1) x eval_iters
    x batch for valid, named as GPT-NeoX names the data_path form's datasets."""
    from configs import pretrain
    from neox_jax.training.data import make_sources, resolve_tokenizer_and_paths

    ds = make_dataset(tmp_path / "pile", [9, 3, 40, 7, 12, 1, 30, 6, 5, 22])
    config = pretrain.get_config("tiny")
    config.data.update(source="indexed", paths=ds.prefix, order="neox", neox_split="8,2",
                       seq_len=8, seed=3, global_batch_size=2, eval_batch_size=2)  # fmt: skip
    config.train.update(steps=5, eval_every=2, eval_batches=1)
    _, paths = resolve_tokenizer_and_paths(config.data, tmp_path)
    train, evals = make_sources(config.data, paths, None, 2, config.train)
    assert train.datasets[0].key.num_samples == 10 and evals.datasets[0].key.num_samples == 6
    bounds = ref_split("8,2", len(ds))
    ref = ref_index(np.arange(bounds[0], bounds[1], dtype=np.int32), ds.sizes, 10, 8, 3)
    want = np.stack([ref_getitem(ds, ref, g) for g in (6, 7)])
    np.testing.assert_array_equal(_tokens(train, 3), want)
    config.data.source = "tfds"
    with pytest.raises(UserError, match="data.order='neox'"):
        resolve_tokenizer_and_paths(config.data, tmp_path)


def test_neox_yaml_selects_neox_order_and_refuses_other_packing():
    from neox_jax.neox_compat.config import translate

    base = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 128,
            "pos_emb": "rotary", "train_iters": 10, "train_batch_size": 4}  # fmt: skip
    t = translate({**base, "data_path": "/data/pile", "split": "949, 50, 1"})
    assert t.overrides["data.order"] == "neox" and t.overrides["data.neox_split"] == "949,50,1"
    t = translate({**base, "train_data_paths": ["/a", "/b"], "train_data_weights": [1, 3],
                   "valid_data_paths": ["/v", "/w"], "valid_data_weights": [2, 1]})  # fmt: skip
    assert t.overrides["data.neox_split"] == "" and t.overrides["data.weights"] == "1,3"
    assert t.overrides["data.eval_weights"] == "2,1"
    with pytest.raises(UserError, match="pack_impl='unpacked'"):
        translate({**base, "data_path": "/data/pile", "pack_impl": "unpacked"})


def test_evaluations_walk_on_through_the_valid_order(tmp_path):
    """GPT-NeoX's evaluation r reads valid batches [(r-1) k, r k) (k = eval_iters),
    the last (off-interval) evaluation the next k; our own order rereads batch 0 on."""
    from types import SimpleNamespace

    from neox_jax.training.data import first_eval_batch

    ds = make_dataset(tmp_path / "v", [30, 20, 10])
    _, evals = make_neox_sources(
        [ds.prefix], [], split="1,1", weights=None, seq_len=4, seed=0,
        global_batch_size=2, train_samples=4, eval_batch_size=2, eval_samples=18,
    )  # fmt: skip
    train_cfg = SimpleNamespace(eval_every=10, eval_batches=3)
    firsts = [first_eval_batch(evals, step, train_cfg) for step in (10, 20, 25)]
    assert firsts == [0, 3, 6]
    evals.global_batch(firsts[-1] + 2)  # the last batch read lies inside the built order
    assert first_eval_batch(object(), 20, train_cfg) == 0


def test_reset_at_eod_marks_each_document_of_a_sample(tmp_path):
    ds = make_dataset(tmp_path / "r", DATASETS["mixed_with_empty"])
    train, _ = make_neox_sources(
        [ds.prefix], [], split="1", weights=None, seq_len=6, seed=5, global_batch_size=3,
        train_samples=9, eval_batch_size=3, eval_samples=0, reset_at_eod=True,
    )  # fmt: skip
    ref = ref_index(np.arange(len(ds), dtype=np.int32), ds.sizes, 9, 6, 5)
    batch = train.global_batch(2)
    for row, g in enumerate(range(6, 9)):
        parts = [p for p in ref_parts(ds, ref, g) if len(p)]
        seg = np.concatenate([np.full(len(p), i + 1) for i, p in enumerate(parts)])
        pos = np.concatenate([np.arange(len(p)) for p in parts])
        np.testing.assert_array_equal(batch["tokens"][row], np.concatenate(parts))
        np.testing.assert_array_equal(batch["segment_ids"][row], seg)
        np.testing.assert_array_equal(batch["positions"][row], pos)


def test_wide_index_dtypes_hold_the_same_values(tmp_path, monkeypatch):
    """GPT-NeoX switches sample_idx to int64 and shuffle_idx to int64 for huge corpora;
    with the thresholds lowered the arrays keep the reference's values in those dtypes."""
    ds = make_dataset(tmp_path / "w", DATASETS["long"])
    docs = np.arange(len(ds), dtype=np.int32)
    monkeypatch.setattr(neox_order, "_INT32_MAX", 10)
    monkeypatch.setattr(neox_order, "_UINT32_MAX", 10)
    doc_idx, sample_idx, shuffle_idx = neox_order.build_index(docs, ds.sizes, 20, 8, 11)
    assert sample_idx.dtype == np.int64 and shuffle_idx.dtype == np.int64
    ref = ref_index(docs, ds.sizes, 20, 8, 11)
    for a, b in zip((doc_idx, sample_idx, shuffle_idx), ref, strict=True):
        np.testing.assert_array_equal(a, b)


def test_valid_blend_uses_valid_weights(tmp_path):
    """GPT-NeoX blends valid_data_paths by valid_data_weights (data.eval_weights)."""
    a = make_dataset(tmp_path / "va", [9, 14, 3, 20], seed=3)
    b = make_dataset(tmp_path / "vb", [25, 6, 11], seed=4)
    train = make_dataset(tmp_path / "t", [30, 30])
    _, evals = make_neox_sources(
        [train.prefix], [a.prefix, b.prefix], split="", weights=None, eval_weights=[2.0, 1.0],
        seq_len=5, seed=8, global_batch_size=2, train_samples=4, eval_batch_size=3,
        eval_samples=9,
    )  # fmt: skip
    counts = [int(math.ceil(9 * w * 1.005)) for w in (2 / 3, 1 / 3)]
    refs = [
        ref_index(np.arange(len(d), dtype=np.int32), d.sizes, n, 5, 8)
        for d, n in zip((a, b), counts, strict=True)
    ]
    which, within = ref_blend([2.0, 1.0], sum(len(r[2]) - 1 for r in refs))
    want = [ref_getitem((a, b)[which[g]], refs[which[g]], within[g]) for g in (6, 7, 8)]
    np.testing.assert_array_equal(_tokens(evals, 2), np.stack(want))
    assert os.path.isfile(index_files(index_base(a.prefix, "valid_0"),
                                      neox_order_key(counts[0], 5, 8))["doc"])  # fmt: skip


def ref_index_filenames(data_prefix, name, num_samples, seq_length, seed, allow_chopped):
    """GPT-NeoX's ``_build_index_mappings`` file names (packing_impl "packed")."""
    _filename = data_prefix + f"_{name}_indexmap" + f"_{num_samples}ns" + f"_{seq_length}sl"
    _filename += f"_{seed}s" + "_packedpi"
    if allow_chopped:
        _filename += "_ac"
    return {k: _filename + f"_{k}_idx.npy" for k in ("doc", "sample", "shuffle")}


@pytest.mark.parametrize("allow_chopped", [None, True, False])
def test_index_files_get_the_name_gpt_neox_reads_for_allow_chopped(tmp_path, allow_chopped):
    """A GPT-NeoX YAML's allow_chopped (default true) picks the file names GPT-NeoX's
    ``_build_index_mappings`` would look for; with pack_impl "packed" the arrays are the
    same for both settings (GPT-NeoX reads allow_chopped only in its other packings), and
    files under the other name are read, not rebuilt."""
    from configs import pretrain
    from neox_jax.neox_compat.config import translate
    from neox_jax.training.data import make_sources, resolve_tokenizer_and_paths

    ds = make_dataset(tmp_path / "pile", [9, 3, 40, 7, 12, 1, 30, 6, 5, 22])
    yaml = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 8,
            "pos_emb": "rotary", "train_iters": 5, "train_batch_size": 2,
            "data_path": ds.prefix, "split": "8,2"}  # fmt: skip
    if allow_chopped is not None:
        yaml["allow_chopped"] = allow_chopped
    overrides = translate(yaml).overrides
    chopped = True if allow_chopped is None else allow_chopped  # GPT-NeoX's default
    assert overrides["data.neox_allow_chopped"] is chopped
    config = pretrain.get_config("tiny")
    config.data.update(source="indexed", paths=ds.prefix, order="neox", neox_split="8,2",
                       seq_len=8, seed=3, global_batch_size=2, eval_batch_size=2,
                       neox_allow_chopped=chopped)  # fmt: skip
    config.train.update(steps=5, eval_every=100, eval_batches=0)
    _, paths = resolve_tokenizer_and_paths(config.data, tmp_path)
    train, _ = make_sources(config.data, paths, None, 2, config.train)
    bounds = ref_split("8,2", len(ds))
    ref = ref_index(np.arange(bounds[0], bounds[1], dtype=np.int32), ds.sizes, 10, 8, 3)
    theirs = ref_index_filenames(ds.prefix, "train", 10, 8, 3, chopped)
    other = ref_index_filenames(ds.prefix, "train", 10, 8, 3, not chopped)
    for kind, array in zip(("doc", "sample", "shuffle"), ref, strict=True):
        np.testing.assert_array_equal(np.load(theirs[kind]), array)
        assert not os.path.exists(other[kind])
    # GPT-NeoX's files under the other name (built with the other setting) are read.
    for kind in theirs:
        os.replace(theirs[kind], other[kind])
    again = NeoxDataset(ds, "train", np.arange(bounds[0], bounds[1]), 10, 8, 3,
                        allow_chopped=chopped)  # fmt: skip
    assert isinstance(again.doc_idx, np.memmap) and not os.path.exists(theirs["doc"])
    np.testing.assert_array_equal(again.sample_idx, ref[1])
    with pytest.raises(UserError, match="allow_chopped must be true or false"):
        translate({**yaml, "allow_chopped": "yes"})
    with pytest.raises(UserError, match="data.neox_allow_chopped must be true or false"):
        NeoxDataset(ds, "train", np.arange(bounds[0], bounds[1]), 10, 8, 3, allow_chopped=1)

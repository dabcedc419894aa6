"""Tests for packed, shuffled, host-sharded pretraining sources and blends."""

import numpy as np
import pytest

from neox_jax.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from neox_jax.data.pretrain_data import (
    BlendedSource,
    PretrainSource,
    blend_schedule,
    document_order,
    split_documents,
)
from neox_jax.data.tfds_source import TfdsSource

EOS = 0
L = 7  # seq_len: windows of 8 tokens


def _make_docs(n, seed=0, base=1):
    """Document d is its marker ``base + d`` repeated, then EOS; doc 5 is empty."""
    rng = np.random.default_rng(seed)
    docs = [np.array([base + d] * int(rng.integers(0, 20)) + [EOS]) for d in range(n)]
    docs[5] = np.zeros(0, np.int64)
    return docs


def _build(path, docs):
    with IndexedDatasetBuilder(str(path), np.uint16) as b:
        for d in docs:
            b.add_document(d)
    return IndexedDataset(str(path))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = _make_docs(40)
    return docs, _build(tmp_path_factory.mktemp("data") / "ds", docs)


def _stream(docs, seed, epochs, shuffle=True):
    ids = np.arange(len(docs))
    return np.concatenate(
        [docs[j] for e in range(epochs) for j in document_order(ids, seed, e, shuffle)]
    )


def _check_covers(windows, stream):
    """Windows minus the shared overlap token are exactly a prefix of the stream."""
    for a, b in zip(windows, windows[1:], strict=False):
        assert a[-1] == b[0]
    flat = np.concatenate([w[:-1] for w in windows] + [windows[-1][-1:]])
    np.testing.assert_array_equal(flat, stream[: len(flat)])


@pytest.mark.parametrize("shuffle", [False, True])
def test_windows_cover_the_shuffled_stream_exactly(corpus, shuffle):
    docs, ds = corpus
    src = PretrainSource(ds, L, 4, seed=3, shuffle=shuffle)
    n = 3 * src.samples_per_epoch + 5  # spans four epochs
    windows = [src.window(i)["tokens"] for i in range(n)]
    assert all(w.shape == (L + 1,) and w.dtype == np.int32 for w in windows)
    _check_covers(windows, _stream(docs, 3, 5, shuffle))


def test_document_order_is_a_per_epoch_permutation():
    ids = np.arange(50)
    orders = [document_order(ids, 7, e) for e in range(3)]
    for o in orders:
        np.testing.assert_array_equal(np.sort(o), ids)
    assert not np.array_equal(orders[0], orders[1])
    np.testing.assert_array_equal(document_order(ids, 7, 1), orders[1])
    assert not np.array_equal(document_order(ids, 8, 1), orders[1])


def test_sample_shuffle_is_a_blockwise_bijection(corpus):
    src = PretrainSource(corpus[1], L, 4, seed=1)
    s = src.samples_per_epoch
    idx = src.stream_index(np.arange(3 * s))
    np.testing.assert_array_equal(np.sort(idx), np.arange(3 * s))
    assert np.all(idx // s == np.arange(3 * s) // s)  # block b maps onto itself
    assert not np.array_equal(idx, np.arange(3 * s))


def test_batch_rows_are_the_shuffled_windows(corpus):
    src = PretrainSource(corpus[1], L, 6, seed=2)
    batch = src.global_batch(3)["tokens"]
    assert batch.shape == (6, L + 1) and batch.dtype == np.int32
    for row, g in zip(batch, range(18, 24), strict=True):
        np.testing.assert_array_equal(row, src.window(src.stream_index([g])[0])["tokens"])


def test_batches_are_a_pure_function_of_seed_and_step(corpus):
    ds = corpus[1]
    a = PretrainSource(ds, L, 8, seed=5)
    seen = {s: a.global_batch(s)["tokens"] for s in range(30)}
    # A fresh source (as after a restart) asked for steps out of order agrees.
    b = PretrainSource(ds, L, 8, seed=5)
    for s in (29, 3, 17, 0):
        np.testing.assert_array_equal(b.global_batch(s)["tokens"], seen[s])
    c = PretrainSource(ds, L, 8, seed=6)
    assert not np.array_equal(c.global_batch(3)["tokens"], seen[3])
    assert not np.array_equal(seen[0], seen[1])


@pytest.mark.parametrize("reset_at_eod", [False, True])
def test_host_batches_partition_the_global_batch(corpus, reset_at_eod):
    src = PretrainSource(corpus[1], L, 8, seed=4, reset_at_eod=reset_at_eod)
    for step in (0, 11):
        full = src.global_batch(step)
        for p_count in (1, 2, 4):
            parts = [src.host_batch(step, p, p_count) for p in range(p_count)]
            assert set(parts[0]) == set(full)
            for key in full:
                assert parts[0][key].shape[0] == 8 // p_count
                np.testing.assert_array_equal(np.concatenate([x[key] for x in parts]), full[key])
    with pytest.raises(ValueError, match="not divisible"):
        src.host_batch(0, 0, 3)
    with pytest.raises(ValueError, match="process_index"):
        src.host_batch(0, 2, 2)


def test_reset_at_eod_segments_and_positions(corpus):
    ds = corpus[1]
    plain = PretrainSource(ds, L, 16, seed=9).global_batch(2)
    out = PretrainSource(ds, L, 16, seed=9, reset_at_eod=True).global_batch(2)
    np.testing.assert_array_equal(out["tokens"], plain["tokens"])
    tok, seg, pos = out["tokens"], out["segment_ids"], out["positions"]
    assert seg.dtype == pos.dtype == np.int32 and seg.shape == tok.shape
    assert np.all(seg[:, 0] == 1) and np.all(pos[:, 0] == 0)
    starts = np.diff(seg, axis=1) == 1
    assert np.all(starts | (np.diff(seg, axis=1) == 0))
    # Every document ends with EOS, so a new segment starts right after an EOS ...
    np.testing.assert_array_equal(starts, tok[:, :-1] == EOS)
    # ... and positions restart there and count up otherwise.
    np.testing.assert_array_equal(pos[:, 1:], np.where(starts, 0, pos[:, :-1] + 1))
    assert starts.any()


def test_many_epochs_far_ahead(corpus):
    docs, ds = corpus
    src = PretrainSource(ds, L, 4, seed=0)
    step = 50 * src.samples_per_epoch // 4  # about epoch 50
    tokens = src.global_batch(step)["tokens"]
    assert set(np.unique(tokens)) <= {EOS} | set(range(1, len(docs) + 1))


def _markers(tokens):
    return set(np.unique(tokens).tolist()) - {EOS}


def test_eval_split_holds_out_whole_documents(corpus):
    docs, ds = corpus
    train = split_documents(ds, "train", 0.2)
    evals = split_documents(ds, "eval", 0.2)
    assert len(evals) == 8 and len(train) == 32
    assert set(train).isdisjoint(evals)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, evals])), np.arange(40))
    np.testing.assert_array_equal(split_documents(ds, "eval", 0.2), evals)  # deterministic
    np.testing.assert_array_equal(split_documents(ds, "all", 0.2), np.arange(40))
    eval_src = PretrainSource(ds, L, 4, seed=1, split="eval", eval_fraction=0.2)
    other_seed = PretrainSource(ds, L, 4, seed=2, split="eval", eval_fraction=0.2)
    np.testing.assert_array_equal(eval_src.docs, other_seed.docs)  # split ignores the seed
    train_src = PretrainSource(ds, L, 4, seed=1, split="train", eval_fraction=0.2)
    seen_eval = set().union(*(_markers(eval_src.global_batch(s)["tokens"]) for s in range(20)))
    seen_train = set().union(*(_markers(train_src.global_batch(s)["tokens"]) for s in range(40)))
    assert seen_eval <= {int(d) + 1 for d in evals}
    assert seen_train <= {int(d) + 1 for d in train}
    with pytest.raises(ValueError, match="eval_fraction > 0"):
        PretrainSource(ds, L, 4, split="eval")


def test_split_keeps_multi_sequence_documents_together(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "m"), np.uint16) as b:
        for d in range(10):
            b.add_item([d + 1] * 3)
            b.add_item([d + 1, EOS])
            b.end_document()
    ds = IndexedDataset(str(tmp_path / "m"))
    evals = split_documents(ds, "eval", 0.3)
    assert len(evals) == 6
    np.testing.assert_array_equal(evals[::2] + 1, evals[1::2])  # pairs (2d, 2d+1)
    assert np.all(evals[::2] % 2 == 0)


@pytest.mark.parametrize(
    "weights", [[0.5, 0.5], [0.7, 0.2, 0.1], [1, 1, 1, 1, 1, 1, 1, 3], [0.999, 0.001]]
)
def test_blend_schedule_is_within_one_sample_on_every_prefix(weights):
    n = 4000
    source, counts = blend_schedule(weights, n)
    w = np.asarray(weights, float) / np.sum(weights)
    prefix_counts = np.cumsum(np.eye(len(w))[source], axis=0)
    exact = np.arange(1, n + 1)[:, None] * w[None]
    assert np.abs(prefix_counts - exact).max() < 1.0
    assert counts == prefix_counts[-1].astype(int).tolist()
    # Continuing from saved counts gives the same schedule as one long run.
    a, c = blend_schedule(weights, 1000)
    b, _ = blend_schedule(weights, 3000, c)
    np.testing.assert_array_equal(np.concatenate([a, b]), source)


def test_blended_source(tmp_path, corpus):
    docs_a, ds_a = corpus
    ds_b = _build(tmp_path / "b", _make_docs(30, seed=1, base=100))
    a = PretrainSource(ds_a, L, 10, seed=1)
    b = PretrainSource(ds_b, L, 10, seed=2)
    blend = BlendedSource([a, b], [0.7, 0.3])
    # Small chunks exercise the chunked schedule bookkeeping.
    blend._CHUNK = 16
    batch = blend.global_batch(5)["tokens"]
    src, within = blend.assignment(np.arange(50, 60))
    for row, k, c in zip(batch, src, within, strict=True):
        np.testing.assert_array_equal(row, [a, b][k].samples([c])["tokens"][0])
    # Source membership: dataset b's markers are >= 100.
    from_b = np.array([_markers(r) and min(_markers(r)) >= 100 for r in batch])
    np.testing.assert_array_equal(from_b, src == 1)
    # Within-source indices count each source's earlier samples.
    all_src, all_within = blend.assignment(np.arange(200))
    for k in (0, 1):
        np.testing.assert_array_equal(all_within[all_src == k], np.arange(np.sum(all_src == k)))
    assert abs(np.sum(all_src == 0) - 140) < 1
    # Deterministic and host-count independent, also for a fresh instance.
    fresh = BlendedSource(
        [PretrainSource(ds_a, L, 10, seed=1), PretrainSource(ds_b, L, 10, seed=2)], [0.7, 0.3]
    )
    np.testing.assert_array_equal(fresh.global_batch(5)["tokens"], batch)
    parts = [fresh.host_batch(5, p, 5)["tokens"] for p in range(5)]
    np.testing.assert_array_equal(np.concatenate(parts), batch)
    with pytest.raises(ValueError, match="positive"):
        BlendedSource([a, b], [1.0, 0.0])
    with pytest.raises(ValueError, match="seq_len"):
        BlendedSource([a, PretrainSource(ds_b, L + 1, 10)], [1, 1])


# ---------------------------------------------------------------- tfds source


class CharTokenizer:
    eos_id = EOS
    vocab_size = 258

    def encode(self, text):
        return [b + 2 for b in text.encode("utf-8")]


def _tokenized(texts):
    tok = CharTokenizer()
    return [np.array(tok.encode(t) + [EOS] if t else [], np.int64) for t in texts]


def test_tfds_source_packing_with_in_memory_source():
    texts = [f"doc{i}" * (i % 4) for i in range(13)]  # includes empty documents
    fake = [{"text": t.encode()} for t in texts]  # tfds yields bytes for Text features
    src = TfdsSource(fake, CharTokenizer(), L, 4, seed=3)
    docs = _tokenized(texts)
    n = 40
    windows = [src.window(i)["tokens"] for i in range(n)]
    _check_covers(windows, _stream(docs, 3, 10))
    assert src.tokens_per_epoch == sum(len(d) for d in docs)
    # Pure function of (seed, step): a fresh source asked for a late step agrees.
    late = TfdsSource(fake, CharTokenizer(), L, 4, seed=3, cache_docs=2).global_batch(9)
    np.testing.assert_array_equal(late["tokens"], np.stack(windows[36:40]))
    full = src.global_batch(2)["tokens"]
    halves = [src.host_batch(2, p, 2)["tokens"] for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), full)
    seg = TfdsSource(fake, CharTokenizer(), L, 4, seed=3, reset_at_eod=True).global_batch(2)
    np.testing.assert_array_equal(seg["tokens"], full)


def test_tfds_source_from_a_local_array_record_dataset(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    texts = [f"tiny doc {i} " * (i % 3 + 1) for i in range(9)]

    with tfds.core.registered.skip_registration():

        class NeoxJaxTinyText(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
                return tfds.core.DatasetInfo(builder=self, features=features)

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i, t in enumerate(texts):
                    yield i, {"text": t}

    builder = NeoxJaxTinyText(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    # Read back by name through tfds.data_source, as a user would.
    src = TfdsSource("neox_jax_tiny_text", CharTokenizer(), L, 4, data_dir=str(tmp_path), seed=1)
    stored = [r["text"].decode() for r in builder.as_data_source(split="train")]
    assert sorted(stored) == sorted(texts)  # tfds stores records in its own order
    windows = [src.window(i)["tokens"] for i in range(60)]
    _check_covers(windows, _stream(_tokenized(stored), 1, 12))
    parts = [src.host_batch(3, p, 4)["tokens"] for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), src.global_batch(3)["tokens"])

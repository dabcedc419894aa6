"""Embeddings: parity with transformers' hidden states, pooling, batching, bad input.

The reference is ``GPTNeoXForCausalLM(..., output_hidden_states=True).hidden_states[L]``
on a right-padded batch with its attention mask, pooled in numpy over the real tokens.
Both sides compute the same fp32 network with different kernels, so states differ by
accumulated round-off (~1e-6 of their O(1) scale for this tiny model); 1e-5 of the
largest pooled value leaves headroom while any indexing or masking error (a wrong
layer, a padded token pooled) moves values by O(0.1).
"""

import numpy as np
import pytest
import torch
from helpers.evaluation import tiny_model

from neox_jax.retrieval import Embedder, pool, resolve_layer
from neox_jax.retrieval import embed as embed_module

LENGTHS = (3, 9, 14, 6, 11)  # one length bucket (16), padded rows in every batch


def _sequences(vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, n).tolist() for n in LENGTHS]


def _hf_pooled(ref, seqs, layer, pooling, normalize):
    width = max(map(len, seqs))
    ids = np.zeros((len(seqs), width), np.int64)
    mask = np.zeros((len(seqs), width), np.int64)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], mask[r, : len(s)] = s, 1
    with torch.no_grad():
        out = ref(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    states = out.hidden_states[layer].numpy().astype(np.float64)  # [B, T, E]
    rows = []
    for r, s in enumerate(seqs):
        real = states[r, : len(s)]
        v = {"mean": real.mean(0), "last": real[-1], "max": real.max(0)}[pooling]
        rows.append(v / np.linalg.norm(v) if normalize else v)
    return np.stack(rows)


@pytest.mark.parametrize(
    "layer,pooling,normalize",
    [(0, "mean", False), (1, "last", False), (-1, "max", True), (-2, "mean", True)],
)
def test_matches_transformers_hidden_states(layer, pooling, normalize):
    _, ref, config, params, tok = tiny_model()
    seqs = _sequences(tok.vocab_size)
    # batch_size 4 < 5 inputs: two batches, the second mostly padding rows.
    embedder = Embedder(
        config, params, tok, layer=layer, pooling=pooling, normalize=normalize, batch_size=4
    )
    ours = embedder.embed_ids(seqs)
    expected = _hf_pooled(ref, seqs, layer, pooling, normalize)
    assert ours.shape == (len(seqs), config.hidden_size) and ours.dtype == np.float32
    err = np.abs(ours - expected).max()
    assert err <= 1e-5 * np.abs(expected).max(), err


def test_text_api_and_batch_invariance():
    _, _, config, params, tok = tiny_model()
    texts = ["alpha beta gamma", "river mountain forest ocean and more", "token"]
    embedder = Embedder(config, params, tok, batch_size=2)
    together = embedder.embed(texts)
    alone = np.concatenate([embedder.embed([t]) for t in texts])
    # Padding rows and bucket changes must not leak into real rows: fp32 round-off only.
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_one_compile_per_length_bucket():
    _, _, config, params, tok = tiny_model()
    embedder = Embedder(config, params, tok, layer=1, pooling="mean", batch_size=4)
    rng = np.random.default_rng(3)
    embedder.embed_ids([rng.integers(2, 50, 10).tolist() for _ in range(4)])
    before = embed_module._embed._cache_size()
    for n in (5, 7, 12, 16):  # new batches, same bucket (16) and batch width: no compile
        embedder.embed_ids([rng.integers(2, 50, n).tolist() for _ in range(4)])
    assert embed_module._embed._cache_size() == before


def test_pool_handles_empty_rows():
    hidden = np.ones((2, 3, 4), np.float32)
    mask = np.array([[1, 1, 0], [0, 0, 0]])
    for method in ("mean", "last", "max"):
        out = np.asarray(pool(hidden, mask, method))
        assert np.isfinite(out).all() and (out[1] == 0).all() == (method != "last")


def test_resolve_layer():
    _, _, config, _, _ = tiny_model()  # 2 layers: hidden states 0, 1, 2
    assert [resolve_layer(config, i) for i in (0, 2, -1, -3)] == [0, 2, 2, 0]
    for bad in (3, -4, 100):
        with pytest.raises(ValueError, match="out of range for a model with 2 layers"):
            resolve_layer(config, bad)
    with pytest.raises(ValueError, match="out of range"):
        Embedder(config, tiny_model()[3], layer=5)


def test_bad_inputs():
    _, _, config, params, tok = tiny_model()
    embedder = Embedder(config, params, tok, max_length=8)
    with pytest.raises(ValueError, match="input 1 is empty"):
        embedder.embed_ids([[5, 6], []])
    with pytest.raises(ValueError, match="more than max_length=8"):
        embedder.embed_ids([list(range(2, 20))])
    truncated = Embedder(config, params, tok, max_length=8, truncate=True)
    np.testing.assert_allclose(
        truncated.embed_ids([list(range(2, 20))]),
        truncated.embed_ids([list(range(2, 10))]),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="Unknown pooling"):
        Embedder(config, params, tok, pooling="median")
    with pytest.raises(TypeError, match="list of texts"):
        embedder.embed("one string")

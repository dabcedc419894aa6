"""``kernels.causal_split``: causal self-attention in two query blocks against
``reference.attention`` (the same mask over the whole sequence), values and gradients,
with packed documents and padding (queries with no key to attend) in both halves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax.kernels import causal_split, reference
from neox_jax.model import GPTNeoX, ModelConfig, init_params

SEGMENTS = np.array(
    [
        [1, 1, 1, 2, 2, 2, 2, 2, 3, 3],  # packed documents
        [0, 0, 0, 1, 1, 1, 1, 1, 1, 0],  # left and right padding: empty rows in both halves
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    ],
    np.int32,
)


def test_values_and_gradients_equal_the_reference():
    rng = np.random.default_rng(0)
    b, t, h, d = 3, 10, 4, 8
    q, k, v, ct = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(4))
    seg = jnp.asarray(SEGMENTS)

    def split(q, k, v):
        return jnp.sum(causal_split.causal_split_attention(q, k, v, seg) * ct)

    def ref(q, k, v):
        return jnp.sum(reference.segment_attention(q, k, v, seg) * ct)

    np.testing.assert_allclose(  # padding rows included: the uniform fallback
        causal_split.causal_split_attention(q, k, v, seg),
        reference.segment_attention(q, k, v, seg),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    got = jax.grad(split, argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(ref, argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):  # fp32, only the summation order differs
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_split_applies_to_long_even_self_attention_only():
    assert causal_split.split_applies(512, 512) and causal_split.split_applies(1024, 1024)
    assert not causal_split.split_applies(513, 513)  # odd
    assert not causal_split.split_applies(256, 256)  # short: the reference whole
    assert not causal_split.split_applies(512, 1024)  # not self-attention


@pytest.mark.parametrize("parallel", [True, False])
def test_model_logits_and_gradients_unchanged(monkeypatch, parallel):
    """The model through the split path (short sequences allowed) against the reference."""
    cfg = ModelConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, use_parallel_residual=parallel,
    )  # fmt: skip
    params = init_params(cfg, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (3, 10)), jnp.int32)
    seg = jnp.asarray(SEGMENTS)

    def run(p):
        logits = GPTNeoX(cfg).apply({"params": p}, ids, segment_ids=seg)
        return jnp.sum(jnp.where(seg[..., None] > 0, logits, 0.0) ** 2), logits

    want = jax.jit(jax.value_and_grad(run, has_aux=True))(params)
    monkeypatch.setattr(causal_split, "MIN_LENGTH", 4)
    got = jax.jit(jax.value_and_grad(run, has_aux=True))(params)
    np.testing.assert_allclose(got[0][1], want[0][1], rtol=1e-5, atol=1e-5)  # all positions
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        # fp32 summation order through two layers: round-off relative to each leaf's scale.
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(w))))

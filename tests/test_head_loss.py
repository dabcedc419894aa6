"""The fused output layer + cross entropy (``training.loss``) against plain autodiff.

Reference: the model's own logits (``GPTNeoX.apply``) through ``step.token_losses``,
differentiated by ``jax.grad`` - the path the train step took before the fused head.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax.model import GPTNeoX, ModelConfig, init_params
from neox_jax.training import loss as loss_lib
from neox_jax.training import step as step_lib
from neox_jax.training.loss import (
    OutputHead,
    chunk_bounds,
    head_logits,
    head_loss,
    output_head,
)

SMALL = dict(
    vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=64, max_position_embeddings=64,
)  # fmt: skip


def _batch(config, rng, b=3, t=9):
    tokens = rng.integers(0, config.vocab_size, (b, t + 1)).astype(np.int32)
    mask = (rng.random((b, t + 1)) > 0.3).astype(np.int32)  # a loss mask with holes
    return {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}


def _logits_apply_fn(config):
    model = GPTNeoX(config)
    return lambda p, f, x, pos, seg, r: model.apply({"params": p}, x, pos, seg)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk_tokens", [512, 3])  # one chunk; 5 of up to 2 positions
def test_fused_head_loss_and_grads_equal_autodiff(tied, chunk_tokens, monkeypatch):
    monkeypatch.setattr(loss_lib, "CHUNK_TOKENS", chunk_tokens)  # what the step uses
    config = ModelConfig(**SMALL, tie_word_embeddings=tied)
    params = init_params(config, jax.random.key(0))
    batch = _batch(config, np.random.default_rng(0))
    key = jax.random.key(1)
    ref = step_lib.loss_and_grads(params, None, batch, key, _logits_apply_fn(config))
    got = step_lib.loss_and_grads(params, None, batch, key, step_lib.model_apply_fn(config))
    # fp32 with different summation order: agreement to ~1e-6 relative; 1e-5 leaves
    # room for the accumulation over 27 tokens and 97 classes, and catches any wrong term.
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    assert float(got[1]) == float(ref[1])
    for g, r in zip(jax.tree.leaves(got[2]), jax.tree.leaves(ref[2]), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_head_loss_cotangents_scale_and_weights():
    """A non-unit cotangent scales every gradient; the weights' gradient is the loss."""
    config = ModelConfig(**SMALL)
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(2)
    states = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 97, (2, 5)), jnp.int32)
    weights = jnp.asarray(rng.random((2, 5)), jnp.float32)

    def fused(s, k, w):
        return 3.0 * head_loss(output_head(config, {"embed_out": {"kernel": k}}, s), targets, w)

    def plain(s, k, w):
        logits = jnp.einsum("bte,ev->btv", s, k)
        return 3.0 * jnp.sum(step_lib.token_losses(logits, targets) * w)

    kernel = params["embed_out"]["kernel"]
    got = jax.grad(fused, argnums=(0, 1, 2))(states, kernel, weights)
    ref = jax.grad(plain, argnums=(0, 1, 2))(states, kernel, weights)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)  # fp32 round-off
    np.testing.assert_allclose(fused(states, kernel, weights), plain(states, kernel, weights),
                               rtol=1e-6)  # fmt: skip


def test_model_states_project_to_its_logits():
    """``compute_logits=False`` returns the states whose projection is the model's logits."""
    config = ModelConfig(**SMALL)
    params = init_params(config, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 97, (2, 7)), jnp.int32)
    model = GPTNeoX(config)
    states = model.apply({"params": params}, ids, compute_logits=False)
    logits = model.apply({"params": params}, ids)
    np.testing.assert_array_equal(head_logits(output_head(config, params, states)), logits)


def test_chunk_bounds_cover_every_position_once():
    cases = [(3, 9, 6), (3, 9, 3), (8, 256, 512), (8, 512, 512), (2, 5, 100), (4, 7, 0)]
    for batch, length, chunk in cases + [(1024, 2048, 512)]:
        bounds = chunk_bounds(batch, length, chunk)
        assert bounds[0][0] == 0 and bounds[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        assert all(lo < hi for lo, hi in bounds)
    assert chunk_bounds(8, 256, 512) == ((0, 64), (64, 128), (128, 192), (192, 256))
    assert chunk_bounds(8, 512, 512) == tuple((lo, lo + 64) for lo in range(0, 512, 64))
    assert chunk_bounds(3, 9, 3) == ((0, 2), (2, 4), (4, 6), (6, 8), (8, 9))  # last shorter
    assert len(chunk_bounds(1024, 2048, 512)) == 8  # at most MAX_CHUNKS
    assert chunk_bounds(2, 5, 100) == ((0, 5),)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk_tokens", [0, 3, 6])
def test_chunked_head_loss_equals_plain_autodiff(tied, chunk_tokens):
    """Chunks of 2 or 3 positions (3 rows each; with 3 tokens the last chunk is shorter)
    or none give the loss and gradients of plain autodiff through the full logits."""
    rng = np.random.default_rng(4)
    b, t, e, v = 3, 9, 16, 97
    states = jnp.asarray(rng.standard_normal((b, t, e)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((v, e) if tied else (e, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    weights = jnp.asarray(rng.random((b, t)) * (rng.random((b, t)) > 0.3), jnp.float32)

    def chunked(s, k, w):
        head = OutputHead(s, k, tied=tied)
        return 0.5 * head_loss(head, targets, w, chunk_tokens=chunk_tokens)

    def plain(s, k, w):
        logits = jnp.einsum("bte,ve->btv" if tied else "bte,ev->btv", s, k)
        return 0.5 * jnp.sum(step_lib.token_losses(logits, targets) * w)

    got = jax.value_and_grad(chunked, argnums=(0, 1, 2))(states, kernel, weights)
    ref = jax.value_and_grad(plain, argnums=(0, 1, 2))(states, kernel, weights)
    # fp32, only the summation order differs (dW is a sum over chunks): round-off.
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    for g, r in zip(got[1], ref[1], strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunked(states, kernel, weights), ref[0], rtol=1e-6)  # primal


@pytest.mark.parametrize("scale", [1.0, 300.0])  # 300: exp of an unshifted logit overflows
def test_losses_and_dlogits_match_float64_closed_form(scale):
    """The head's per-token losses and logits gradient (one exponential per logit) against
    ``log sum exp(l) - l[target]`` and ``w * (softmax(l) - one_hot)`` in float64, also
    where unshifted exponentials would overflow fp32 (logits in the hundreds)."""
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((2, 3, 50)) * scale
    targets = rng.integers(0, 50, (2, 3))
    weights = rng.random((2, 3))
    losses, dlogits = loss_lib._losses_and_dlogits(
        jnp.asarray(logits, jnp.float32), jnp.asarray(targets, jnp.int32),
        jnp.asarray(weights, jnp.float32),
    )  # fmt: skip
    peak = logits.max(-1, keepdims=True)
    probs = np.exp(logits - peak) / np.exp(logits - peak).sum(-1, keepdims=True)
    log_z = np.log(np.exp(logits - peak).sum(-1)) + peak[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    one_hot = np.eye(50)[targets]
    # fp32 inputs rounded from float64 (relative 6e-8 of |logit|, here up to ~1000):
    # the loss is a difference of two such numbers, so its error scales with the logits.
    np.testing.assert_allclose(losses, log_z - picked, rtol=1e-5, atol=1e-6 * scale)
    # A probability moves by at most ~p(1 - p) * 2 * delta <= delta / 2 for logits rounded
    # by delta (<= 6e-5 at |logit| ~ 1000): 3e-5 absolute.
    np.testing.assert_allclose(dlogits, weights[..., None] * (probs - one_hot), atol=3e-5)

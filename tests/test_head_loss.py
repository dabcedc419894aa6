"""The fused output layer + cross entropy (``training.loss``) against plain autodiff.

Reference: the model's own logits (``GPTNeoX.apply``) through ``step.token_losses``,
differentiated by ``jax.grad`` - the path the train step took before the fused head.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax.model import GPTNeoX, ModelConfig, init_params
from neox_jax.training import step as step_lib
from neox_jax.training.loss import head_logits, head_loss, output_head

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
def test_fused_head_loss_and_grads_equal_autodiff(tied):
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

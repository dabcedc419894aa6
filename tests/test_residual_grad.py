"""``model.residual.materialized_grad``: the identity whose gradient XLA:CPU writes once.

Reference: the same function without it, differentiated by ``jax.grad``; the identity
product multiplies by exact ones and zeros, so finite gradients must match bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax.model.residual import materialized_grad


def _loss(x, w):
    # x has several consumers (as the residual stream): the sum of their gradients is
    # what the identity product materialises.
    h = jnp.tanh(x @ w)
    return jnp.sum(h * x) + jnp.sum(jnp.sin(x) ** 2) + jnp.sum(x[:, ::-1] * 0.5)


@pytest.mark.parametrize("shape", [(2, 3, 128), (2, 3, 24)])  # groups of 64; of gcd 8
def test_gradient_is_bit_for_bit_the_plain_one(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((shape[-1], shape[-1])) / 8, jnp.float32)
    got = jax.jit(jax.grad(lambda x: _loss(materialized_grad(x), w)))(x)
    ref = jax.jit(jax.grad(lambda x: _loss(x, w)))(x)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(materialized_grad(x), x)  # the forward is the identity


def test_identity_product_only_on_cpu():
    """The CPU program gets the product; a CUDA lowering of the same function does not."""
    x = jnp.ones((2, 4, 64), jnp.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(materialized_grad(x)))))
    assert "dot_general" in grad.lower(x).as_text()
    cuda = grad.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "dot_general" not in cuda

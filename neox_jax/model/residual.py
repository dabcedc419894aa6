"""The residual stream's gradient, materialised once per layer on CPU.

In the backward pass of an unrolled layer stack the gradient of the residual stream is
a growing sum (every later layer adds its branches' gradients). XLA:CPU's fusion treats
adds as free to recompute, so instead of writing each layer's sum once it fuses the
whole chain into every consumer: the weight-gradient transposes of layer ``l`` re-add
the terms of all layers above it (``experiments/train_bench``: 218 ms of a 3.3 s
pythia-70m step, operands growing by three ``[B*T, E]`` arrays per layer). Barriers do
not stop it (XLA:CPU removes ``optimization_barrier`` before fusion, and folds a
division by a runtime one into a multiply it again recomputes).

A dot is never fused into its consumers, so ``materialized_grad`` passes the cotangent
through a product with an identity matrix on ``G`` elements at a time (``[N*E/G, G] x
[G, G]``: ``2 G`` FLOPs and one read and write per element). Every output is ``g * 1``
plus products with exact zeros, so finite gradients come out bit for bit (a non-finite
element turns its group of ``G`` into NaN: such a step is non-finite either way). On
other platforms (``lax.platform_dependent``, decided when the program is lowered) the
cotangent passes unchanged. A ``custom_vjp``: forward-mode differentiation (``jax.jvp``)
of an unrolled stack is not supported (nothing here uses it; the scanned stack has no
such wrapper).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

# Elements per identity product: small enough to cost nothing, a real matrix product.
GROUP = 64


@jax.custom_vjp
def materialized_grad(x: jax.Array) -> jax.Array:
    """The identity; its gradient is written once instead of recomputed by each user."""
    return x


def _fwd(x):
    return x, None


def _identity_product(g: jax.Array) -> jax.Array:
    group = math.gcd(g.shape[-1], GROUP)
    eye = jnp.eye(group, dtype=g.dtype)
    flat = g.reshape(-1, group)  # [N * E / G, G]
    return jnp.dot(flat, eye, preferred_element_type=g.dtype).reshape(g.shape)


def _bwd(_, g):
    return (lax.platform_dependent(g, cpu=_identity_product, default=lambda g: g),)


materialized_grad.defvjp(_fwd, _bwd)

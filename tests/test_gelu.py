"""The training step's faster formulations against plain references:
``layers.erf_gelu`` against the erf of Python's ``math`` in float64 and against
``jax.nn.gelu(approximate=False)`` (values and derivative, reverse and forward mode)."""

import math

import jax
import numpy as np

from neox_jax.model.layers import erf_gelu


def test_erf_gelu_values_and_derivative():
    x = np.linspace(-9.0, 9.0, 2001).astype(np.float32)
    exact = np.array([v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.astype(np.float64)])
    got = np.asarray(jax.jit(erf_gelu)(x))
    # fp32 round-off of a value of size |x| (plus XLA's erf polynomial, ~1 ulp): 2e-6
    # absolute over [-9, 9]. Below about -5.8 fp32 rounds 1 + erf to 0, as torch does.
    np.testing.assert_allclose(got, exact, rtol=0, atol=2e-6)
    np.testing.assert_allclose(got, jax.nn.gelu(x, approximate=False), rtol=0, atol=2e-6)
    d_exact = np.array(
        [0.5 * (1 + math.erf(v / math.sqrt(2))) + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi)
         for v in x.astype(np.float64)]
    )  # fmt: skip
    d_got = np.asarray(jax.jit(jax.vmap(jax.grad(erf_gelu)))(x))
    np.testing.assert_allclose(d_got, d_exact, rtol=0, atol=2e-6)
    # forward mode (custom_jvp) gives the same derivative
    _, tangent = jax.jvp(erf_gelu, (x,), (np.ones_like(x),))
    np.testing.assert_allclose(tangent, d_got, rtol=0, atol=1e-6)  # fp32 round-off

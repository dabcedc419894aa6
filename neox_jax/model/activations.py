"""Activation functions by the names configs use, and GELU in torch's erf form."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


# ---------------------------------------------------------------- activations
def activation(name: str):
    """The activation ``name`` exactly as transformers' ``ACT2FN`` defines it."""
    sqrt_2_over_pi = math.sqrt(2.0 / math.pi)

    def tanh_gelu(x):  # gelu_new / gelu_pytorch_tanh / gelu_python_tanh / gelu_accurate
        return 0.5 * x * (1.0 + jnp.tanh(sqrt_2_over_pi * (x + 0.044715 * x**3)))

    def fast_gelu(x):  # transformers' FastGELUActivation writes the constant out
        return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))

    table = {
        "gelu": erf_gelu,
        "gelu_python": erf_gelu,
        "gelu_new": tanh_gelu,
        "gelu_pytorch_tanh": tanh_gelu,
        "gelu_python_tanh": tanh_gelu,
        "gelu_accurate": tanh_gelu,
        "gelu_fast": fast_gelu,
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
    }
    if name not in table:
        raise ValueError(f"Unknown hidden_act {name!r}; supported: {', '.join(table)}.")
    return table[name]


@jax.custom_jvp
def erf_gelu(x: Array) -> Array:
    """The exact GELU as torch computes it, ``0.5 x (1 + erf(x / sqrt 2))``.

    ``jax.nn.gelu(approximate=False)`` writes it with ``erfc``, which XLA:CPU expands
    into several branches of polynomials and an ``exp`` per element, and autodiff then
    keeps ``exp(-x^2 / 2)`` and ``erfc`` apart: on CPU the MLP's GELU cost 5x torch's
    (``experiments/train_bench``). ``erf`` is one vectorised polynomial, and the
    derivative below is one fusion. Same values to fp32 round-off (tested against
    ``jax.nn.gelu``); like torch, it rounds to exactly 0 below about -5.8.
    """
    return x * _normal_cdf(x)


def _normal_cdf(x):
    return (0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))).astype(x.dtype)


@erf_gelu.defjvp
def _erf_gelu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    cdf = _normal_cdf(x)
    # d/dx x Phi(x) = Phi(x) + x phi(x), with phi the standard normal density.
    pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return x * cdf, t * (cdf + x * pdf).astype(x.dtype)

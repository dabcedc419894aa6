"""Scoring a prompt's own tokens (``echo`` with ``logprobs``) for the serving engine:
one jitted forward over a bucketed prompt, beside the decode slots (``slots.py``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from neox_jax.inference import step
from neox_jax.model import ModelConfig

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("config", "k", "pipeline"))
def score(config: ModelConfig, params, tokens: Array, *, k: int, pipeline: bool = False):
    """Log-probabilities of a right-padded prompt's own tokens (``echo`` with ``logprobs``).

    Args:
      tokens: ``[P]`` int32 (padding after the prompt is harmless: causal attention).
      k: alternatives per position (static, >= 1).
      pipeline: as ``prefill``.

    Returns:
      ``(logprob [P - 1], top_logprobs [P - 1, k], top_ids [P - 1, k])``: entry ``i`` is
      about token ``i + 1`` given the tokens before it.
    """
    plen = tokens.shape[0]
    cols = jnp.arange(plen, dtype=jnp.int32)[None]
    logits, _ = step.forward(
        config,
        params,
        tokens[None],
        cols,
        jnp.ones((1, plen), jnp.int32),
        step.layer_cache(config, 1, plen, stacked=pipeline),
        all_logits=True,
        pipeline=int(pipeline),
    )
    logprobs = jax.nn.log_softmax(logits[0, :-1], axis=-1)  # [P - 1, V]
    chosen = jnp.take_along_axis(logprobs, tokens[1:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, k)
    return chosen, top_logprobs, top_ids.astype(jnp.int32)

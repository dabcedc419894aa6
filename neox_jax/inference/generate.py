"""Generation with a preallocated KV cache: prefill, then a jitted decode loop."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.model import GPTNeoX, ModelConfig, init_cache


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "cache_len"))
def _greedy(config, params, prompt, *, max_new_tokens, cache_len):
    model = GPTNeoX(config)
    batch, _ = prompt.shape
    out = model.apply({"params": params}, prompt, cache=init_cache(config, batch, cache_len))
    first = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
    tokens = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)

    def step(i, carry):
        tokens, cache = carry
        prev = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)
        out = model.apply({"params": params}, prev, cache=cache)
        nxt = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
        return tokens.at[:, i].set(nxt), out.cache

    tokens, _ = jax.lax.fori_loop(1, max_new_tokens, step, (tokens, out.cache))
    return tokens


def greedy_generate(config: ModelConfig, params, prompt_ids, max_new_tokens: int):
    """Greedy continuation of equal-length prompts ``[B, T]``; returns ``[B, max_new_tokens]``."""
    prompt = jnp.asarray(np.asarray(prompt_ids), jnp.int32)
    cache_len = prompt.shape[1] + max_new_tokens
    return _greedy(config, params, prompt, max_new_tokens=max_new_tokens, cache_len=cache_len)

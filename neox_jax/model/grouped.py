"""Attention pieces of the Llama-style families on the XLA path: grouped KV heads
(GQA/MQA) without repeating K/V, and the sliding-window mask (Mistral)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from neox_jax.kernels import reference

Array = jax.Array


def window_mask(q_len: int, kv_len: int, q_offset, window: int) -> Array:
    """``[1, 1, T, S]``: key slot ``s`` is within ``window`` of query slot ``t``
    (``s > t - window``, transformers' sliding-window rule); causality is separate."""
    q_slot = jnp.asarray(q_offset, jnp.int32) + jnp.arange(q_len, dtype=jnp.int32)[:, None]
    kv_slot = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
    return (kv_slot > q_slot - window)[None, None]


def grouped_attention(q, k, v, mask):
    """``reference.attention`` for fewer KV heads than query heads, K/V not repeated.

    Query head ``h`` reads KV head ``h // G`` (transformers' ``repeat_kv`` order), so
    the query heads reshape to ``[KV, G]`` and each group shares one K and V.

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, S, KV, D]`` with ``H = KV * G``.
      mask: boolean broadcastable to ``[B, 1, T, S]``.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    # [B, KV, G, T, S]
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * head_dim**-0.5
    if mask is not None:
        logits = jnp.where(mask[:, :, None], logits, reference.MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, length, heads, head_dim).astype(q.dtype)

"""Causal self-attention in two query blocks, in plain XLA: ``reference.attention``'s
values without the quarter of the ``[B, H, T, T]`` work that the causal mask discards.

Queries ``[0, T/2)`` see only keys ``[0, T/2)`` (every later key is masked for them),
so they attend against those alone (``[B, H, T/2, T/2]``), and queries ``[T/2, T)``
against all keys (``[B, H, T/2, T]``): 3/4 of the logits, softmax passes and products
of one ``[B, H, T, T]`` attention, in two independent pieces XLA:CPU can run side by
side. A query with no key to attend (padding) gets what ``reference.attention`` gives
it, the uniform average of all ``T`` values. Values and gradients equal the reference's
up to fp32 summation order (``tests/test_causal_split.py``).
"""

from __future__ import annotations

import jax.numpy as jnp

from neox_jax.kernels.reference import attention, make_attention_mask

# Sequences shorter than this run the reference path whole: at 8 x 256 tokens the
# split moved more bytes than it saved (slices, pads and transposes of q/k/v) and timed
# the same; at 8 x 512 it took 1-4 % less CPU (experiments/train_bench).
MIN_LENGTH = 512


def split_applies(q_len: int, kv_len: int) -> bool:
    """Whether self-attention over ``q_len`` queries and ``kv_len`` keys is split."""
    return q_len == kv_len and q_len % 2 == 0 and q_len >= MIN_LENGTH


def causal_split_attention(q, k, v, segment_ids):
    """Causal self-attention of ``q``, ``k``, ``v`` ``[B, T, H, D]`` (``T`` even) with
    ``segment_ids`` ``[B, T]`` (0 = padding); returns ``[B, T, H, D]``."""
    half = q.shape[1] // 2
    first = segment_ids[:, :half]
    mask_a = make_attention_mask(first, first, causal=True)  # [B, 1, T/2, T/2]
    mask_b = make_attention_mask(segment_ids[:, half:], segment_ids, q_offset=half)
    out_a = attention(q[:, :half], k[:, :half], v[:, :half], mask_a)
    out_b = attention(q[:, half:], k, v, mask_b)
    # The reference's softmax over a row with every key masked is uniform over all T.
    empty = ~jnp.any(mask_a[:, 0], axis=-1)  # [B, T/2]
    uniform = jnp.mean(v.astype(jnp.float32), axis=1, keepdims=True).astype(out_a.dtype)
    out_a = jnp.where(empty[:, :, None, None], uniform, out_a)
    return jnp.concatenate([out_a, out_b], axis=1)

"""Plain XLA attention: the reference every kernel is checked against.

Layout everywhere: ``q`` is ``[batch, q_len, heads, head_dim]`` and ``k``/``v`` are
``[batch, kv_len, heads, head_dim]``. Masking is described by segment ids and slot
indices rather than a dense mask, so the Pallas kernels can take the same inputs:

* ``segment_ids`` (int, ``0`` = padding): a query attends a key only when both carry
  the same non-zero id. Packed sequences get distinct ids per document; a plain
  Hugging Face ``attention_mask`` (1 = token, 0 = padding) is already of this form.
* causality is by slot: query ``i`` sits at key slot ``q_offset + i`` and sees the
  keys at slots ``<=`` that. ``q_offset`` is 0 for training/prefill and the cache
  write index when decoding.
"""

import jax
import jax.numpy as jnp

# A finite "minus infinity": a row whose keys are all masked (a padding query)
# then yields a uniform softmax instead of NaN, and never poisons gradients.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def make_attention_mask(q_segment_ids, kv_segment_ids, *, causal=True, q_offset=0):
    """Boolean mask ``[batch, 1, q_len, kv_len]``; True where attention is allowed.

    Args:
      q_segment_ids: ``[batch, q_len]`` int, 0 marks padding.
      kv_segment_ids: ``[batch, kv_len]`` int, 0 marks padding (or an unwritten cache slot).
      causal: mask keys at later slots than the query.
      q_offset: scalar or ``[batch]`` key slot of the first query.
    """
    q_len, kv_len = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (
        kv_segment_ids[:, None, :] != 0
    )
    if causal:
        offset = jnp.asarray(q_offset, jnp.int32).reshape(-1, 1, 1)
        q_slot = offset + jnp.arange(q_len, dtype=jnp.int32)[None, :, None]
        kv_slot = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]
        mask &= kv_slot <= q_slot
    return mask[:, None, :, :]


def attention(q, k, v, mask=None, *, scale=None):
    """Softmax attention with fp32 logits and softmax; returns ``[batch, q_len, heads, head_dim]``.

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k, v: ``[batch, kv_len, heads, head_dim]``.
      mask: optional boolean, broadcastable to ``[batch, heads, q_len, kv_len]``.
      scale: logit scale, ``head_dim ** -0.5`` by default (as GPT-NeoX).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    # [batch, heads, q_len, kv_len]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).astype(q.dtype)


def segment_attention(q, k, v, segment_ids=None, *, causal=True, scale=None):
    """Training/prefill attention over one sequence length (the flash kernel's contract)."""
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    mask = make_attention_mask(segment_ids, segment_ids, causal=causal)
    return attention(q, k, v, mask, scale=scale)

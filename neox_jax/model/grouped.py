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


def grouped_attention(q, k, v, mask, *, heads_major: bool = False):
    """``reference.attention`` for fewer KV heads than query heads, K/V not repeated.

    Query head ``h`` reads KV head ``h // G`` (transformers' ``repeat_kv`` order), so
    the query heads reshape to ``[KV, G]`` and each group shares one K and V.

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, S, KV, D]`` with ``H = KV * G``, or
        ``[B, KV, S, D]`` with ``heads_major`` (the KV cache's stored layout).
      mask: boolean broadcastable to ``[B, 1, T, S]``.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[1 if heads_major else 2]
    kv = "bksd" if heads_major else "bskd"
    qg = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    # [B, KV, G, T, S]
    logits = jnp.einsum(f"btkgd,{kv}->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * head_dim**-0.5
    if mask is not None:
        logits = jnp.where(mask[:, :, None], logits, reference.MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkgts,{kv}->btkgd", probs, v)
    return out.reshape(batch, length, heads, head_dim).astype(q.dtype)


def cache_attention(q, k, v, mask):
    """``reference.attention`` (or ``grouped_attention``) over a KV cache in its stored
    heads-major layout: each head's slots are one contiguous ``[S, D]`` block, so both
    products batch over (row, head) with no transpose of the cache.

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, KV, S, D]`` with ``H = KV * G`` (query head ``h``
        reads KV head ``h // G``).
      mask: boolean broadcastable to ``[B, 1, T, S]``.
    """
    return grouped_attention(q, k, v, mask, heads_major=True)


def step_attention(q, k, v, k_cache, v_cache, cache_mask, new_mask):
    """Attention of new tokens over the KV cache as it was before their write, plus
    themselves: equal to writing ``k``/``v`` into the cache and calling
    ``cache_attention`` (up to the order of the softmax sum).

    The decode step uses it because the products then read the cache buffer the loop
    carries, not the output of the step's ``dynamic_update_slice``: at batch 1 XLA:CPU
    drops the size-1 batch dimension of a product over the written cache, and the
    bitcast that puts between the update and the product made it copy every layer's
    cache several times per step (experiments/decode_bench/README.md). Reading the old
    buffer leaves the update the only writer, done in place after the products.

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, T, KV, D]`` (the new tokens' keys and values).
      k_cache, v_cache: ``[B, KV, S, D]``, the cache before this write.
      cache_mask: boolean broadcastable to ``[B, 1, T, S]``: which cached slots each
        query sees (never the slots being written now).
      new_mask: boolean broadcastable to ``[B, 1, T, T]``: which new tokens it sees.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads, slots = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scale = head_dim**-0.5
    # [B, KV, G, T, S] over the cache and [B, KV, G, T, T] over the new tokens
    old = jnp.einsum("btkgd,bksd->bkgts", qg, k_cache, preferred_element_type=jnp.float32)
    new = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    old = jnp.where(cache_mask[:, :, None], old * scale, reference.MASK_VALUE)
    new = jnp.where(new_mask[:, :, None], new * scale, reference.MASK_VALUE)
    probs = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1).astype(v.dtype)
    cached = probs[..., :slots]  # [B, KV, G, T, S]
    # Chosen by the platform the program is lowered for (AOT on a CPU host included).
    out = jax.lax.platform_dependent(cached, v_cache, cpu=_v_tree, default=_v_dot)
    out = out + jnp.einsum("bkgts,bskd->btkgd", probs[..., slots:], v)
    return out.reshape(batch, length, heads, head_dim).astype(q.dtype)


def _v_tree(probs: Array, v_cache: Array) -> Array:
    """``probs [B, KV, G, T, S]`` times ``v_cache [B, KV, S, D]`` summed over ``S``, as
    ``[B, T, KV, G, D]``, through ``sum_slots`` (XLA:CPU), in fp32 as a dot of these
    operands accumulates."""
    f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
    part = sum_slots(f32(probs[..., None]) * f32(v_cache[:, :, None, None]))
    return part.transpose(0, 3, 1, 2, 4).astype(v_cache.dtype)


def _v_dot(probs: Array, v_cache: Array) -> Array:
    """``_v_tree``'s product as one batched dot (GPU/TPU). (row, KV head) is one batch
    axis: with a separate size-1 row axis XLA:CPU copies each layer's V cache into a
    transposed layout every step."""
    batch, kv_heads, groups, length, slots = probs.shape
    rows = probs.reshape(batch * kv_heads, groups * length, slots)
    values = v_cache.reshape(batch * kv_heads, slots, v_cache.shape[-1])
    out = jnp.einsum("nms,nsd->nmd", rows, values)
    return out.reshape(batch, kv_heads, groups, length, -1).transpose(0, 3, 1, 2, 4)


def sum_slots(x: Array) -> Array:
    """``x.sum(-2)`` for ``x [..., S, D]`` as a tree of elementwise adds of halves along
    ``S`` (an odd count first folds its last slot into the first).

    ``step_attention``'s product of the probabilities with the V cache on CPU: XLA:CPU
    runs a batched dot ``[B*KV, 1, S] x [B*KV, S, D]`` as one matrix-vector call per
    (row, head), all on one thread, and a ``reduce`` through YNNPACK also on one. The
    adds of halves are elementwise: XLA fuses the product and the tree into two loop
    fusions (192 slots: down to 24, then to 1), each split over its two threads
    (``outer_dimension_partitions``). pythia-160m, 192 slots, decode step 52.7 against
    58.0 ms at batch 16 and 19.8 against 21.0 at batch 1 (alternating rounds, load
    1.4-1.7, same tokens; experiments/decode_bench/README.md). The sum's order differs
    from the dot's, so round-off only.
    """
    while x.shape[-2] > 1:
        if x.shape[-2] % 2:
            x = jnp.concatenate([x[..., :1, :] + x[..., -1:, :], x[..., 1:-1, :]], axis=-2)
        half = x.shape[-2] // 2
        x = x[..., :half, :] + x[..., half:, :]
    return x[..., 0, :]


# ------------------------------------------------------- rolling window cache
def is_rolling(window: int | None, cache_slots: int, index) -> bool:
    """Whether a KV cache is a rolling window: ``window`` slots reused modulo the window
    (``init_cache(..., rolling=True)``), written at one scalar index. A cache of exactly
    ``window`` slots means the same under either reading while it is not full."""
    return window is not None and cache_slots == window and jnp.ndim(index) == 0


def ring_write(buffer: Array, new: Array, index, axis: int = 1) -> Array:
    """``buffer [B, W, ...]`` with ``new [B, T, ...]`` written at absolute slots
    ``index .. index + T - 1`` modulo ``W`` (only the last ``W`` of them when T > W);
    the slots are along ``axis`` of both (2 for the ``[B, KV, W, D]`` K/V cache)."""
    size, length = buffer.shape[axis], new.shape[axis]
    kept = min(length, size)
    slots = jnp.mod(index + length - kept + jnp.arange(kept, dtype=jnp.int32), size)
    at = (slice(None),) * axis
    kept_new = jax.lax.slice_in_dim(new, length - kept, length, axis=axis)
    return buffer.at[(*at, slots)].set(kept_new.astype(buffer.dtype))


def rolling_attention(q, k, v, k_cache, v_cache, q_segment_ids, cache_segment_ids, index, window):
    """Attention of ``T`` new tokens at absolute slots ``index ..`` over a rolling cache
    (written before ``index``) and themselves, as full sliding-window attention would.

    Ring slot ``j`` holds the latest absolute slot ``a < index`` with ``a = j (mod W)``
    (none yet when ``a < 0``). The new keys are attended from the arguments, not the
    ring, so a chunk longer than the window still sees every key its queries need.

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, T, KV, D]``; k_cache, v_cache: ``[B, KV, W, D]``.
      q_segment_ids: ``[B, T]``; cache_segment_ids: ``[B, W]`` before this write.
      index: scalar, absolute slot of the first query.
    Returns ``[B, T, H, D]``.
    """
    length, size = q.shape[1], k_cache.shape[2]
    slot = jnp.arange(size, dtype=jnp.int32)
    ring_pos = index - 1 - jnp.mod(index - 1 - slot, size)  # [W] absolute slot held
    q_pos = index + jnp.arange(length, dtype=jnp.int32)  # [T]
    kv_pos = jnp.concatenate([ring_pos, q_pos])  # [W + T]
    kv_seg = jnp.concatenate([jnp.where(ring_pos >= 0, cache_segment_ids, 0), q_segment_ids], 1)
    mask = (q_segment_ids[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
    mask &= (kv_pos[None, :] <= q_pos[:, None]) & (kv_pos[None, :] > q_pos[:, None] - window)
    k_all = jnp.concatenate([k_cache.astype(q.dtype), k.swapaxes(1, 2)], axis=2)
    v_all = jnp.concatenate([v_cache.astype(q.dtype), v.swapaxes(1, 2)], axis=2)
    return cache_attention(q, k_all, v_all, mask[:, None])


def fused_attention(q, k, v, segment_ids, window: int | None = None):
    """Causal self-attention through ``jax.nn.dot_product_attention`` (``attention_impl
    = "cudnn"``): cuDNN's fused flash attention on an NVIDIA GPU for bf16/fp16 inputs,
    that function's XLA implementation elsewhere. Equals ``reference.attention`` with
    the same segment, causal and window mask; K/V may have fewer heads (GQA).

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, T, KV, D]``; segment_ids: ``[B, T]`` (0 = padding).
    """
    mask = reference.make_attention_mask(segment_ids, segment_ids, causal=True)
    if window is not None:
        mask &= window_mask(q.shape[1], k.shape[1], 0, window)
    on_cudnn = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, implementation="cudnn" if on_cudnn else "xla"
    )
    return out.astype(q.dtype)

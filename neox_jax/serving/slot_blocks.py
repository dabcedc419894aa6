"""A slot's prompt blocks copied in and out of the slot cache, for the prefix cache.

``put_block`` writes a cached block of keys and values into a slot's columns,
``get_block`` copies one out to be cached (``state``: a ``slots.SlotState``). ``slots``
re-exports both: the engine reaches them through its device module.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def per_layer(fn, *bufs):
    """``fn`` on each layer's buffer: per-layer tuples, or a stacked ``[L, ...]`` array
    (the pipeline's layout; ``fn`` is vmapped over its layer axis)."""
    if isinstance(bufs[0], tuple | list):
        return tuple(map(fn, *bufs))
    return jax.vmap(fn)(*bufs)


def block_segments(segment_ids: Array, slot: Array, offset: Array, size: int) -> Array:
    """``segment_ids [N, S]`` with ``slot``'s columns ``offset .. offset + size - 1``
    marked prompt (1) and every column after them empty (0).

    Cached blocks are put in order from column 0, and the chunked prefill that clears a
    reused row's old ids runs only from column 0: after a prefix hit nothing else would
    clear an earlier request's ids past the copied blocks, and the next decode step
    would attend to that request's keys."""
    row = jax.lax.dynamic_slice_in_dim(segment_ids, slot, 1, axis=0)  # [1, S]
    cols = jnp.arange(row.shape[1])
    row = jnp.where(cols < offset, row, (cols < offset + size).astype(row.dtype))
    return jax.lax.dynamic_update_slice_in_dim(segment_ids, row, slot, axis=0)


@functools.partial(jax.jit, donate_argnames=("state",))
def put_block(state, slot: Array, k: tuple, v: tuple, offset: Array):
    """Write a cached prompt block (per-layer ``[KV, C, D]`` keys and values, or stacked
    ``[L, KV, C, D]``) into ``slot``'s columns ``offset .. offset + C - 1``, marked as
    prompt (segment 1)."""
    size = k[0].shape[1] if isinstance(k, tuple | list) else k.shape[2]

    def put(buf, block):  # buf [N, KV, S, D]
        return jax.lax.dynamic_update_slice(
            buf, block[None].astype(buf.dtype), (slot, 0, offset, 0)
        )

    seg = block_segments(state.cache["segment_ids"], slot, offset, size)
    cache = dict(
        state.cache,
        k=per_layer(put, state.cache["k"], k),
        v=per_layer(put, state.cache["v"], v),
        segment_ids=seg,
    )
    return state.replace(cache=cache)


@functools.partial(jax.jit, static_argnames=("size",))
def get_block(state, slot: Array, offset: Array, *, size: int) -> tuple[tuple, tuple]:
    """``slot``'s keys and values at columns ``offset .. offset + size - 1``: per-layer
    ``[KV, size, D]`` copies, or stacked ``[L, KV, size, D]`` (to store in the prefix
    cache)."""

    def get(buf):  # [N, KV, S, D] -> [KV, size, D]
        shape = (1, buf.shape[1], size, buf.shape[3])
        return jax.lax.dynamic_slice(buf, (slot, 0, offset, 0), shape)[0]

    return per_layer(get, state.cache["k"]), per_layer(get, state.cache["v"])

"""A decode step's attention over a paged KV cache through the Pallas paged kernel.

The serving engine's paged cache (``serving/paged_slots.py``) keeps each layer's keys
and values in one pool of pages that every slot shares. Its default decode step gathers
each slot's pages into a contiguous row and runs the model's attention on it (XLA, any
device); with ``paged_attention="kernel"`` (or ``"interpret"``) it instead hands the
model's layers a ``cache_info`` that names the pages (``PAGED``), and ``cached_attention``
comes here: the new key/value of each sequence is written into its page, then
``kernels.paged_attention`` attends over that sequence's own pages only (it reads
nothing past a sequence's length, where the gather path reads ``max_len`` columns for
every slot).

The mask is a length: a slot's columns ``0 .. index`` are its prompt and outputs, with
no gaps (prefill and chunked prefill write a prompt's columns from 0, and each decode
step the next one), so "key column < length" is the contiguous path's segment-id mask.
"""

from __future__ import annotations

import jax.numpy as jnp

from neox_jax.kernels.paged_attention import paged_attention

PAGED = "page_table"  # the cache_info key that selects this path


def paged_info(page_table, write_page, write_offset, lengths, *, layout: str, interpret: bool):
    """The ``cache_info`` of a paged decode step.

    Args:
      page_table: ``[B, pages_per_seq]`` int32, each sequence's pages in order.
      write_page, write_offset: ``[B]`` int32, where each sequence's new key/value goes
        (a sequence that does not run writes to a scratch page nobody reads).
      lengths: ``[B]`` int32, keys each query sees after the write (0: output zeros).
      layout: the pool's layout (``kernels.paged_attention.LAYOUTS``).
      interpret: run the kernel in the Pallas interpreter (any device; for tests).
    """
    return {
        PAGED: page_table,
        "write_page": write_page,
        "write_offset": write_offset,
        "lengths": lengths,
        "layout": layout,
        "interpret": interpret,
    }


def paged_cached_attention(q, k, v, pools, info):
    """One new token per sequence against its pages.

    Args:
      q: ``[B, 1, H, D]``; k, v: ``[B, 1, KV, D]`` (after rotary).
      pools: ``{"k", "v"}``, one layer's page pools in ``info["layout"]``.
      info: ``paged_info``'s.
    Returns ``(out [B, 1, H, D], the pools with the new keys/values written)``.
    """
    if q.shape[1] != 1:
        raise ValueError(f"the paged kernel decodes one token per sequence, got {q.shape[1]}.")
    page, row = info["write_page"], info["write_offset"]

    def write(pool, t):  # t [B, 1, KV, D] -> each sequence's row of its page
        t = t[:, 0].astype(pool.dtype)  # [B, KV, D]
        if info["layout"] == "pshd":
            return pool.at[page, row].set(t)
        return pool.at[page, :, row].set(t)

    new = {"k": write(pools["k"], k), "v": write(pools["v"], v)}
    out = paged_attention(
        q[:, 0], new["k"].astype(q.dtype), new["v"].astype(q.dtype), info[PAGED],
        info["lengths"], layout=info["layout"], interpret=info["interpret"],
    )  # fmt: skip
    return jnp.asarray(out)[:, None], new

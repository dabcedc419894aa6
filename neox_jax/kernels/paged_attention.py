"""Paged decode attention: one query token per sequence against a KV cache kept in
fixed-size pages that all sequences share (vLLM's PagedAttention layout).

A contiguous cache gives every decode slot ``max_len`` columns whether its request uses
them or not; a paged cache gives a sequence only the pages its tokens fill, so when
lengths vary widely many more sequences fit in the same memory
(``neox_jax.serving.paged`` allocates the pages; experiments/serving/paged_capacity.py
measures the difference).

Layout:
  q:           ``[batch, heads, head_dim]``, the new token's query per sequence.
  k_pages, v_pages: ``[num_pages, page_size, kv_heads, head_dim]`` (``layout="pshd"``), or
               ``[num_pages, kv_heads, page_size, head_dim]`` (``"phsd"``: the serving
               engine's pool, laid out like the model's heads-major cache rows), the
               shared page pool; ``heads`` a multiple of ``kv_heads`` (grouped queries:
               query head ``h`` reads K/V head ``h // (heads / kv_heads)``).
  page_table:  ``[batch, pages_per_seq]`` int32, sequence ``b``'s pages in order (key
               slot ``j`` lives in page ``page_table[b, j // page_size]`` at row
               ``j % page_size``); entries past the sequence's last page are never read.
  lengths:     ``[batch]`` int32, keys the query sees (slots ``0 .. length - 1``); 0 for
               an empty sequence (its output is zeros).

The kernel runs one program per (sequence, head). It walks the sequence's pages through
its page-table row with FlashAttention's running max and sum (one page of K and V at a
time, fp32 accumulation) and stops at the last page holding a slot below ``length``, so
it reads nothing a sequence does not own. Tested in the Pallas interpreter against
``paged_attention_reference`` (gather the pages, mask, plain softmax), and inside the
paged serving engine (``Engine(kv_cache="paged", paged_attention="interpret")``: the same
greedy tokens as the gather path). The Triton lowering is checked (lowered for CUDA on
CPU, not run: no GPU here); Mosaic's is not tuned or checked (it wants the page table
as scalar prefetch and a page-sized DMA per step, and here the whole pool is one block).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from neox_jax.kernels.reference import MASK_VALUE, attention

LAYOUTS = ("pshd", "phsd")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")


def paged_attention_reference(
    q, k_pages, v_pages, page_table, lengths, *, scale=None, layout="pshd"
):
    """Plain XLA: gather every sequence's pages into ``[batch, pages * page_size, ...]``
    keys and values, mask the slots at or past ``length``, softmax. ``[batch, heads,
    head_dim]``; a sequence of length 0 gets zeros."""
    _check_layout(layout)
    if layout == "phsd":
        k_pages, v_pages = (p.swapaxes(1, 2) for p in (k_pages, v_pages))
    batch, pages = page_table.shape
    _, page_size, kv_heads, dim = k_pages.shape
    k = k_pages[page_table].reshape(batch, pages * page_size, kv_heads, dim)
    v = v_pages[page_table].reshape(batch, pages * page_size, kv_heads, dim)
    group = q.shape[1] // kv_heads
    k, v = (jnp.repeat(t, group, axis=2) for t in (k, v))  # grouped queries
    live = jnp.arange(pages * page_size)[None, :] < lengths[:, None]  # [B, S]
    out = attention(q[:, None], k, v, live[:, None, None, :], scale=scale)[:, 0]
    return jnp.where((lengths > 0)[:, None, None], out, 0).astype(q.dtype)


def _kernel(lengths_ref, table_ref, q_ref, k_ref, v_ref, o_ref, *, page_size, scale, group, layout):
    """One (sequence, head): online softmax over the sequence's pages."""
    b, h = pl.program_id(0), pl.program_id(1)
    kv = h // group
    length = lengths_ref[b]
    q = q_ref[0, 0, :].astype(jnp.float32) * scale  # [D]
    rows = lax.broadcasted_iota(jnp.int32, (page_size,), 0)

    def body(i, carry):
        m, total, acc = carry  # running max, sum of exp, [D] weighted values
        page = table_ref[b, i]
        at = (page, slice(None), kv) if layout == "pshd" else (page, kv, slice(None))
        k = k_ref[at].astype(jnp.float32)  # [P, D]
        v = v_ref[at].astype(jnp.float32)
        live = i * page_size + rows < length  # [P]
        s = jnp.where(live, jnp.sum(k * q[None, :], axis=-1), MASK_VALUE)
        # Rows past the length may hold anything (a fresh page): 0 * NaN would poison.
        v = jnp.where(live[:, None], v, 0.0)
        m_new = jnp.maximum(m, jnp.max(s))
        p = jnp.exp(s - m_new)
        correction = jnp.exp(m - m_new)
        # A broadcast sum, not ``p @ v``: Triton's lowering has no vector-matrix dot.
        return m_new, total * correction + jnp.sum(p), acc * correction + jnp.sum(p[:, None] * v, 0)

    dim = q.shape[0]
    init = (jnp.float32(MASK_VALUE), jnp.float32(0.0), jnp.zeros((dim,), jnp.float32))
    n_pages = (length + page_size - 1) // page_size
    _, total, acc = lax.fori_loop(0, n_pages, body, init)
    o_ref[0, 0, :] = (acc / jnp.where(total == 0, 1.0, total)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "layout"))
def paged_attention(
    q, k_pages, v_pages, page_table, lengths, *, scale=None, interpret=True, layout="pshd"
):
    """Pallas paged decode attention (layouts in the module docstring); ``[batch, heads,
    head_dim]``, equal to ``paged_attention_reference`` to fp32 round-off.

    ``interpret``: run in the Pallas interpreter (any platform; the tested path); else
    the kernel compiles with Triton, for a GPU."""
    _check_layout(layout)
    batch, heads, dim = q.shape
    page_size, kv_heads = k_pages.shape[1:3] if layout == "pshd" else k_pages.shape[2:0:-1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} K/V heads.")
    scale = dim**-0.5 if scale is None else scale
    whole = lambda a: pl.BlockSpec(a.shape, lambda b, h: (0,) * a.ndim)  # noqa: E731
    one = pl.BlockSpec((1, 1, dim), lambda b, h: (b, h, 0))
    return pl.pallas_call(
        functools.partial(
            _kernel, page_size=page_size, scale=scale, group=heads // kv_heads, layout=layout
        ),
        grid=(batch, heads),
        in_specs=[
            whole(lengths),
            whole(page_table),
            one,
            whole(k_pages),
            whole(v_pages),
        ],  # fmt: skip
        out_specs=one,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        # Compiled: Triton (GPU); the Mosaic lowering is not written (module docstring).
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=4),
    )(lengths.astype(jnp.int32), page_table.astype(jnp.int32), q, k_pages, v_pages)

"""Decode attention in Pallas: one new query token per row against a preallocated KV cache.

Flash-decoding (split-K): the cache is cut into blocks of ``block_k`` slots and each
program owns one (batch row, head group, split) and a share of the blocks that hold a
slot below ``length``. It writes an unnormalised partial output with its running max
``m`` and sum ``l``; a few jnp ops then merge the splits (FlashAttention's softmax
rescaling, applied across splits). Decoding is memory bound, so the point is to read
each live cache byte once with the whole machine busy, and nothing at or past
``length``. GPU: blocks are dealt round-robin to enough programs to fill the SMs,
and each program's loop stops at ``length``. TPU: one block per grid step, its index
clamped through scalar prefetch so that the pipeline never DMAs a dead block.

The cache is read in place, never copied (unless no block size divides cache_len), in
either of two layouts. ``layout="bksd"`` (``[batch, kv_heads, cache_len, head_dim]``,
the model's KV cache, see ``model.init_cache``): each program reads one head's
contiguous ``[block, head_dim]`` tiles (a block dim equal to the array's is always
allowed, so head_dim needs no 128-lane padding). ``layout="bskd"`` (``[batch, cache_len,
kv_heads, head_dim]``): the kernels view it as ``[batch, cache_len, heads * head_dim]``
and take a window of ``group * head_dim`` columns per program. On GPU a group is one
head; on TPU it is the fewest heads whose columns fill whole 128-lane tiles (Mosaic's
block rule), all heads if none do. Inside a group, query row ``r`` holds head ``r``'s
query in that head's columns and zeros elsewhere, so one matmul scores every head of
the group and the wanted output is the block diagonal.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from neox_jax.kernels.reference import MASK_VALUE
from neox_jax.kernels.target import dispatch

# Cache slots per inner block. GPU: a [block, head_dim] K and V tile double-buffered
# in shared memory. TPU: 128-lane multiples, big enough to amortise a grid step.
_DEFAULT_BLOCK_K = {"gpu": 128, "tpu": 512, "cpu": 128}
_MIN_BLOCK_K = {"gpu": 16, "tpu": 128, "cpu": 16}
# Query rows per program: tl.dot needs >= 16 rows; a TPU vreg has 8 sublanes.
_MIN_ROWS = {"gpu": 16, "tpu": 8}
# GPU programs to aim for: about two per SM on an H100 (132 SMs) hides load latency.
_GPU_TARGET_PROGRAMS = 256


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static tiling of one decode call."""

    target: str  # "gpu" or "tpu"
    interpret: bool
    scale: float
    group: int  # heads per program
    rows: int  # query rows per program (>= group, zero rows pad it)
    width: int  # cache columns per program: group * head_dim
    parts: tuple  # (start, size) column chunks, each a power of two on GPU
    block_k: int  # slots per inner loop step
    n_splits: int  # programs per (batch row, group), each a share of the cache blocks
    q_per_kv: int = 1  # query heads per K/V head (grouped-query attention)
    window: int | None = None  # sliding window: slots > length - 1 - window are seen
    heads_major: bool = False  # the cache is [batch, kv_heads, cache_len, head_dim]


def _column_parts(width, target):
    """Column chunks for loads: Triton tiles must be powers of two (80 = 64 + 16)."""
    if target == "tpu":
        return ((0, width),)
    parts, start = [], 0
    for bit in reversed(range(width.bit_length())):
        size = 1 << bit
        if width - start >= size and size >= 16:
            parts.append((start, size))
            start += size
    if start != width:
        raise ValueError(f"head_dim {width} must be a multiple of 16 for the GPU decode kernel")
    return tuple(parts)


def _head_group(heads, head_dim, target):
    if target == "gpu":
        return 1
    for group in range(1, heads + 1):
        if heads % group == 0 and (group * head_dim) % 128 == 0:
            return group
    return heads  # the whole row: a block dim equal to the array dim is always allowed


def _block_k(cache_len, block_k, target, interpret):
    """Largest power-of-two block <= the default that divides cache_len (0 if none)."""
    kind = "cpu" if interpret and target == "gpu" else target
    block = block_k or _DEFAULT_BLOCK_K[kind]
    while block >= _MIN_BLOCK_K[kind] and cache_len % block:
        block //= 2
    return block if block >= _MIN_BLOCK_K[kind] and cache_len % block == 0 else 0


def _num_splits(n_blocks, programs, target):
    """Programs per (batch row, group). TPU: one block per grid step, so the pipeline
    overlaps each block's DMA with the previous block's compute. GPU: enough programs
    to fill the SMs; blocks are dealt out round-robin (block i to program i % n), so a
    short ``length`` still keeps every program busy."""
    if target == "tpu":
        return n_blocks
    return min(n_blocks, max(1, -(-_GPU_TARGET_PROGRAMS // programs)))


def _my_blocks(plan, live_blocks):
    """(first, stride, count, ref_first): this program's cache blocks first, first +
    stride, ... (count of them, all below ``length``); its K/V ref starts at ref_first."""
    s = pl.program_id(2)
    if plan.target == "gpu":  # round-robin over the whole cache (the ref is all of it)
        count = jnp.maximum(lax.div(live_blocks - s + plan.n_splits - 1, plan.n_splits), 0)
        return s, plan.n_splits, count, 0
    return s, 1, jnp.clip(live_blocks - s, 0, 1), s  # TPU: the ref is this one block


def _mm(a, b, contract):  # fp32-accumulated 2-D matmul
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, seg_ref, o_ref, m_ref, l_ref, *, plan):
    bk, rows = plan.block_k, plan.rows
    length = len_ref[0]
    # Only blocks holding a slot < length are visited: later ones are never read.
    first, stride, count, ref_first = _my_blocks(plan, lax.div(length + bk - 1, bk))
    q_parts = [q_ref[:, pl.ds(c, w)] for c, w in plan.parts]  # [rows, w] each

    def body(t, carry):
        m, row_sum, acc = carry  # [rows, 1], [rows, 1], tuple of [rows, w] fp32
        block = first + t * stride
        slots = pl.ds(pl.multiple_of((block - ref_first) * bk, bk), bk)
        k_parts = [k_ref[slots, pl.ds(c, w)] for c, w in plan.parts]  # [bk, w] each
        pairs = zip(q_parts, k_parts, strict=True)
        s = sum(_mm(qp, kp, ((1,), (1,))) for qp, kp in pairs) * plan.scale  # [rows, bk]
        slot_row = block * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        mask = (seg_ref[:, slots] != 0) & (slot_row < length)  # [1, bk]
        if plan.window is not None:  # the new token sits at slot length - 1
            mask &= slot_row > length - 1 - plan.window
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        row_sum = alpha * row_sum + jnp.sum(p, axis=1, keepdims=True)
        p = p.astype(v_ref.dtype)  # PV in the cache dtype, as the reference does
        # Slots at/after length in the last block may hold anything (even NaN, which a
        # zero probability would not cancel): zero those V rows.
        live = (block * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)) < length  # [bk, 1]
        v_parts = [jnp.where(live, v_ref[slots, pl.ds(c, w)], 0) for c, w in plan.parts]
        acc = tuple(
            alpha * a + _mm(p, vp, ((1,), (0,))) for a, vp in zip(acc, v_parts, strict=True)
        )
        return m_new, row_sum, acc

    carry = (
        jnp.full((rows, 1), MASK_VALUE, jnp.float32),  # finite: see flash_attention
        jnp.zeros((rows, 1), jnp.float32),
        tuple(jnp.zeros((rows, w), jnp.float32) for _, w in plan.parts),
    )
    m, row_sum, acc = lax.fori_loop(0, count, body, carry)
    for a, (c, w) in zip(acc, plan.parts, strict=True):
        o_ref[:, pl.ds(c, w)] = a
    m_ref[...] = m
    l_ref[...] = row_sum


def _compiler_params(plan):
    if plan.interpret:
        return None
    if plan.target == "gpu":
        return pltriton.CompilerParams(num_warps=4, num_stages=2)
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))


def _call(plan, q_rows, k, v, seg, length):
    """pallas_call over (batch, group, split) -> partial (o, m, l)."""
    batch, groups = q_rows.shape[:2]
    cache_len, width, rows, bk = k.shape[-2], plan.width, plan.rows, plan.block_k
    # The K/V block a program reads, [slots, width]: in the heads-major layout the
    # group (one head) is an axis of its own, else a window of width columns.
    if plan.heads_major:
        kv_block = lambda slots, at: pl.BlockSpec(  # noqa: E731
            (None, None, slots, width), lambda b, g, s, *n: (b, g, at(s, *n), 0)
        )
    else:
        kv_block = lambda slots, at: pl.BlockSpec(  # noqa: E731
            (None, slots, width), lambda b, g, s, *n: (b, at(s, *n), g)
        )
    if plan.target == "gpu":
        # Each program sees its (batch, group)'s whole cache: a Triton ref is a pointer,
        # and the kernel loads only its own blocks.
        kv_spec = kv_block(cache_len, lambda s: 0)
        seg_spec = pl.BlockSpec((None, 1, cache_len), lambda b, g, s: (b, 0, 0))
    else:

        def block(s, len_ref):
            # Blocks wholly past length re-name the last live block, so the pipeline
            # sees an unchanged block index and issues no DMA for them.
            return jnp.minimum(s, jnp.maximum(lax.div(len_ref[0] + bk - 1, bk) - 1, 0))

        kv_spec = kv_block(bk, block)
        seg_spec = pl.BlockSpec((None, 1, bk), lambda b, g, s, n: (b, 0, block(s, n)))
    q_spec = pl.BlockSpec((None, None, rows, width), lambda b, g, s, *_: (b, g, 0, 0))
    part_spec = lambda cols: pl.BlockSpec(
        (None, None, None, rows, cols), lambda b, g, s, *_: (b, g, s, 0, 0)
    )
    in_specs = [q_spec, kv_spec, kv_spec, seg_spec]
    out_specs = [part_spec(width), part_spec(1), part_spec(1)]
    grid = (batch, groups, plan.n_splits)
    if plan.target == "tpu":  # length goes to SMEM before the grid runs (index maps read it)
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs
        )
    else:
        len_spec = pl.BlockSpec((1,), lambda *_: (0,))
        grid_spec = pl.GridSpec(grid=grid, in_specs=[len_spec, *in_specs], out_specs=out_specs)
    part = lambda cols: jax.ShapeDtypeStruct((*grid, rows, cols), jnp.float32)
    return pl.pallas_call(
        functools.partial(_decode_kernel, plan=plan),
        grid_spec=grid_spec,
        out_shape=[part(width), part(1), part(1)],
        compiler_params=_compiler_params(plan),
        interpret=plan.interpret,
        name="decode_attention",
    )(length, q_rows, k, v, seg)


def _embed_queries(q, plan):
    """[batch, heads, d] -> [batch, groups, rows, group * d]: the ``q_per_kv`` query heads
    of K/V head ``r`` of a group in rows ``r * q_per_kv ...``, in columns r*d:(r+1)*d
    (so grouped heads read their shared K/V once, never repeated)."""
    batch, heads, head_dim = q.shape
    g, n = plan.group, plan.q_per_kv
    groups = heads // (g * n)
    eye = jnp.eye(g, dtype=q.dtype)[:, None, :, None]  # [r, 1, c, 1]
    q = q.reshape(batch, groups, g, n, 1, head_dim) * eye  # [b, groups, r, s, c, d]
    q = q.reshape(batch, groups, g * n, g * head_dim)
    return jnp.pad(q, ((0, 0), (0, 0), (0, plan.rows - g * n), (0, 0)))


def _combine(o, m, row_sum, plan, heads, head_dim, dtype):
    """Merge the splits (axis 2) and take each head's own columns -> [batch, heads, d]."""
    m_max = jnp.max(m, axis=2, keepdims=True)
    alpha = jnp.exp(m - m_max)  # [b, groups, splits, rows, 1]
    denom = jnp.sum(alpha * row_sum, axis=2)
    # A row with no visible slot (an empty batch row) has denom 0: return zeros there.
    out = jnp.sum(alpha * o, axis=2) / jnp.where(denom == 0.0, 1.0, denom)
    g, n = plan.group, plan.q_per_kv
    out = out[:, :, : g * n].reshape(o.shape[0], heads // (g * n), g, n, g, head_dim)
    out = jnp.einsum("bgrsrd->bgrsd", out)  # each query head's own K/V head's columns
    return out.reshape(o.shape[0], heads, head_dim).astype(dtype)


def decode_attention(
    q, k_cache, v_cache, kv_segment_ids, *, length=None, scale=None, block_k=None,
    kernel_target="auto", window=None, layout="bskd",
):  # fmt: skip
    """Attention of one new token per row over a KV cache (split-K flash decoding).

    Args:
      q: ``[batch, heads, head_dim]``; the token's own key/value are already cached.
      k_cache, v_cache: ``[batch, cache_len, kv_heads, head_dim]``; ``kv_heads`` divides
        ``heads`` and query head ``h`` reads K/V head ``h // (heads / kv_heads)``
        (grouped-query attention: a program scores all of a K/V head's queries at once).
      kv_segment_ids: ``[batch, cache_len]`` int; 0 masks a slot (left padding, or not
        yet written), any other value is visible.
      length: optional int32 scalar; slots at or beyond it are never read (their
        blocks are skipped), whatever they hold. None: the whole cache.
      scale: logit scale, ``head_dim ** -0.5`` by default.
      block_k: cache slots per inner block (a power of two dividing cache_len); None
        picks per backend.
      kernel_target: "auto" (Mosaic when lowered for TPU, Triton for GPU, the
        interpreter for CPU; see ``neox_jax.kernels.target``), or "tpu", "gpu",
        "interpret" to force one.
      window: sliding window: the new token (slot ``length - 1``) sees only slots
        ``> length - 1 - window``. None: every slot below ``length``.
      layout: "bskd" (the caches as above) or "bksd": ``[batch, kv_heads, cache_len,
        head_dim]``, the model's KV cache layout (each head's slots contiguous).

    Returns:
      ``[batch, heads, head_dim]`` in ``q.dtype``, equal to
      ``reference.attention(q[:, None], k, v, mask)[:, 0]`` with ``mask`` from
      ``kv_segment_ids != 0`` (and slot < length). A row with no visible slot gets
      zeros (the reference would average the whole cache, unwritten slots included).
    """
    if layout not in ("bskd", "bksd"):
        raise ValueError(f'layout must be "bskd" or "bksd", got {layout!r}')
    decode = lambda target, interpret, q, k, v, seg, length: _decode(  # noqa: E731
        q, k, v, seg, length, scale, block_k, target, interpret, window, layout
    )
    return dispatch(kernel_target, decode, q, k_cache, v_cache, kv_segment_ids, length)


def _decode(
    q, k_cache, v_cache, kv_segment_ids, length, scale, block_k, target, interpret, window=None,
    layout="bskd",
):  # fmt: skip
    """decode_attention for an explicit target ("gpu" or "tpu"); tests use both."""
    heads_major = layout == "bksd"
    slot_axis = 2 if heads_major else 1
    if heads_major:
        batch, kv_heads, cache_len, head_dim = k_cache.shape
    else:
        batch, cache_len, kv_heads, head_dim = k_cache.shape
    heads = q.shape[1]
    if q.shape != (batch, heads, head_dim) or heads % kv_heads or v_cache.shape != k_cache.shape:
        raise ValueError(f"shapes: q {q.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape}")
    if kv_segment_ids.shape != (batch, cache_len):
        raise ValueError(f"kv_segment_ids must be {(batch, cache_len)}, got {kv_segment_ids.shape}")
    bk = _block_k(cache_len, block_k, target, interpret)
    if bk == 0:
        # No power-of-two block divides cache_len: pad the cache. That copies it on
        # every call, so allocate caches in multiples of 128 slots to stay on the fast path.
        bk = block_k or _DEFAULT_BLOCK_K["tpu" if target == "tpu" else "gpu"]
        bk = min(bk, max(_MIN_BLOCK_K[target], pl.next_power_of_2(cache_len)))
        pad = -cache_len % bk
        widths = [(0, 0)] * 4
        widths[slot_axis] = (0, pad)
        k_cache, v_cache = (jnp.pad(x, widths) for x in (k_cache, v_cache))
        kv_segment_ids = jnp.pad(kv_segment_ids, ((0, 0), (0, pad)))
    padded_len = k_cache.shape[slot_axis]
    # K/V heads per program: heads-major blocks hold one head's whole head_dim.
    group = 1 if heads_major else _head_group(kv_heads, head_dim, target)
    q_per_kv = heads // kv_heads
    n_splits = _num_splits(padded_len // bk, batch * kv_heads // group, target)
    plan = _Plan(
        target=target,
        interpret=interpret,
        scale=float(head_dim**-0.5 if scale is None else scale),
        group=group,
        rows=max(_MIN_ROWS[target], -(-(group * q_per_kv) // 8) * 8),
        width=group * head_dim,
        parts=_column_parts(group * head_dim, target),
        block_k=bk,
        n_splits=n_splits,
        q_per_kv=q_per_kv,
        window=None if window is None else int(window),
        heads_major=heads_major,
    )
    limit = cache_len if length is None else jnp.minimum(jnp.asarray(length, jnp.int32), cache_len)
    # bskd: [batch, slots, heads * head_dim], free (heads minor); bksd: as it is.
    flat = (lambda x: x) if heads_major else (lambda x: x.reshape(batch, padded_len, -1))
    o, m, row_sum = _call(
        plan,
        _embed_queries(q, plan),
        flat(k_cache),
        flat(v_cache),
        kv_segment_ids.astype(jnp.int32).reshape(batch, 1, padded_len),
        jnp.asarray(limit, jnp.int32).reshape(1),
    )
    return _combine(o, m, row_sum, plan, heads, head_dim, q.dtype)

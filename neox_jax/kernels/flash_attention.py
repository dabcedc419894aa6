"""Flash attention (forward + backward) in Pallas for training and prefill.

Same contract as ``reference.segment_attention``: ``[batch, length, heads, head_dim]``
inputs, segment ids (0 = padding), causality by slot, fp32 logits and softmax,
scale ``head_dim ** -0.5``. FlashAttention-2 (Dao, 2023, arXiv 2307.08691): the
forward keeps a running max ``m`` and sum ``l`` per query row (online softmax) and
stores ``lse = m + log(l)``; the backward recomputes the probabilities from ``lse``
in two kernels, one per query block for dq and one per key block for dk/dv, so no
kernel needs atomics. ``jax.grad`` cannot go through ``pallas_call``, hence the
``custom_vjp``.

Every kernel owns one block of rows and loops over the blocks of the other side with
``fori_loop``, reading them from a whole-sequence slab of its (batch, head). Under
causality that loop is split in two: blocks fully below the diagonal run without the
causal mask, blocks on the diagonal run with it, and blocks above it are never
visited (causal block skipping). The same kernels lower to Triton on GPU and to
Mosaic on TPU; what differs is only the array layout, the grid order and the
compiler parameters (see ``flash_layout.Layout`` and ``_compiler_params``). Which one a program
gets follows the platform it is lowered for (``neox_jax.kernels.target``).

A ``pallas_call`` is a per-device kernel that XLA cannot partition: inside a sharded
jit, call these functions under ``jax.shard_map`` with batch and heads sharded (every
(batch, head) is independent, so no collective is needed).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from neox_jax.kernels.flash_layout import Layout as _Layout
from neox_jax.kernels.reference import MASK_VALUE
from neox_jax.kernels.target import dispatch

# (block_q, block_k) per target, forward and backward. GPU: Triton tiles that fit
# H100/A100 shared memory with double buffering; the backward holds four [block, d]
# fp32 tiles live, so it gets smaller blocks. TPU: multiples of 128 (lane width) and
# larger, since Mosaic runs one grid step at a time. CPU (interpret): large blocks, as
# the interpreter's cost is per grid step and per loop iteration. Untuned until a GPU
# and a TPU run (experiments/attention_bench).
_DEFAULT_BLOCKS = {
    # target: (fwd for d <= 128, fwd for d > 128, bwd for d <= 128, bwd for d > 128)
    "gpu": ((128, 64), (64, 32), (64, 64), (32, 32)),
    "tpu": ((256, 512), (256, 256), (256, 256), (128, 128)),
    "cpu": ((128, 128), (128, 128), (128, 128), (128, 128)),
}
# Triton's tl.dot needs every dim >= 16; Mosaic blocks on the lane axis need 128.
_MIN_BLOCK = {"gpu": 16, "tpu": 128, "cpu": 16}


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static parameters of one flash attention call (hashable: a custom_vjp nondiff arg)."""

    layout: _Layout
    causal: bool
    scale: float
    block_q: int
    block_k: int
    bwd_block_q: int
    bwd_block_k: int
    interpret: bool
    has_segments: bool
    window: int | None = None  # sliding window: keys at slots > query slot - window


def _compiler_params(cfg, head_dim):
    """Backend-specific compiler parameters; None when interpreting."""
    if cfg.interpret:
        return None
    if cfg.layout.target == "gpu":
        # Wider heads need more warps to keep the [block, head_dim] tiles in registers.
        return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    # Every grid step writes its own output block, so all axes may be split across
    # TensorCores (megacore); nothing accumulates across grid steps.
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))


def _split_refs(refs, n_in, has_segments):
    """(inputs, (q_seg_ref, kv_seg_ref) or Nones, outputs) from a kernel's refs."""
    n_seg = 2 if has_segments else 0
    ins, segs, outs = refs[:n_in], refs[n_in : n_in + n_seg], refs[n_in + n_seg :]
    return ins, (tuple(segs) if segs else (None, None)), outs


def _mm(a, b, contract):
    """fp32-accumulated 2-D matmul contracting a's and b's dims ``contract``."""
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


_dot_nt = functools.partial(_mm, contract=((1,), (1,)))  # [m, d] x [n, d] -> [m, n]
_dot_tn = functools.partial(_mm, contract=((0,), (0,)))  # [m, n] x [m, d] -> [n, d]
_dot = functools.partial(_mm, contract=((1,), (0,)))  # [m, n] x [n, d] -> [m, d]


def _rows(start, size):
    return pl.ds(pl.multiple_of(start, size), size)


def _block_mask(q_seg, kv_seg, q_start, k_start, shape, causal, window=None):
    """[block_q, block_k] bool (True = attend) or None when nothing is masked.

    Same rule as ``reference.make_attention_mask``: equal non-zero segment ids and,
    when causal, key slot <= query slot (and, with a sliding ``window``, key slot >
    query slot - window, as ``model.grouped.window_mask``). Padded slots carry segment id 0.
    """
    mask = None
    if q_seg is not None:
        mask = (q_seg == kv_seg) & (kv_seg != 0)  # [bq, 1] vs [1, bk]
    if causal:
        q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
        k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
        visible = q_pos >= k_pos
        if window is not None:
            visible &= k_pos > q_pos - window
        mask = visible if mask is None else mask & visible
    return mask


def _causal_ranges(i, rows_block, cols_block, n_cols, rows_are_queries):
    """Loop bounds over the other side's blocks for row block ``i``.

    Returns (lo, mid, hi): blocks in [lo, mid) need the causal mask, [mid, hi) do not
    when the rows are keys; for query rows it is [lo, mid) unmasked, [mid, hi) masked.
    Blocks outside [lo, hi) are entirely above the diagonal and are skipped.
    """
    if rows_are_queries:
        full = lax.div(i * rows_block, cols_block)  # kv blocks with every key <= first query
        end = lax.div((i + 1) * rows_block + cols_block - 1, cols_block)
        return 0, full, jnp.minimum(end, n_cols)
    start = lax.div(i * rows_block, cols_block)  # first q block reaching this key block
    full = lax.div((i + 1) * rows_block + cols_block - 1, cols_block)
    return start, jnp.minimum(full, n_cols), n_cols


def _window_range(i, rows_block, cols_block, n_cols, rows_are_queries, window):
    """[lo, hi): the other side's blocks that hold a visible pair under a sliding window
    (query q sees keys q - window < k <= q); the rest are skipped."""
    if rows_are_queries:  # keys in (i * bq - window, (i + 1) * bq - 1]
        lo = lax.div(jnp.maximum(i * rows_block - window + 1, 0), cols_block)
        return lo, jnp.minimum(lax.div((i + 1) * rows_block - 1, cols_block) + 1, n_cols)
    lo = lax.div(i * rows_block, cols_block)  # queries in [j * bk, (j + 1) * bk + window - 2]
    return lo, jnp.minimum(lax.div((i + 1) * rows_block + window - 2, cols_block) + 1, n_cols)


def _run_loops(body, carry, cfg, i, rows_block, cols_block, n_cols, rows_are_queries):
    """fori_loop(s) of ``body(j, carry, causal)`` over the visible blocks."""
    if not cfg.causal:
        return lax.fori_loop(0, n_cols, functools.partial(body, causal=False), carry)
    if cfg.window is not None:  # every visited block masked (window edge and diagonal)
        lo, hi = _window_range(i, rows_block, cols_block, n_cols, rows_are_queries, cfg.window)
        return lax.fori_loop(lo, hi, functools.partial(body, causal=True), carry)
    lo, mid, hi = _causal_ranges(i, rows_block, cols_block, n_cols, rows_are_queries)
    first, second = (False, True) if rows_are_queries else (True, False)
    carry = lax.fori_loop(lo, mid, functools.partial(body, causal=first), carry)
    return lax.fori_loop(mid, hi, functools.partial(body, causal=second), carry)


def _fwd_kernel(*refs, cfg, n_q, n_k):
    (q_ref, k_ref, v_ref), (qs_ref, ks_ref), (o_ref, lse_ref) = _split_refs(
        refs, 3, cfg.has_segments
    )
    bq, bk = cfg.block_q, cfg.block_k
    i = cfg.layout.block_id(n_q)
    q = q_ref[...]  # [bq, dp]
    q_seg = None if qs_ref is None else qs_ref[...]  # [bq, 1]

    def body(j, carry, causal):
        m, row_sum, acc = carry  # [bq, 1], [bq, 1], [bq, dp] fp32
        k = k_ref[_rows(j * bk, bk), :]  # [bk, dp]
        v = v_ref[_rows(j * bk, bk), :]
        s = _dot_nt(q, k) * cfg.scale  # [bq, bk]
        kv_seg = None if ks_ref is None else ks_ref[:, _rows(j * bk, bk)]  # [1, bk]
        mask = _block_mask(q_seg, kv_seg, i * bq, j * bk, s.shape, causal, cfg.window)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        if mask is not None:
            # Explicit zeros: a row whose keys are all masked keeps l == 0 (exp(0) would
            # count masked keys), so the caller can tell padding rows apart.
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m - m_new)
        row_sum = alpha * row_sum + jnp.sum(p, axis=1, keepdims=True)
        acc = alpha * acc + _dot(p.astype(v.dtype), v)
        return m_new, row_sum, acc

    # m starts at the finite MASK_VALUE, not -inf, so alpha = exp(m - m_new) is never
    # exp(-inf + inf) = NaN while a row has only seen masked keys.
    carry = (
        jnp.full((bq, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
        jnp.zeros(q.shape, jnp.float32),
    )
    m, row_sum, acc = _run_loops(body, carry, cfg, i, bq, bk, n_k, rows_are_queries=True)
    # Fully masked rows (padding queries): output 0, lse = MASK_VALUE.
    l_safe = jnp.where(row_sum == 0.0, 1.0, row_sum)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l_safe)


def _probs(q, k, lse, q_seg, kv_seg, q_start, k_start, cfg, causal):
    """Recomputed probabilities [bq, bk] fp32 from the forward's logsumexp."""
    s = _dot_nt(q, k) * cfg.scale
    p = jnp.exp(s - lse)
    mask = _block_mask(q_seg, kv_seg, q_start, k_start, s.shape, causal, cfg.window)
    # where, not multiply: masked entries may be exp(+large) = inf.
    return p if mask is None else jnp.where(mask, p, 0.0)


def _dq_kernel(*refs, cfg, n_q, n_k):
    ins, (qs_ref, ks_ref), (dq_ref,) = _split_refs(refs, 6, cfg.has_segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bk = cfg.bwd_block_q, cfg.bwd_block_k
    i = cfg.layout.block_id(n_q)
    q, do = q_ref[...], do_ref[...]  # [bq, dp]
    lse, delta = lse_ref[...], delta_ref[...]  # [bq, 1] fp32
    q_seg = None if qs_ref is None else qs_ref[...]

    def body(j, dq, causal):
        k = k_ref[_rows(j * bk, bk), :]  # [bk, dp]
        v = v_ref[_rows(j * bk, bk), :]
        kv_seg = None if ks_ref is None else ks_ref[:, _rows(j * bk, bk)]
        p = _probs(q, k, lse, q_seg, kv_seg, i * bq, j * bk, cfg, causal)
        ds = p * (_dot_nt(do, v) - delta)  # [bq, bk]
        return dq + _dot(ds.astype(k.dtype), k)

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = _run_loops(body, dq, cfg, i, bq, bk, n_k, rows_are_queries=True)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg, n_q, n_k):
    ins, (qs_ref, ks_ref), (dk_ref, dv_ref) = _split_refs(refs, 6, cfg.has_segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bk = cfg.bwd_block_q, cfg.bwd_block_k
    j = cfg.layout.block_id(n_k)
    k, v = k_ref[...], v_ref[...]  # [bk, dp]
    kv_seg = None if ks_ref is None else ks_ref[...]  # [1, bk]

    def body(i, carry, causal):
        dk, dv = carry
        rows = _rows(i * bq, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]  # [bq, dp]
        q_seg = None if qs_ref is None else qs_ref[rows, :]
        p = _probs(q, k, lse_ref[rows, :], q_seg, kv_seg, i * bq, j * bk, cfg, causal)
        dv = dv + _dot_tn(p.astype(do.dtype), do)  # [bk, dp]
        ds = p * (_dot_nt(do, v) - delta_ref[rows, :])  # [bq, bk]
        dk = dk + _dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = _run_loops(body, carry, cfg, j, bk, bq, n_q, rows_are_queries=False)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dims(q, layout):
    """(batch, heads, padded length, padded head_dim) of a kernel-layout array."""
    b, x, y, dp = q.shape
    return (b, y, x, dp) if layout.target == "gpu" else (b, x, y, dp)


def _grad_shape(q, k, cfg):
    dtype = k.dtype if cfg.layout.groups == 1 else jnp.float32
    return jax.ShapeDtypeStruct(q.shape, dtype)


def _sum_groups(g, k, layout):
    """[.., h, ..] per-query-head K/V gradient -> [.., h / groups, ..] in k's dtype."""
    if layout.groups == 1:
        return g
    axis = 2 if layout.target == "gpu" else 1
    shape = (*g.shape[:axis], k.shape[axis], layout.groups, *g.shape[axis + 1 :])
    return g.reshape(shape).sum(axis + 1).astype(k.dtype)


def _launch(kind, cfg, dims, operands):
    """Run the "fwd", "dq" or "dkv" kernel on kernel-layout operands.

    operands: q, k, v, then (do, lse, delta) for the backward, then (q_seg, kv_seg)
    if any. The grid walks query blocks ("fwd", "dq") or key blocks ("dkv"); operands
    of that side are tiled by the grid, the other side's come as whole-sequence slabs.
    """
    b, h, lp, dp = dims
    bq, bk = (cfg.block_q, cfg.block_k) if kind == "fwd" else (cfg.bwd_block_q, cfg.bwd_block_k)
    n_q, n_k = lp // bq, lp // bk
    by_q = kind != "dkv"  # (the first key blocks are the longest already: no reversal)
    layout = dataclasses.replace(cfg.layout, reverse=cfg.causal and by_q)
    spec = functools.partial(layout.spec, blocks=n_q if by_q else n_k)
    q_side = lambda what, d=None: spec(what, bq if by_q else lp, dp=d, tiled=by_q)
    kv_side = lambda what, d=None: spec(what, lp if by_q else bk, dp=d, tiled=not by_q)
    in_specs = [q_side("seq", dp), kv_side("kv", dp), kv_side("kv", dp)]
    if kind != "fwd":
        in_specs += [q_side("seq", dp), q_side("stat"), q_side("stat")]
    if cfg.has_segments:
        in_specs += [q_side("qseg"), kv_side("kvseg")]
    q, k, v = operands[:3]
    out_specs, out_shape = {
        "fwd": (
            [q_side("seq", dp), q_side("stat")],
            [q, jax.ShapeDtypeStruct((b, h, lp, 1), jnp.float32)],
        ),
        "dq": (q_side("seq", dp), q),
        # Per query head ([b, h, ...] like q; fp32 when grouped): the caller sums each
        # group's heads into its K/V head's gradient.
        "dkv": ([kv_side("seq", dp)] * 2, [_grad_shape(q, k, cfg)] * 2),
    }[kind]
    kernel = {"fwd": _fwd_kernel, "dq": _dq_kernel, "dkv": _dkv_kernel}[kind]
    return pl.pallas_call(
        functools.partial(kernel, cfg=dataclasses.replace(cfg, layout=layout), n_q=n_q, n_k=n_k),
        grid=layout.grid(b, h, n_q if by_q else n_k),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), out_shape),
        compiler_params=_compiler_params(cfg, dp),
        interpret=cfg.interpret,
        name=f"flash_attention_{kind}",
    )(*operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, cfg):
    return _flash_fwd(q, k, v, q_seg, kv_seg, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, cfg):
    segs = () if q_seg is None else (q_seg, kv_seg)
    o, lse = _launch("fwd", cfg, _dims(q, cfg.layout), (q, k, v, *segs))  # lse [b, h, lp, 1]
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, q_seg, kv_seg, o, lse = res
    # delta_i = sum_d dO_i * O_i, the softmax-backward row term (FA2 Alg. 2, line 4).
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    delta = (jnp.swapaxes(delta, 1, 2) if cfg.layout.target == "gpu" else delta)[..., None]
    operands = (q, k, v, do, lse, delta) + (() if q_seg is None else (q_seg, kv_seg))
    dims = _dims(q, cfg.layout)
    dq = _launch("dq", cfg, dims, operands)
    dk, dv = _launch("dkv", cfg, dims, operands)
    return dq, _sum_groups(dk, k, cfg.layout), _sum_groups(dv, v, cfg.layout), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pick_blocks(target, interpret, head_dim, length, block_q, block_k):
    """(fwd_q, fwd_k, bwd_q, bwd_k) block sizes, user sizes overriding the defaults."""
    table = _DEFAULT_BLOCKS["cpu" if interpret and target == "gpu" else target]
    fwd, bwd = table[0 if head_dim <= 128 else 1], table[2 if head_dim <= 128 else 3]
    blocks = [block_q or fwd[0], block_k or fwd[1], block_q or bwd[0], block_k or bwd[1]]
    # Short sequences: no block longer than the (power-of-two rounded) sequence.
    cap = max(_MIN_BLOCK[target], pl.next_power_of_2(length))
    # User blocks below the compiled target's minimum (e.g. 16, fine for Triton and the
    # interpreter, under kernel_target="auto" traced for Mosaic too) are raised to it.
    low = 0 if interpret else _MIN_BLOCK[target]
    return tuple(max(low, min(b, cap)) for b in blocks)


def flash_attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    causal=True,
    scale=None,
    block_q=None,
    block_k=None,
    kernel_target="auto",
    window=None,
):
    """Flash attention for training and prefill; equals ``reference.segment_attention``.

    Args:
      q: ``[batch, length, heads, head_dim]``, fp32 or bf16 (softmax in fp32).
      k, v: ``[batch, length, kv_heads, head_dim]``; ``kv_heads`` divides ``heads`` and
        query head ``h`` reads K/V head ``h // (heads / kv_heads)`` (grouped-query
        attention, transformers' order), without repeating K/V in memory.
      segment_ids: optional ``[batch, length]`` int, 0 = padding; a query attends a key
        only when both carry the same non-zero id. None: one document, no padding.
      causal: mask keys at later slots than the query (and skip those blocks).
      scale: logit scale (a Python float), ``head_dim ** -0.5`` by default.
      block_q, block_k: query/key block sizes (powers of two); None picks per backend.
        User sizes apply to the forward and both backward kernels; below a compiled
        target's minimum (Mosaic 128, Triton 16) they are an error for an explicit
        ``kernel_target`` and raised to the minimum under "auto".
      kernel_target: "auto" (Mosaic when lowered for TPU, Triton for GPU, the
        interpreter for CPU; see ``neox_jax.kernels.target``), or "tpu", "gpu",
        "interpret" to force one.
      window: sliding window (causal only): a query at slot ``i`` sees keys at slots
        ``> i - window`` (Mistral); blocks wholly outside it are skipped. None: full.

    Returns:
      ``[batch, length, heads, head_dim]`` in ``q.dtype``. Padding queries (segment id
      0) get the reference's value, the mean of ``v`` (a uniform softmax over keys that
      are all masked), so outputs and gradients match the reference everywhere.
    """
    if q.ndim != 4 or k.shape != v.shape or k.shape[:2] + k.shape[3:] != q.shape[:2] + q.shape[3:]:
        raise ValueError(
            f"q must be [batch, length, heads, head_dim] and k, v [batch, length, kv_heads, "
            f"head_dim]: {q.shape}, {k.shape}, {v.shape}"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"kv_heads {k.shape[2]} must divide heads {q.shape[2]}")
    if window is not None and (not causal or int(window) < 1):
        raise ValueError(f"window must be a positive int with causal=True, got {window!r}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, length, _, head_dim = q.shape
    if segment_ids is not None and segment_ids.shape != (batch, length):
        raise ValueError(
            f"segment_ids must be [batch, length] = {(batch, length)}, got {segment_ids.shape}"
        )
    user = [b for b in (block_q, block_k) if b]
    if any(b & (b - 1) for b in user):
        raise ValueError(f"block sizes must be powers of two, got {block_q}, {block_k}")
    minimum = _MIN_BLOCK.get(kernel_target, 0)  # "auto" raises them per target instead
    if user and min(user) < minimum:
        raise ValueError(f"{kernel_target} kernels need blocks >= {minimum}, got {user}")
    attention = lambda layout, interpret, q, k, v, seg: _attention(  # noqa: E731
        q, k, v, seg, causal, scale, (block_q, block_k), layout, interpret, window
    )
    return dispatch(kernel_target, attention, q, k, v, segment_ids)


def _attention(q, k, v, segment_ids, causal, scale, user_blocks, target, interpret, window=None):
    """flash_attention for an explicit target ("gpu" or "tpu" layout); tests use both."""
    batch, length, _, head_dim = q.shape
    blocks = _pick_blocks(target, interpret, head_dim, length, *user_blocks)
    padded_len = -(-length // max(blocks)) * max(blocks)
    # Triton needs power-of-two tile dims, so head_dim 80 and 96 (Pythia-2.8B,
    # GPT-NeoX-20B) run padded to 128 with zeros: zero columns of q and k add nothing to
    # the logits, zero columns of v give zero outputs, which are sliced off. The scale
    # stays that of the true head_dim. Mosaic likes the same lane-friendly sizes.
    padded_dim = max(16, pl.next_power_of_2(head_dim))
    seg = _padded_segments(segment_ids, batch, length, padded_len)
    cfg = _Config(
        layout=_Layout(target, groups=q.shape[2] // k.shape[2]),
        causal=causal,
        scale=float(head_dim**-0.5 if scale is None else scale),
        block_q=blocks[0],
        block_k=blocks[1],
        bwd_block_q=blocks[2],
        bwd_block_k=blocks[3],
        interpret=interpret,
        has_segments=seg is not None,
        window=None if window is None else int(window),
    )
    pad = ((0, 0), (0, padded_len - length), (0, 0), (0, padded_dim - head_dim))
    qp, kp, vp = (cfg.layout.to_kernel(jnp.pad(x, pad)) for x in (q, k, v))
    q_seg, kv_seg = (None, None) if seg is None else (seg[:, :, None], seg[:, None, :])
    out = _flash(qp, kp, vp, q_seg, kv_seg, cfg)
    out = cfg.layout.to_kernel(out)[:, :length, :, :head_dim]  # (its own inverse)
    if segment_ids is not None:
        # The kernel returns 0 for rows with no visible key; the reference returns a
        # uniform average of all keys (its finite MASK_VALUE softmax). Match it here,
        # in plain jnp so autodiff adds the matching dv term.
        mean_v = jnp.mean(v.astype(jnp.float32), axis=1, keepdims=True).astype(out.dtype)
        mean_v = jnp.repeat(mean_v, cfg.layout.groups, axis=2)  # [b, 1, h, d]: tiny
        out = jnp.where((segment_ids == 0)[:, :, None, None], mean_v, out)
    return out


def _padded_segments(segment_ids, batch, length, padded_len):
    """[batch, padded_len] int32 segment ids with 0 on padded slots, or None if unneeded."""
    if segment_ids is None:
        if padded_len == length:
            return None  # no padding and no documents: the kernels skip segment masking
        segment_ids = jnp.ones((batch, length), jnp.int32)
    return jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded_len - length)))

"""Flash attention (forward + backward) in Pallas for training and prefill.

Same contract as ``reference.segment_attention``: ``[batch, length, heads, head_dim]``
inputs, segment ids (0 = padding), causality by slot, fp32 logits and softmax,
scale ``head_dim ** -0.5``. FlashAttention-2 (Dao, 2023, arXiv 2307.08691): the
forward keeps a running max ``m`` and sum ``l`` per query row (online softmax) and
stores ``lse = m + log(l)``; the backward recomputes the probabilities from ``lse``
in two kernels, one per query block for dq and one per key block for dk/dv, so no
kernel needs atomics. ``jax.grad`` cannot go through ``pallas_call``, hence the
``custom_vjp``.

Two schedules of the same tiles (``flash_blocks``). Triton (GPU) and the interpreter
(CPU): every kernel owns one block of rows and loops over the blocks of the other side
with ``fori_loop``, reading them from a whole-sequence ref of its (batch, head) that
stays in HBM. Mosaic (TPU) copies every block of a ``BlockSpec`` into VMEM, so there
the other side is streamed through a grid axis instead, with the running statistics
in VMEM scratch (``flash_stream``): VMEM use does not grow with the sequence. Under
causality both skip the blocks above the diagonal (and outside a sliding window) and
mask only the blocks on it. Which one a program gets follows the platform it is
lowered for (``neox_jax.kernels.target``); ``flash_layout.Layout`` holds the array
layout and grid order per target.

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
from jax.experimental.pallas import triton as pltriton

from neox_jax.kernels import flash_stream
from neox_jax.kernels.flash_blocks import (
    block_mask,
    dkv_update,
    dq_update,
    fwd_init,
    fwd_store,
    fwd_update,
    visible_blocks,
)
from neox_jax.kernels.flash_layout import Layout as _Layout
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
    """Triton's compiler parameters; None when interpreting (TPU: ``flash_stream``)."""
    if cfg.interpret:
        return None
    # Wider heads need more warps to keep the [block, head_dim] tiles in registers.
    return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _split_refs(refs, n_in, has_segments):
    """(inputs, (q_seg_ref, kv_seg_ref) or Nones, outputs) from a kernel's refs."""
    n_seg = 2 if has_segments else 0
    ins, segs, outs = refs[:n_in], refs[n_in : n_in + n_seg], refs[n_in + n_seg :]
    return ins, (tuple(segs) if segs else (None, None)), outs


def _rows(start, size):
    return pl.ds(pl.multiple_of(start, size), size)


def _run_loops(body, carry, cfg, i, rows_block, cols_block, n_cols, rows_are_queries):
    """fori_loop(s) of ``body(j, carry, causal)`` over the visible blocks: under
    causality, blocks below the diagonal run without the causal mask, blocks on it
    with the mask, and blocks above it (or outside the window) are never visited."""
    lo, hi, plain_lo, plain_hi = visible_blocks(
        cfg, i, rows_block, cols_block, n_cols, rows_are_queries
    )
    loop = lambda a, b, causal, c: lax.fori_loop(a, b, functools.partial(body, causal=causal), c)  # noqa: E731
    if not cfg.causal:
        return loop(0, n_cols, False, carry)
    if cfg.window is not None:
        return loop(lo, hi, True, carry)
    if rows_are_queries:  # [0, full) unmasked, then the diagonal blocks
        return loop(plain_hi, hi, True, loop(plain_lo, plain_hi, False, carry))
    return loop(plain_lo, plain_hi, False, loop(lo, plain_lo, True, carry))


def _fwd_kernel(*refs, cfg, n_q, n_k):
    (q_ref, k_ref, v_ref), (qs_ref, ks_ref), (o_ref, lse_ref) = _split_refs(
        refs, 3, cfg.has_segments
    )
    bq, bk = cfg.block_q, cfg.block_k
    i = cfg.layout.block_id(n_q)
    q = q_ref[...]  # [bq, dp]
    q_seg = None if qs_ref is None else qs_ref[...]  # [bq, 1]

    def body(j, carry, causal):
        k = k_ref[_rows(j * bk, bk), :]  # [bk, dp]
        v = v_ref[_rows(j * bk, bk), :]

        def mask_fn():
            kv_seg = None if ks_ref is None else ks_ref[:, _rows(j * bk, bk)]  # [1, bk]
            return block_mask(q_seg, kv_seg, i * bq, j * bk, (bq, bk), causal, cfg.window)

        return fwd_update(q, k, v, carry, cfg.scale, mask_fn)

    carry = fwd_init(bq, q.shape[1])
    m, row_sum, acc = _run_loops(body, carry, cfg, i, bq, bk, n_k, rows_are_queries=True)
    fwd_store(o_ref, lse_ref, m, row_sum, acc)


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
        starts = i * bq, j * bk
        mask_fn = lambda: block_mask(q_seg, kv_seg, *starts, (bq, bk), causal, cfg.window)  # noqa: E731
        return dq_update(dq, q, k, v, do, lse, delta, cfg.scale, mask_fn)

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
        rows = _rows(i * bq, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]  # [bq, dp]
        q_seg = None if qs_ref is None else qs_ref[rows, :]
        lse, starts = lse_ref[rows, :], (i * bq, j * bk)
        mask_fn = lambda: block_mask(q_seg, kv_seg, *starts, (bq, bk), causal, cfg.window)  # noqa: E731
        delta_fn = lambda: delta_ref[rows, :]  # noqa: E731
        return dkv_update(carry, q, k, v, do, lse, delta_fn, cfg.scale, mask_fn)

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
    if cfg.layout.target == "tpu":  # Mosaic: stream both sides through the grid
        return flash_stream.launch(kind, cfg, dims, operands, _grad_shape(*operands[:2], cfg))
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

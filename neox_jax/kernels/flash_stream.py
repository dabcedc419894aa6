"""The flash attention kernels for TPU (Mosaic): both sides streamed through the grid.

The Triton kernels of ``flash_attention.py`` loop over the other side's blocks inside
one program, reading them from a whole-sequence ref; on a GPU that ref stays in HBM.
On a TPU a block of a ``BlockSpec`` is copied into VMEM, so a whole-sequence slab of
K/V costs ``length x head_dim`` per operand (8 MiB of bf16 at 32k x 128, double
buffered) and a 32k step does not compile. Here the other side's block index is the
grid's last dimension instead ("arbitrary": sequential on one core), and the
per-row state lives in VMEM scratch across it:

* forward, grid ``(batch, heads, q blocks, kv blocks)``: running max ``m``, sum
  ``l`` and the ``[block_q, head_dim]`` fp32 accumulator; output and logsumexp are
  written at the last kv block.
* dq, same grid: the ``[block_q, head_dim]`` fp32 dq accumulator.
* dk/dv, grid ``(batch, heads, kv blocks, q blocks)``: two ``[block_k, head_dim]``
  fp32 accumulators.

VMEM use is a few blocks, independent of the sequence length. Causal and
sliding-window block skipping: a grid step whose block holds no visible pair does
no compute (``pl.when``), and its index map clamps the block index into the visible
range, so consecutive skipped steps name the block already resident and the pipeline
issues no copy for them. The tile math is ``flash_blocks``', shared with the Triton
kernels, so both schedules give the same results (tests run this one interpreted).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from neox_jax.kernels.flash_blocks import (
    block_mask,
    dkv_update,
    dq_update,
    fwd_init,
    fwd_store,
    fwd_update,
    visible_blocks,
)


def _run_visible(cfg, step, i, j, rows_block, cols_block, n_cols, rows_are_queries):
    """``step(causal)`` at grid step (row block i, column block j) if j holds a visible
    pair: unmasked below the diagonal, masked on it or at a window's edge."""
    lo, hi, plain_lo, plain_hi = visible_blocks(
        cfg, i, rows_block, cols_block, n_cols, rows_are_queries
    )
    plain = (j >= plain_lo) & (j < plain_hi)
    pl.when(plain)(lambda: step(False))
    if cfg.causal:
        pl.when((j >= lo) & (j < hi) & jnp.logical_not(plain))(lambda: step(True))


def _segments(seg_refs):
    return (None, None) if seg_refs[0] is None else (seg_refs[0][...], seg_refs[1][...])


def _mask(cfg, seg_refs, q_start, k_start, shape, causal):
    return block_mask(*_segments(seg_refs), q_start, k_start, shape, causal, cfg.window)


def _fwd_kernel(*refs, cfg, n_k):
    n_seg = 2 if cfg.has_segments else 0
    q_ref, k_ref, v_ref = refs[:3]
    seg_refs = refs[3 : 3 + n_seg] if n_seg else (None, None)
    o_ref, lse_ref, m_scr, l_scr, acc_scr = refs[3 + n_seg :]
    bq, bk = cfg.block_q, cfg.block_k
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...], l_scr[...], acc_scr[...] = fwd_init(bq, acc_scr.shape[1])

    def step(causal):
        mask_fn = functools.partial(_mask, cfg, seg_refs, i * bq, j * bk, (bq, bk), causal)

        carry = (m_scr[...], l_scr[...], acc_scr[...])
        carry = fwd_update(q_ref[...], k_ref[...], v_ref[...], carry, cfg.scale, mask_fn)
        m_scr[...], l_scr[...], acc_scr[...] = carry

    _run_visible(cfg, step, i, j, bq, bk, n_k, rows_are_queries=True)

    @pl.when(j == n_k - 1)
    def _finish():
        fwd_store(o_ref, lse_ref, m_scr[...], l_scr[...], acc_scr[...])


def _dq_kernel(*refs, cfg, n_k):
    n_seg = 2 if cfg.has_segments else 0
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    seg_refs = refs[6 : 6 + n_seg] if n_seg else (None, None)
    dq_ref, dq_scr = refs[6 + n_seg :]
    bq, bk = cfg.bwd_block_q, cfg.bwd_block_k
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def step(causal):
        mask_fn = lambda: block_mask(
            *_segments(seg_refs), i * bq, j * bk, (bq, bk), causal, cfg.window
        )  # noqa: E731
        dq_scr[...] = dq_update(
            dq_scr[...], q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...],
            delta_ref[...], cfg.scale, mask_fn,
        )  # fmt: skip

    _run_visible(cfg, step, i, j, bq, bk, n_k, rows_are_queries=True)

    @pl.when(j == n_k - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg, n_q):
    n_seg = 2 if cfg.has_segments else 0
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    seg_refs = refs[6 : 6 + n_seg] if n_seg else (None, None)
    dk_ref, dv_ref, dk_scr, dv_scr = refs[6 + n_seg :]
    bq, bk = cfg.bwd_block_q, cfg.bwd_block_k
    j, i = pl.program_id(2), pl.program_id(3)  # this key block, the query block streamed

    @pl.when(i == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def step(causal):
        mask_fn = lambda: block_mask(
            *_segments(seg_refs), i * bq, j * bk, (bq, bk), causal, cfg.window
        )  # noqa: E731
        dk_scr[...], dv_scr[...] = dkv_update(
            (dk_scr[...], dv_scr[...]), q_ref[...], k_ref[...], v_ref[...], do_ref[...],
            lse_ref[...], lambda: delta_ref[...], cfg.scale, mask_fn,
        )  # fmt: skip

    _run_visible(cfg, step, j, i, bk, bq, n_q, rows_are_queries=False)

    @pl.when(i == n_q - 1)
    def _finish():
        dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _specs(cfg, by_q, bq, bk, dp, n_cols):
    """BlockSpec factory for grid (b, h, row block r, column block c).

    Rows are query blocks when ``by_q`` (forward, dq) and key blocks otherwise (dk/dv).
    The column side's block index is clamped into the visible range of row block r.
    Query head h reads K/V head h // groups (grouped-query attention, never repeated).
    """
    groups = cfg.layout.groups

    def column(r, c):
        lo, hi, _, _ = visible_blocks(cfg, r, bq if by_q else bk, bk if by_q else bq, n_cols, by_q)
        return jnp.clip(c, lo, hi - 1)

    def q_block(r, c):  # the query block of grid step (r, c)
        return r if by_q else column(r, c)

    def k_block(r, c):
        return column(r, c) if by_q else r

    maps = {
        "q": ((None, None, bq, dp), lambda b, h, r, c: (b, h, q_block(r, c), 0)),
        "kv": ((None, None, bk, dp), lambda b, h, r, c: (b, lax.div(h, groups), k_block(r, c), 0)),
        "kv_grad": ((None, None, bk, dp), lambda b, h, r, c: (b, h, k_block(r, c), 0)),
        "stat": ((None, None, bq, 1), lambda b, h, r, c: (b, h, q_block(r, c), 0)),
        "qseg": ((None, bq, 1), lambda b, h, r, c: (b, q_block(r, c), 0)),
        "kvseg": ((None, 1, bk), lambda b, h, r, c: (b, 0, k_block(r, c))),
    }
    return lambda kind: pl.BlockSpec(*maps[kind])


def launch(kind, cfg, dims, operands, grad_shape):
    """Run the "fwd", "dq" or "dkv" kernel on ``[b, h, lp, dp]`` operands (the TPU
    layout): q, k, v, then (do, lse, delta) for the backward, then (q_seg, kv_seg)."""
    b, h, lp, dp = dims
    bq, bk = (cfg.block_q, cfg.block_k) if kind == "fwd" else (cfg.bwd_block_q, cfg.bwd_block_k)
    n_q, n_k = lp // bq, lp // bk
    by_q = kind != "dkv"
    spec = _specs(cfg, by_q, bq, bk, dp, n_k if by_q else n_q)
    in_specs = [spec("q"), spec("kv"), spec("kv")]
    if kind != "fwd":
        in_specs += [spec("q"), spec("stat"), spec("stat")]
    if cfg.has_segments:
        in_specs += [spec("qseg"), spec("kvseg")]
    q = operands[0]
    f32 = jnp.float32
    out_specs, out_shape, scratch = {
        "fwd": (
            [spec("q"), spec("stat")],
            [q, jax.ShapeDtypeStruct((b, h, lp, 1), f32)],
            [pltpu.VMEM((bq, 1), f32), pltpu.VMEM((bq, 1), f32), pltpu.VMEM((bq, dp), f32)],
        ),
        "dq": (spec("q"), q, [pltpu.VMEM((bq, dp), f32)]),
        # Per query head, like q (fp32 when grouped): the caller sums each group.
        "dkv": ([spec("kv_grad")] * 2, [grad_shape] * 2, [pltpu.VMEM((bk, dp), f32)] * 2),
    }[kind]
    kernel = {
        "fwd": functools.partial(_fwd_kernel, cfg=cfg, n_k=n_k),
        "dq": functools.partial(_dq_kernel, cfg=cfg, n_k=n_k),
        "dkv": functools.partial(_dkv_kernel, cfg=cfg, n_q=n_q),
    }[kind]
    grid = (b, h, n_q, n_k) if by_q else (b, h, n_k, n_q)
    params = None
    if not cfg.interpret:
        # Rows of different (batch, head, row block) are independent and may be split
        # across TensorCores (megacore); the streamed axis accumulates in scratch.
        semantics = ("parallel", "parallel", "parallel", "arbitrary")
        params = pltpu.CompilerParams(dimension_semantics=semantics)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), out_shape),
        compiler_params=params,
        interpret=cfg.interpret,
        name=f"flash_attention_{kind}",
    )(*operands)

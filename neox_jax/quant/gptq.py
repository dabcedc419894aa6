"""GPTQ for one weight matrix (Frantar, Ashkboos, Hoefler & Alistarh 2022, arXiv:2210.17323).

GPTQ minimises the layer's output error ``||W X - Q X||^2`` over the calibration inputs
``X`` of that layer, one weight matrix at a time (§3, "layer-wise quantization"). In the
paper's layout ``W`` is ``[d_row, d_col]`` (outputs x inputs), which is exactly our stored
layout ``[N, K]``; the Hessian of the objective is ``H = 2 X X^T`` (``[K, K]``).

Algorithm 1, as implemented here:

* §4 Step 1 (arbitrary order): every row is quantized in the same column order, so
  the inverse Hessian is shared by all rows; columns go left to right, or, with
  ``act_order``, by decreasing ``diag(H)`` (the reference code's heuristic).
* Each column ``j`` is rounded to the grid, and its error, divided by ``[H^-1]_jj``, is
  spread over the not-yet-quantized columns through row ``j`` of ``H^-1`` (the OBS
  update, Eq. 2-3), so later columns compensate for earlier rounding.
* §4 Step 3 (Cholesky): the rows of the upper Cholesky factor ``U`` of ``H^-1``
  (``H^-1 = U^T U``) are exactly the update vectors of the sequential elimination, so
  ``U`` is computed once; ``H`` is damped by ``damp * mean(diag H)`` first (1% in the
  paper) for numerical stability.
* §4 Step 2 (lazy batches): updates inside a block of ``block_size`` columns are
  applied eagerly to the block only; the rest of the matrix gets one rank-``block``
  update per block (a matmul instead of ``block`` rank-1 updates).
* Groups (§5, "grouping"): a group's scale and zero point are computed from the
  current, already error-compensated weights when the loop reaches the group's first
  column. With ``act_order`` the groups' grids are fixed up front from the original
  weights ("static groups"), so each group stays a contiguous range of input rows
  and the storage format does not change.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from neox_jax.quant.config import QuantConfig, QuantizationError
from neox_jax.quant.core import QuantizedWeight, quant_grid, quantize_codes, store_codes


def hessian(x_sum_outer: jax.Array, count: int) -> jax.Array:
    """``H = 2 X X^T / n`` from ``sum_t x_t x_t^T`` over ``n`` calibration tokens (§3)."""
    return 2.0 * x_sum_outer / max(count, 1)


def _block_size(cols: int, block: int, unit: int) -> int:
    """Largest multiple of ``unit`` dividing ``cols`` and at most ``max(block, unit)``."""
    best = unit
    for b in range(unit, max(block, unit) + 1, unit):
        if cols % b == 0:
            best = b
    return best


@functools.partial(
    jax.jit,
    static_argnames=("bits", "group_size", "symmetric", "damp", "block", "act_order", "sdtype"),
)
def gptq_matrix(w, h, *, bits, group_size, symmetric, damp, block, act_order, sdtype):
    """Quantize ``w [R, C]`` (rows = outputs) given ``h [C, C]``; see the module docstring.

    Returns:
      ``(codes [R, C] int32, scale [R, S], zero [R, S] uint8 or None)``, S = C / group_size.
    """
    rows, cols = w.shape
    n_groups = cols // group_size
    w = w.astype(jnp.float32)
    h = h.astype(jnp.float32)
    # Inputs that never fire carry no information: pin their Hessian diagonal and
    # zero the weights (the reference implementation does the same).
    dead = jnp.diagonal(h) == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    w = jnp.where(dead[None, :], 0.0, w)

    static = act_order or n_groups == 1
    s_fixed, z_fixed = quant_grid(w.reshape(rows, n_groups, group_size), bits, symmetric, sdtype)
    if z_fixed is None:
        z_fixed = jnp.zeros_like(s_fixed, jnp.uint8)
    perm = jnp.argsort(-jnp.diagonal(h)) if act_order else jnp.arange(cols)
    if act_order:
        w, h = w[:, perm], h[perm][:, perm]
    group_of = perm // group_size  # [C]: the (original) group of each processed column

    h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(cols, dtype=jnp.float32)
    chol = jnp.linalg.cholesky(h)
    h_inv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(cols, dtype=jnp.float32))
    u = jnp.linalg.cholesky(h_inv).T  # upper: H^-1 = U^T U

    def column(i, carry, i1):
        w1, q1, err1, scale, zero = carry  # [R, B], [R, B], [R, B], [R, S], [R, S]
        g = group_of[i1 + i]
        if not static:  # a new group starts: its grid from the compensated weights

            def new_grid(sz):
                wg = lax.dynamic_slice_in_dim(w1, i, group_size, axis=1)  # [R, gs]
                s, z = quant_grid(wg, bits, symmetric, sdtype)
                z = jnp.zeros_like(s, jnp.uint8) if z is None else z
                return sz[0].at[:, g].set(s), sz[1].at[:, g].set(z)

            scale, zero = lax.cond(i % group_size == 0, new_grid, lambda sz: sz, (scale, zero))
        s, z = scale[:, g], None if symmetric else zero[:, g]
        wcol = w1[:, i]
        qcol = quantize_codes(wcol, s, z, bits)  # [R]
        deq = (qcol - (0 if z is None else z.astype(jnp.int32))) * s.astype(jnp.float32)
        err = (wcol - deq) / u[i1 + i, i1 + i]
        # OBS update of the block's later columns (U is upper triangular, so earlier
        # columns, already quantized, receive zeros).
        w1 = w1 - err[:, None] * lax.dynamic_slice(u, (i1 + i, i1), (1, w1.shape[1]))
        return w1, q1.at[:, i].set(qcol), err1.at[:, i].set(err), scale, zero

    def block_step(b, carry):
        w, q, scale, zero = carry
        i1 = b * block
        w1 = lax.dynamic_slice_in_dim(w, i1, block, axis=1)
        init = (w1, jnp.zeros_like(w1, jnp.int32), jnp.zeros_like(w1), scale, zero)
        _, q1, err1, scale, zero = lax.fori_loop(0, block, functools.partial(column, i1=i1), init)
        q = lax.dynamic_update_slice_in_dim(q, q1, i1, axis=1)
        # Lazy batch update (§4 Step 2) of every later column at once; columns of this
        # and earlier blocks get garbage too, but they are already quantized.
        w = w - err1 @ lax.dynamic_slice_in_dim(u, i1, block, axis=0)
        return w, q, scale, zero

    init = (w, jnp.zeros((rows, cols), jnp.int32), s_fixed, z_fixed)
    _, q, scale, zero = lax.fori_loop(0, cols // block, block_step, init)
    if act_order:
        q = q[:, jnp.argsort(perm)]
    return q, scale, None if symmetric else zero


def gptq_quantize(
    w: jax.Array,
    h: jax.Array,
    qconfig: QuantConfig,
    *,
    name: str = "a weight",
) -> QuantizedWeight:
    """GPTQ-quantize a kernel ``w [K, N]`` given the Hessian ``h [K, K]`` of its inputs.

    Args:
      w: the float kernel of one layer, ``[in, out]``.
      h: ``2 X X^T / n`` over that layer's calibration inputs (see ``hessian``).
      qconfig: bits, group size, symmetry and the GPTQ options.
      name: for error messages.

    Returns:
      A kernel-layout ``QuantizedWeight`` (same format as round-to-nearest).
    """
    k, n = w.shape
    if h.shape != (k, k):
        raise QuantizationError(f"{name}: Hessian {h.shape} does not match kernel {w.shape}")
    group = qconfig.group_for(k, name)
    static = qconfig.gptq_act_order or group == k
    block = _block_size(k, qconfig.gptq_block_size, 1 if static else group)
    q, scale, zero = gptq_matrix(
        w.T,
        h,
        bits=qconfig.bits,
        group_size=group,
        symmetric=qconfig.symmetric,
        damp=float(qconfig.gptq_damp),
        block=block,
        act_order=qconfig.gptq_act_order,
        sdtype=qconfig.scale_jnp_dtype,
    )
    return QuantizedWeight(
        qvalue=store_codes(q, qconfig.bits, qconfig.symmetric),
        scale=scale,
        zero=zero,
        bits=qconfig.bits,
        group_size=group,
        shape=(k, n),
        transposed=True,
        impl=qconfig.matmul_impl,
    )

"""Pallas quantized matmul: ``x [M, K]`` (bf16/fp32) times an int8/int4 weight stored ``[N, K]``.

Each program owns one ``[block_m, block_n]`` output tile and walks K in steps of
``block_k`` input rows: it loads the codes of a ``[block_n, block_k]`` weight tile
(``block_k / 2`` bytes per row for 4 bits), dequantizes it on chip with the tile's scale
column (``block_k`` divides the group size, so a tile lies in one group and needs one
scale per output row), and accumulates ``x_tile @ w_tile^T`` in fp32. The weight is
read from memory once, as codes; nothing float-sized of it is ever written, which is
the point when decoding is memory-bound. The loop over K lives inside the program (a
GPU grid has no sequential axis to accumulate over).

4-bit codes of input rows ``2j`` and ``2j + 1`` share a byte, so the activations are
split into even and odd columns once per call (``[M, K / 2]`` each, cheap next to the
weight) and each tile does two dots, one per nibble, instead of interleaving columns
on chip.

Which compiler runs it follows the platform the call is lowered for
(``neox_jax.kernels.target``): Triton for CUDA/ROCm (tile sides are powers of two and
``block_m >= 16`` for ``tl.dot``), Mosaic for TPU, the Pallas interpreter for CPU.
Mosaic must prove every lane offset aligned, which the loop's dynamic column and
scale offsets are not: on TPU the K loop is unrolled, so every slice is static, and
an output block is 128 lanes (or all of N) wide. Gradients (QLoRA) go through a
``custom_vjp`` whose backward is the XLA path's.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from neox_jax.kernels.target import dispatch
from neox_jax.model import axes
from neox_jax.model.per_device import per_device
from neox_jax.quant.config import QuantizationError
from neox_jax.quant.dequant_matmul import xla_matmul

_BLOCK_N = (128, 64, 32, 16)
_BLOCK_K = (256, 128, 64, 32)  # >= 32 so a 4-bit tile is >= 16 bytes wide (tl.dot's minimum)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one call (hashable: a nondiff argument of the custom_vjp)."""

    bits: int
    symmetric: bool
    group_size: int
    shape: tuple[int, int]  # (K, N) of the kernel
    block_m: int
    block_n: int
    block_k: int
    interpret: bool
    target: str = "gpu"  # "gpu" (Triton, or interpreted) or "tpu" (Mosaic)


def _dot_t(a, b):
    """``a [m, k] @ b[n, k]^T`` accumulated in fp32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _kernel(*refs, plan: _Plan):
    n_x = 1 if plan.bits == 8 else 2
    x_refs, q_ref, s_ref = refs[:n_x], refs[n_x], refs[n_x + 1]
    z_ref = None if plan.symmetric else refs[n_x + 2]
    o_ref = refs[-1]
    bk = plan.block_k
    width = bk if plan.bits == 8 else bk // 2  # columns of x / bytes of q per step
    tiles_per_group = plan.group_size // bk
    compute = x_refs[0].dtype

    def dequant(c, group):  # c: [block_n, width] int32 codes -> compute dtype
        if z_ref is not None:
            c = c - z_ref[:, pl.ds(group, 1)].astype(jnp.int32)
        return (c.astype(jnp.float32) * s_ref[:, pl.ds(group, 1)].astype(jnp.float32)).astype(
            compute
        )

    def body(t, acc):
        if isinstance(t, int):
            group, cols = t // tiles_per_group, pl.ds(t * width, width)
        else:
            group = lax.div(t, tiles_per_group)
            cols = pl.ds(pl.multiple_of(t * width, width), width)
        v = q_ref[:, cols].astype(jnp.int32)  # [block_n, width]
        if plan.bits == 8:
            return acc + _dot_t(x_refs[0][:, cols], dequant(v, group))
        lo, hi = v & 15, v >> 4
        if plan.symmetric:
            lo, hi = (lo ^ 8) - 8, (hi ^ 8) - 8
        acc = acc + _dot_t(x_refs[0][:, cols], dequant(lo, group))
        return acc + _dot_t(x_refs[1][:, cols], dequant(hi, group))

    acc = jnp.zeros((plan.block_m, plan.block_n), jnp.float32)
    if plan.target == "tpu":
        # Mosaic needs provably aligned lane offsets: unroll, so every slice is static.
        for t in range(plan.shape[0] // bk):
            acc = body(t, acc)
    else:
        acc = lax.fori_loop(0, plan.shape[0] // bk, body, acc)
    o_ref[...] = acc.astype(o_ref.dtype)


def _forward(x, qvalue, scale, zero, plan: _Plan):
    m, k = x.shape
    n = plan.shape[1]
    bm, bn = plan.block_m, plan.block_n
    pad = -m % bm
    x = jnp.pad(x, ((0, pad), (0, 0))) if pad else x
    xs = [x] if plan.bits == 8 else [x[:, 0::2], x[:, 1::2]]  # [Mp, K] or 2 x [Mp, K/2]
    x_specs = [pl.BlockSpec((bm, a.shape[1]), lambda i, j: (i, 0)) for a in xs]
    row_spec = lambda a: pl.BlockSpec((bn, a.shape[1]), lambda i, j: (j, 0))
    operands = [*xs, qvalue, scale] + ([] if zero is None else [zero])
    compiler_params = None
    if plan.interpret:
        pass
    elif plan.target == "tpu":
        compiler_params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    else:
        compiler_params = pltriton.CompilerParams(num_warps=4, num_stages=2)
    out = pl.pallas_call(
        functools.partial(_kernel, plan=plan),
        grid=(x.shape[0] // bm, n // bn),
        in_specs=[*x_specs, *(row_spec(a) for a in operands[len(xs) :])],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((x.shape[0], n), x.dtype),
        compiler_params=compiler_params,
        interpret=plan.interpret,
        name=f"quantized_matmul_int{plan.bits}",
    )(*operands)
    return out[:m]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _qmm(x, qw, plan):
    return _forward(x, qw.qvalue, qw.scale, qw.zero, plan)


def _qmm_fwd(x, qw, plan):
    return _qmm(x, qw, plan), (x, qw)


def _qmm_bwd(plan, res, g):
    # pallas_call has no autodiff rule; the XLA path computes the same function, so its
    # VJP is the exact gradient: dx = g @ W, dscale = sum over each group of dW * codes.
    x, qw = res
    f = lambda x, s: xla_matmul(x, qw.replace(scale=s), x.dtype)  # noqa: E731
    _, vjp = jax.vjp(f, x, qw.scale)
    dx, dscale = vjp(g.astype(x.dtype))
    float0 = lambda a: None if a is None else np.zeros(a.shape, jax.dtypes.float0)  # noqa: E731
    return dx, qw.replace(qvalue=float0(qw.qvalue), scale=dscale, zero=float0(qw.zero))


_qmm.defvjp(_qmm_fwd, _qmm_bwd)


def _largest_dividing(candidates, n):
    return next((c for c in candidates if n % c == 0), 0)


def make_plan(m: int, qw, *, block_m=None, block_n=None, block_k=None,
              interpret=False, target="gpu") -> _Plan:  # fmt: skip
    """Tile sizes for ``[m, K] @ qw`` (a ``QuantizedWeight``); ``QuantizationError`` if none fit.

    ``target``: "gpu" (Triton's layout, also the interpreter's) or "tpu" (Mosaic: an
    output block's lane dim is a multiple of 128 or all of N).
    """
    k, n = qw.shape
    bm = block_m or (16 if m <= 16 else 32 if m <= 32 else 64)
    bn = block_n or _largest_dividing(_BLOCK_N, n)
    if target == "tpu" and not block_n:
        bn = 128 if n % 128 == 0 else n
    bk = block_k or _largest_dividing(_BLOCK_K, qw.group_size)
    if not bn or n % bn:
        raise QuantizationError(
            f"Pallas quantized matmul: no block of {_BLOCK_N} divides the output size {n}; "
            "use matmul_impl='xla' for this weight."
        )
    if not bk or qw.group_size % bk:
        raise QuantizationError(
            f"Pallas quantized matmul: no K block of {_BLOCK_K} divides the group size "
            f"{qw.group_size}; use matmul_impl='xla' or a group size that is a multiple of 32."
        )
    shape = (k, n)
    return _Plan(qw.bits, qw.symmetric, qw.group_size, shape, bm, bn, bk, bool(interpret), target)


def pallas_matmul(x, qw, dtype, *, kernel_target="auto", **blocks):
    """``x [..., K] @ kernel`` with the Pallas kernel; same contract as ``xla_matmul``.

    Args:
      x: ``[..., K]`` activations.
      qw: a kernel-layout ``QuantizedWeight`` without leading axes.
      dtype: compute dtype (the weight tile is dequantized to it; fp32 accumulation).
      kernel_target: "auto" (Triton when lowered for GPU, Mosaic for TPU, the
        interpreter for CPU), or "gpu", "tpu", "interpret" to force one.
      **blocks: ``block_m``, ``block_n``, ``block_k`` overrides.

    Returns:
      ``[..., N]`` in ``dtype``.
    """
    k, n = qw.shape
    if x.shape[-1] != k:
        raise QuantizationError(f"x has {x.shape[-1]} features, the weight expects {k}")
    make_plan(math.prod(x.shape[:-1]), qw, **blocks)  # tile errors now, not at lowering

    def kernel(layout, interpret, x2, qw):
        plan = make_plan(x2.shape[0], qw, interpret=interpret, target=layout, **blocks)
        return _qmm(x2, qw, plan)

    def local(x, qw):  # one device's rows, the whole weight
        y = dispatch(kernel_target, kernel, x.reshape(-1, k).astype(dtype), qw)
        return y.reshape(*x.shape[:-1], n)

    # Under a mesh each device multiplies its own rows of the batch by the whole
    # weight (gathered for the call, as fsdp gathers float weights): a kernel is one
    # custom call the partitioner cannot split. Tensor-parallel shards of the weight
    # are gathered too; splitting the kernel by them is not done.
    rows = (axes.BATCH, *[None] * (x.ndim - 1)) if x.ndim > 1 else (None,)
    return per_device(local, (rows, None), rows, (*x.shape[:-1], n))(x, qw)

"""The XLA quantized matmul: dequantize, then dot, in a shape XLA fuses into one pass.

Works on any ``QuantizedWeight`` (read through its attributes only, so the storage
format in ``core`` can dispatch here and to ``pallas_matmul`` without a circle). It is
also the Pallas kernel's backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from neox_jax.quant.packing import nibble

Array = jax.Array


def _dequantize_columns(c: Array, qw, dtype, half: bool) -> Array:
    """Float ``[N, C']`` from int32 codes ``c [N, C']``; ``half``: every other input row."""
    rows, cols = c.shape
    per_group = qw.group_size // 2 if half else qw.group_size
    c = c.reshape(rows, cols // per_group, per_group)
    if qw.zero is not None:
        c = c - qw.zero.astype(jnp.int32)[..., None]
    w = c.astype(jnp.float32) * qw.scale.astype(jnp.float32)[..., None]
    return w.reshape(rows, cols).astype(dtype)


def xla_matmul(x: Array, qw, dtype) -> Array:
    """``x [..., K] @ kernel [K, N]`` by dequantize-then-dot, shaped so XLA fuses it.

    What XLA:CPU needs to read only the codes (measured on [2048, 8192], batch 1):
    * ``x @ w.T`` on the stored ``[N, K]``: the transpose folds into the dot's layout
      and the conversion fuses into its vector-matrix product. (A ``dot_general``
      contracting dimension 1 of both operands materialised the float weight.)
    * An ``optimization_barrier`` tying the codes to the activations: otherwise a
      decode loop's loop-invariant code motion hoists the dequantization out of the
      loop and carries a float copy of every weight (a 16 ms instead of 2 ms step).
    * 4 bits: no interleaving of the two nibbles (that breaks the fusion); the even
      and odd input rows are two dots, on ``x[..., 0::2]`` and ``x[..., 1::2]``,
      separated by a barrier so XLA does not merge them over a concatenated weight.
    * One group per output channel: the scale is applied after the dot (it factors
      out of the sum over K; exact up to round-off).
    Known XLA:CPU limits (experiments/quantization/README.md): the fused matrix-vector
    product also absorbs and recomputes cheap producers of ``x`` (LayerNorm, the erf
    of an exact GELU) per output, and nothing is fused for ``K >= 4096`` or batch > 1.
    """
    x = x.astype(dtype)
    mm = lambda a, w: jnp.matmul(a, w.T, preferred_element_type=jnp.float32)
    if qw.bits == 8:
        q, x = jax.lax.optimization_barrier((qw.qvalue, x))
        if qw.scale.shape[-1] == 1:
            c = q.astype(jnp.int32)
            c = c if qw.zero is None else c - qw.zero.astype(jnp.int32)
            return (mm(x, c.astype(dtype)) * qw.scale[:, 0].astype(jnp.float32)).astype(dtype)
        return mm(x, _dequantize_columns(q.astype(jnp.int32), qw, dtype, False)).astype(dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    q, even, odd = jax.lax.optimization_barrier((qw.qvalue, even, odd))
    y = mm(even, _dequantize_columns(nibble(q, 0, qw.symmetric), qw, dtype, True))
    y, q, odd = jax.lax.optimization_barrier((y, q, odd))
    y = y + mm(odd, _dequantize_columns(nibble(q, 1, qw.symmetric), qw, dtype, True))
    return y.astype(dtype)

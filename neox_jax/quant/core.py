"""Quantized weights: storage, round-to-nearest quantization, dequantization, XLA matmul.

A ``QuantizedWeight`` replaces one float parameter (a ``Linear`` kernel ``[K, N]`` or the
embedding table ``[V, E]``) in the parameter tree. It stores the matrix *output-major*,
``[R, C]`` with the grouped (input) dimension minor: a kernel ``[K, N]`` is stored as
``[N, K]`` (``transposed=True``, torch's ``nn.Linear.weight`` layout, which GPTQ's
``W [d_row, d_col]`` also uses); an embedding ``[V, E]`` is stored as is, so its groups
run along each row. Two reasons for that layout: XLA:CPU fuses the int -> float
conversion into a dot only when the contraction dimension is minor (we measured 0.7 ms
for int8 ``[8192, 2048]`` x vector against 2.6 ms for the fp32 ``[K, N]`` dot, and
25 ms when the codes were ``[K, N]``), and a group of consecutive input rows is then
contiguous in memory, as a kernel tile wants it.

Leaves (``S = C // group_size`` groups per row; scanned kernels keep a leading ``[L]``)::

    qvalue  [..., R, C]      int8 (symmetric) / uint8 (asymmetric) codes, 8 bits
            [..., R, C // 2] uint8, 4 bits: input rows 2j (low nibble) and 2j+1 (high)
    scale   [..., R, S]      float (``QuantConfig.scale_dtype``)
    zero    [..., R, S]      uint8 zero points (asymmetric), else None

4-bit packing lives in ``packing``, the matmuls in ``dequant_matmul`` (XLA) and
``pallas_matmul``; ``QuantizedWeight.matmul`` dispatches between them.

Dequantization: ``w = scale * q`` (symmetric, ``q`` signed) or ``w = scale * (u - zero)``.
Symmetric grids use ``scale = max|w| / (2^(b-1) - 1/2)`` and codes in
``[-2^(b-1), 2^(b-1) - 1]`` (GPTQ's symmetric grid), asymmetric ones
``scale = (max - min) / (2^b - 1)`` over a range that includes 0; either way
``|w - deq(q(w))| <= scale / 2`` for every element (scales are rounded *up* when stored
in a narrower dtype so the bound survives).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from neox_jax.model import axes
from neox_jax.quant.config import QuantizationError
from neox_jax.quant.dequant_matmul import xla_matmul
from neox_jax.quant.packing import pack_int4, unpack_int4
from neox_jax.quant.pallas_matmul import pallas_matmul

Array = jax.Array


@flax.struct.dataclass
class QuantizedWeight:
    """A quantized matrix standing in for a float parameter (see the module docstring).

    Attributes:
      qvalue, scale, zero: the array leaves (``zero`` is None when symmetric).
      bits: 8 or 4.
      group_size: input rows (columns of the stored matrix) per scale.
      shape: trailing shape of the parameter it replaces, ``(K, N)`` or ``(V, E)``.
      transposed: stored matrix is ``shape`` reversed (kernels) or as is (embeddings).
      impl: matmul implementation, "xla" or "pallas" (``QuantConfig.matmul_impl``).
    """

    qvalue: Array
    scale: Array
    zero: Array | None
    bits: int = flax.struct.field(pytree_node=False)
    group_size: int = flax.struct.field(pytree_node=False)
    shape: tuple[int, int] = flax.struct.field(pytree_node=False)
    transposed: bool = flax.struct.field(pytree_node=False, default=True)
    impl: str = flax.struct.field(pytree_node=False, default="xla")

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(self))

    def logical_axes(self, spec: PartitionSpec) -> QuantizedWeight:
        """Logical axis names of the arrays, from ``spec``, the float parameter's names.

        ``qvalue`` takes them in stored order (``[.., out, in]`` for kernels), so its
        shards hold the same rows and columns as the float kernel's would. The scales'
        group axis takes the input axis name too, so the scales of a shard's rows live on
        that shard (a row-parallel ``dense`` shards K: each shard then holds its own
        groups); with a single group (per-channel scales) the size-1 axis is named
        ``axes.GROUPS``, which a rules table maps to no mesh axis.
        (``neox_jax.parallel.shard_params`` calls this for every quantized leaf.)
        """
        *lead, a, b = tuple(spec)
        out_name, in_name = (b, a) if self.transposed else (a, b)
        group_name = in_name if self.scale.shape[-1] > 1 else axes.GROUPS
        scale = PartitionSpec(*lead, out_name, group_name)
        return self.replace(
            qvalue=PartitionSpec(*lead, out_name, in_name),
            scale=scale,
            zero=None if self.zero is None else scale,
        )

    def dequantize(self, dtype=jnp.float32) -> Array:
        """The float parameter it replaces, ``[..., *shape]`` in ``dtype``."""
        w = stored_float(self, dtype)
        return jnp.swapaxes(w, -1, -2) if self.transposed else w

    def matmul(self, x: Array, dtype) -> Array:
        """``x @ kernel`` for a kernel-layout weight without leading axes.

        Called by ``neox_jax.model.layers.Linear`` when this replaces its kernel.

        Args:
          x: ``[..., K]``.
          dtype: compute dtype; the weight is dequantized to it.

        Returns:
          ``[..., N]`` in ``dtype``.
        """
        if not self.transposed or self.qvalue.ndim != 2:
            raise QuantizationError(
                f"matmul needs a kernel-layout QuantizedWeight of one layer; got stored "
                f"shape {self.qvalue.shape} (transposed={self.transposed}). Scanned kernels "
                "are sliced per layer by the model's nn.scan."
            )
        if self.impl == "pallas":
            return pallas_matmul(x, self, dtype)
        return xla_matmul(x, self, dtype)


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight)


def codes(qw: QuantizedWeight) -> Array:
    """Integer codes of the stored matrix, ``[..., R, C]`` int32 (zero point not removed)."""
    if qw.bits == 4:
        return unpack_int4(qw.qvalue, signed=qw.symmetric)
    return qw.qvalue.astype(jnp.int32)


# ---------------------------------------------------------------- RTN quantization
def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest code of a scheme."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _store_scale(scale: Array, dtype) -> Array:
    """Cast scales to ``dtype``, rounding up so that the ``scale / 2`` bound still holds."""
    stored = scale.astype(dtype)
    low = stored.astype(jnp.float32) < scale
    return jnp.where(low, jnp.nextafter(stored, jnp.array(jnp.inf, dtype)), stored)


def quant_grid(wg: Array, bits: int, symmetric: bool, scale_dtype=jnp.float32):
    """Scales (and zero points) of groups of weights.

    Args:
      wg: ``[..., gs]`` float, one group per leading index.

    Returns:
      ``(scale [...] in scale_dtype, zero [...] uint8 or None)``.
    """
    wg = wg.astype(jnp.float32)
    if symmetric:
        # Codes [-2^(b-1), 2^(b-1) - 1]: max|w| maps to +-(2^(b-1) - 1/2), which rounds
        # into range either way, so the grid spans one more level than max|w| / qmax.
        scale = jnp.max(jnp.abs(wg), axis=-1) / (2 ** (bits - 1) - 0.5)
        return _store_scale(scale, scale_dtype), None
    lo = jnp.minimum(jnp.min(wg, axis=-1), 0.0)  # include 0 so zero lies in [0, 2^b - 1]
    hi = jnp.maximum(jnp.max(wg, axis=-1), 0.0)
    scale = _store_scale((hi - lo) / (2**bits - 1), scale_dtype)
    s = scale.astype(jnp.float32)
    zero = jnp.clip(jnp.round(-lo / jnp.where(s > 0, s, 1.0)), 0, 2**bits - 1)
    return scale, zero.astype(jnp.uint8)


def quantize_codes(w: Array, scale: Array, zero: Array | None, bits: int) -> Array:
    """Round-to-nearest codes of ``w`` on a given grid; all arrays broadcast together."""
    s = scale.astype(jnp.float32)
    q = jnp.round(w.astype(jnp.float32) / jnp.where(s > 0, s, 1.0))
    if zero is not None:
        q = q + zero.astype(jnp.float32)
    lo, hi = code_range(bits, zero is None)
    return jnp.clip(q, lo, hi).astype(jnp.int32)


def store_codes(q: Array, bits: int, symmetric: bool) -> Array:
    """int32 codes ``[..., R, C]`` -> the ``qvalue`` leaf."""
    if bits == 4:
        return pack_int4(q)
    return q.astype(jnp.int8 if symmetric else jnp.uint8)


def quantize(
    w: Array,
    bits: int,
    group_size: int,
    symmetric: bool = True,
    *,
    transposed: bool = True,
    scale_dtype=jnp.float32,
    impl: str = "xla",
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w`` (a kernel, or an embedding table).

    Args:
      w: ``[..., K, N]`` kernel (``transposed=True``; groups along K) or ``[..., V, E]``
        table (``transposed=False``; groups along E, i.e. per row).
      bits, group_size, symmetric: the scheme; ``group_size`` divides the grouped dim.
      scale_dtype: dtype of the stored scales.
      impl: matmul implementation recorded on the result.

    Returns:
      A ``QuantizedWeight`` with ``w``'s leading axes.
    """
    stored = jnp.swapaxes(w, -1, -2) if transposed else w  # [..., R, C]
    *lead, rows, cols = stored.shape
    if cols % group_size:
        raise QuantizationError(f"group_size {group_size} does not divide dimension {cols}")
    wg = stored.reshape(*lead, rows, cols // group_size, group_size)
    scale, zero = quant_grid(wg, bits, symmetric, scale_dtype)  # [..., R, S]
    q = quantize_codes(wg, scale[..., None], None if zero is None else zero[..., None], bits)
    return QuantizedWeight(
        qvalue=store_codes(q.reshape(*lead, rows, cols), bits, symmetric),
        scale=scale,
        zero=zero,
        bits=bits,
        group_size=group_size,
        shape=tuple(w.shape[-2:]),
        transposed=transposed,
        impl=impl,
    )


# ------------------------------------------------------------------ dequantization
def stored_float(qw: QuantizedWeight, dtype=jnp.float32) -> Array:
    """The dequantized stored matrix ``[..., R, C]`` in ``dtype``."""
    q = codes(qw)
    *lead, rows, cols = q.shape
    groups = cols // qw.group_size
    q = q.reshape(*lead, rows, groups, qw.group_size)
    if qw.zero is not None:
        q = q - qw.zero.astype(jnp.int32)[..., None]
    w = q.astype(jnp.float32) * qw.scale.astype(jnp.float32)[..., None]
    return w.reshape(*lead, rows, cols).astype(dtype)


def take_rows(qw: QuantizedWeight, ids: Array, dtype=jnp.float32) -> Array:
    """Embedding lookup from a quantized table: dequantizes only the rows in ``ids``.

    Args:
      qw: an embedding-layout ``QuantizedWeight`` (``transposed=False``), ``[V, E]``.
      ids: integer token ids of any shape.

    Returns:
      ``[*ids.shape, E]`` in ``dtype``.
    """
    if qw.transposed:
        raise QuantizationError("take_rows needs an embedding-layout QuantizedWeight")
    rows = jax.tree.map(lambda a: jnp.take(a, ids, axis=0), qw)
    return stored_float(rows, dtype)


def dequantize_weight(qw: QuantizedWeight, dtype=jnp.float32) -> Array:
    """``qw.dequantize(dtype)``: the float parameter a ``QuantizedWeight`` replaces."""
    return qw.dequantize(dtype)

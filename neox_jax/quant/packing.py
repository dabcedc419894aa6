"""4-bit packing of quantization codes: two codes per byte, pairs of adjacent input rows.

The lowest layer of ``neox_jax.quant``: plain array functions that the storage format
(``core``) and both matmuls (``dequant_matmul``, ``pallas_matmul``) build on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from neox_jax.quant.config import QuantizationError

Array = jax.Array


def pack_int4(codes: Array) -> Array:
    """Pack 4-bit codes in pairs along the last axis: ``[..., C]`` -> uint8 ``[..., C // 2]``.

    Element ``2j`` goes to the low nibble of byte ``j``, ``2j + 1`` to the high one.
    Codes may be signed (two's complement nibble) or unsigned; only the low 4 bits
    are kept. Pairs are adjacent so that a contiguous slice of bytes is a contiguous
    slice of input rows (groups and tensor-parallel shards stay whole).
    """
    if codes.shape[-1] % 2:
        raise QuantizationError(f"cannot pack an odd number ({codes.shape[-1]}) of 4-bit codes")
    c = codes.astype(jnp.int32).reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2) & 15
    return (c[..., 0] | (c[..., 1] << 4)).astype(jnp.uint8)


def unpack_int4(packed: Array, signed: bool) -> Array:
    """Inverse of ``pack_int4``: uint8 ``[..., C // 2]`` -> int32 codes ``[..., C]``."""
    lo, hi = nibble(packed, 0, signed), nibble(packed, 1, signed)
    return jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def nibble(packed: Array, which: int, signed: bool) -> Array:
    """int32 codes of the low (0) or high (1) nibbles of ``packed``."""
    v = packed.astype(jnp.int32)
    v = v & 15 if which == 0 else v >> 4
    return (v ^ 8) - 8 if signed else v  # sign-extend a 4-bit two's complement value

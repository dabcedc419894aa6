"""``QuantConfig``: how a model's weights are quantized, recorded beside its ``ModelConfig``.

Schemes (see ``neox_jax.quant.core`` for the storage layout):

* 8 bits, symmetric, one scale per output channel (the default): ``w ~ s * q`` with
  ``q`` in [-128, 127]; error at most ``s / 2`` per weight.
* 4 bits, group-wise along the input dimension (default groups of 128 input rows),
  symmetric (``q`` in [-8, 7]) or asymmetric with an integer zero point per group
  (``w ~ s * (u - z)``, ``u`` in [0, 15]); two codes per byte.

``method`` picks round-to-nearest ("rtn") or GPTQ (Frantar et al. 2022, arXiv:2210.17323),
which needs calibration tokens.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from neox_jax.errors import UserError
from neox_jax.model.config import JsonConfig

BITS = (4, 8)
METHODS = ("rtn", "gptq")
MATMUL_IMPLS = ("xla", "pallas")
SCALE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DEFAULT_GROUP_SIZE_4BIT = 128  # GPTQ §5 and most int4 deployments use groups of 128


class QuantizationError(UserError):
    """A quantization request or a quantized checkpoint that cannot be honoured."""


@dataclasses.dataclass(frozen=True)
class QuantConfig(JsonConfig):
    """Weight quantization settings (hashable; a static jit argument).

    Attributes:
      bits: 8 or 4.
      group_size: input rows that share one scale. None picks the scheme default:
        the whole input dimension (one scale per output channel) for 8 bits, 128 for
        4 bits. It must divide the input dimension of every quantized matrix.
      symmetric: True: ``w ~ s * q``; False: ``w ~ s * (u - z)`` with an integer
        zero point per group (better for skewed groups, one more byte per group).
      method: "rtn" (round to nearest) or "gptq" (needs calibration data).
      matmul_impl: "xla" (dequantize then dot; XLA fuses the two) or "pallas" (a
        kernel that dequantizes weight tiles on chip: Triton on GPU, Mosaic on TPU,
        interpreted on CPU).
      embed_out: also quantize the output projection (untied models). GPTQ (§5)
        keeps it in full precision, so the default is False.
      embed_in: also quantize the input embedding, one scale per vocabulary row (per
        group of its row for 4 bits). The model's ``nn.Embed`` cannot read a
        quantized table, so this saves checkpoint and host bytes; ``load_quantized``
        and ``dequantize_params(..., only=("embed_in",))`` restore a float table.
      scale_dtype: dtype of the scales ("float32", "bfloat16", "float16").
      gptq_damp: GPTQ dampening, a fraction of the mean Hessian diagonal added to the
        diagonal (§4 Step 3 uses 1%).
      gptq_block_size: columns per lazy batch update (§4 Step 2 uses 128).
      gptq_act_order: quantize input rows in order of decreasing Hessian diagonal
        (the reference implementation's ``--act-order``); scales are then computed
        up front per group ("static groups") so groups stay contiguous.
    """

    error_type: ClassVar[type[Exception]] = QuantizationError

    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    method: str = "rtn"
    matmul_impl: str = "xla"
    embed_out: bool = False
    embed_in: bool = False
    scale_dtype: str = "float32"
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    gptq_act_order: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raises ``QuantizationError`` naming the field and the valid choices."""
        if self.bits not in BITS:
            raise QuantizationError(
                f"Unsupported bit width {self.bits!r}; supported: {', '.join(map(str, BITS))}."
            )
        if self.group_size is not None and (
            not isinstance(self.group_size, int)
            or isinstance(self.group_size, bool)
            or self.group_size <= 0
        ):
            raise QuantizationError(
                f"group_size must be a positive integer or None, got {self.group_size!r}."
            )
        if self.bits == 4 and self.group_size is not None and self.group_size % 2:
            raise QuantizationError(
                f"group_size {self.group_size} is odd; 4-bit codes are packed in pairs of "
                "input rows, so groups must hold an even number of rows."
            )
        for name, value, choices in (
            ("method", self.method, METHODS),
            ("matmul_impl", self.matmul_impl, MATMUL_IMPLS),
            ("scale_dtype", self.scale_dtype, tuple(SCALE_DTYPES)),
        ):
            if value not in choices:
                raise QuantizationError(
                    f"Unknown {name} {value!r}; supported: {', '.join(choices)}."
                )
        if not self.gptq_damp > 0:
            raise QuantizationError(f"gptq_damp must be positive, got {self.gptq_damp}.")
        if self.gptq_block_size <= 0:
            raise QuantizationError(
                f"gptq_block_size must be positive, got {self.gptq_block_size}."
            )

    def group_for(self, in_dim: int, name: str = "a weight") -> int:
        """The group size used for a matrix with ``in_dim`` input rows.

        Raises:
          QuantizationError: the group size does not divide ``in_dim``.
        """
        if self.group_size is None:
            group = in_dim if self.bits == 8 else DEFAULT_GROUP_SIZE_4BIT
        else:
            group = self.group_size
        if in_dim % group:
            raise QuantizationError(
                f"group_size {group} does not divide the input dimension {in_dim} of {name}; "
                f"pick a group size that divides {in_dim} (e.g. "
                f"{_largest_divisor(in_dim, group, even=self.bits == 4)})."
            )
        if self.bits == 4 and group % 2:
            raise QuantizationError(
                f"4-bit packing needs an even group; {name} has input dimension {in_dim}."
            )
        return group

    @property
    def scale_jnp_dtype(self):
        return SCALE_DTYPES[self.scale_dtype]


def _largest_divisor(n: int, limit: int, even: bool = False) -> int:
    """The largest (even) divisor of ``n`` not above ``limit``, for error messages."""
    divisors = [d for d in range(1, min(n, limit) + 1) if n % d == 0 and not (even and d % 2)]
    return max(divisors, default=n)

"""Post-training weight quantization (int8 / int4, round-to-nearest or GPTQ) and quantized matmul.

    from neox_jax.quant import QuantConfig, quantize_params
    qparams = quantize_params(config, params, QuantConfig(bits=4, group_size=128))
    logits = GPTNeoX(config).apply({"params": qparams}, ids)  # Linear dequantizes on the fly

See ``core`` for the storage format, ``gptq`` for the algorithm, ``checkpoint`` for the
on-disk layout, and ``python -m neox_jax.quantize`` for the command line.
"""

from neox_jax.quant.calibration import calibration_tokens
from neox_jax.quant.checkpoint import (
    is_quantized_checkpoint,
    load_quantized,
    read_configs,
    save_quantized,
)
from neox_jax.quant.config import QuantConfig, QuantizationError
from neox_jax.quant.core import (
    QuantizedWeight,
    dequantize_weight,
    is_quantized,
    quantize,
    take_rows,
)
from neox_jax.quant.dequant_matmul import xla_matmul
from neox_jax.quant.gptq import gptq_quantize
from neox_jax.quant.packing import pack_int4, unpack_int4
from neox_jax.quant.pallas_matmul import pallas_matmul
from neox_jax.quant.params import (
    abstract_quantized_params,
    dequantize_params,
    quantize_params,
    quantized_logical_axes,
    weight_bytes,
    with_matmul_impl,
)

__all__ = [
    "QuantConfig",
    "QuantizationError",
    "QuantizedWeight",
    "abstract_quantized_params",
    "calibration_tokens",
    "dequantize_params",
    "dequantize_weight",
    "gptq_quantize",
    "is_quantized",
    "is_quantized_checkpoint",
    "load_quantized",
    "pack_int4",
    "pallas_matmul",
    "quantize",
    "quantize_params",
    "quantized_logical_axes",
    "read_configs",
    "save_quantized",
    "take_rows",
    "unpack_int4",
    "weight_bytes",
    "with_matmul_impl",
    "xla_matmul",
]

"""Quantizing a whole parameter tree, and what the rest of the codebase needs from it.

``quantize_params`` replaces the kernels of every ``Linear`` in the blocks (and, when
asked, ``embed_out`` and ``embed_in``) by ``QuantizedWeight`` values; everything else
(biases, LayerNorms) stays float. The result goes straight into
``GPTNeoX(config).apply`` (``Linear`` dispatches on the quantized kernel), so any
sampler or evaluator works on it unchanged, except a quantized ``embed_in`` (see
``QuantConfig.embed_in``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from neox_jax.model import ModelConfig, abstract_params
from neox_jax.quant.config import QuantConfig, QuantizationError
from neox_jax.quant.core import is_quantized
from neox_jax.quant.gptq_model import gptq_quantize_params
from neox_jax.quant.leaves import get_path, quantize_leaf, set_path, target_paths


def check_float_params(config: ModelConfig, params, qconfig: QuantConfig) -> None:
    """Every target exists, is a float array of the shape ``config`` implies."""
    expected = abstract_params(config)
    for path in target_paths(config, qconfig):
        try:
            leaf = get_path(params, path)
        except (KeyError, TypeError):
            raise QuantizationError(f"params have no {'/'.join(path)}") from None
        if is_quantized(leaf):
            raise QuantizationError(f"{'/'.join(path)} is already quantized")
        want = get_path(expected, path).shape
        if tuple(leaf.shape) != tuple(want):
            raise QuantizationError(
                f"{'/'.join(path)} has shape {tuple(leaf.shape)} but the model config implies "
                f"{tuple(want)}; the params and config do not belong together."
            )


def quantize_params(
    config: ModelConfig,
    params: dict[str, Any],
    qconfig: QuantConfig,
    calibration: np.ndarray | None = None,
    **gptq_kwargs,
) -> dict[str, Any]:
    """Quantize the weights of a float parameter tree.

    Args:
      config: the model's config.
      params: float parameters (unboxed), e.g. from ``load_model``.
      qconfig: the scheme, see ``QuantConfig``.
      calibration: ``[num_samples, length]`` int token ids; required for GPTQ.
      **gptq_kwargs: passed to ``neox_jax.quant.gptq_model.gptq_quantize_params``
        (``batch_size``, ``log``).

    Returns:
      The same tree with ``QuantizedWeight`` values at ``target_paths``.
    """
    check_float_params(config, params, qconfig)
    if qconfig.method == "gptq":
        if config.is_moe:
            raise QuantizationError(
                "method='gptq' does not support mixture-of-experts models yet (each expert "
                "needs the statistics of the tokens routed to it); use method='rtn'."
            )
        if calibration is None:
            raise QuantizationError(
                "method='gptq' needs calibration tokens (--calibration=<text file or "
                "indexed dataset prefix>); use method='rtn' to quantize without data."
            )
        return gptq_quantize_params(config, params, qconfig, calibration, **gptq_kwargs)
    out = params
    for path in target_paths(config, qconfig):
        out = set_path(out, path, quantize_leaf(get_path(params, path), path, qconfig))
    return out


def dequantize_params(params, dtype=None, only: tuple[str, ...] | None = None):
    """Replace ``QuantizedWeight`` values by float arrays.

    Args:
      params: a (partly) quantized tree.
      dtype: float dtype of the result; default float32.
      only: top-level keys to dequantize (e.g. ``("embed_in",)``); default all.

    Returns:
      The tree with float arrays in place of the selected quantized values.
    """
    dtype = dtype or jnp.float32

    def fn(path, leaf):
        if is_quantized(leaf) and (only is None or path[0].key in only):
            return leaf.dequantize(dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(fn, params, is_leaf=is_quantized)


def with_matmul_impl(params, impl: str):
    """The same tree with every ``QuantizedWeight`` using matmul ``impl`` ("xla"/"pallas")."""
    QuantConfig(matmul_impl=impl)  # validates the name
    return jax.tree.map(
        lambda x: x.replace(impl=impl) if is_quantized(x) else x, params, is_leaf=is_quantized
    )


def weight_bytes(params) -> int:
    """Bytes of every array (or ``ShapeDtypeStruct``) in a parameter tree."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def quantized_logical_axes(param_axes, qparams):
    """Logical axis names for a quantized tree, consistent with the float kernels'
    (each quantized leaf's ``QuantizedWeight.logical_axes``).

    Args:
      param_axes: ``param_logical_axes(config)`` (a tree of ``PartitionSpec``).
      qparams: the quantized params (or their ``jax.eval_shape``).

    Returns:
      A tree shaped like ``qparams`` whose leaves are ``PartitionSpec``s.
    """
    return jax.tree.map(
        lambda spec, q: q.logical_axes(spec) if is_quantized(q) else spec,
        param_axes,
        qparams,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def abstract_quantized_params(config: ModelConfig, qconfig: QuantConfig):
    """Shapes and dtypes of ``quantize_params``' output (``jax.eval_shape``; nothing allocated).

    GPTQ and round-to-nearest produce the same structure, so this serves both.
    """
    # A new tree each call around the cached leaves (callers may edit containers).
    return jax.tree.map(lambda x: x, _abstract_quantized(config, qconfig.replace(method="rtn")))


@functools.lru_cache(maxsize=32)
def _abstract_quantized(config: ModelConfig, rtn: QuantConfig):
    # Traced once per (config, settings): loading, checking and saving each ask.
    return jax.eval_shape(lambda p: quantize_params(config, p, rtn), abstract_params(config))

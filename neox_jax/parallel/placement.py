"""Placing a model's parameters on a mesh by the rules table: ``shard_params``.

The one function every path uses (sampling, evaluation, embedding, fine-tuning, the
loader), for float parameters and quantized ones alike. A quantized weight
(``neox_jax.quant.QuantizedWeight``) stands in for one float parameter but holds several
arrays (codes, scales, zero points); it names their logical axes itself through its
``logical_axes(spec)`` method, given the float parameter's spec, so this module needs no
import of ``quant`` (which sits above it).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import PartitionSpec

from neox_jax.errors import UserError
from neox_jax.model import ModelConfig, param_logical_axes
from neox_jax.parallel.rules import logical_to_sharding


def _has_own_axes(leaf) -> bool:
    return hasattr(leaf, "logical_axes")


def param_logical_specs(config: ModelConfig, params: Any) -> Any:
    """The logical ``PartitionSpec`` of every array of ``params`` (float or quantized).

    Args:
      config: the model config.
      params: the parameter tree, or its ``jax.eval_shape`` / abstract version.
    """
    specs = param_logical_axes(config)
    try:
        return jax.tree.map(
            lambda spec, leaf: leaf.logical_axes(spec) if _has_own_axes(leaf) else spec,
            specs,
            params,
            is_leaf=lambda x: isinstance(x, PartitionSpec),
        )
    except ValueError as e:  # a tree mismatch
        raise UserError(
            "the parameters do not have the model's structure (the keys of a "
            f"{config.num_hidden_layers}-layer GPTNeoX with stacked layers): {e}"
        ) from e


def param_shardings(config: ModelConfig, params: Any, mesh: jax.sharding.Mesh, rules=None):
    """A ``NamedSharding`` for every array of ``params`` (arrays or shape structs)."""
    return logical_to_sharding(param_logical_specs(config, params), params, mesh, rules)


def shard_params(config: ModelConfig, params: Any, mesh: jax.sharding.Mesh, rules=None):
    """``params`` (host or device arrays, float or quantized) placed on ``mesh``.

    On a ``data``-only mesh they are replicated; ``fsdp`` and ``tensor`` axes split them
    as training does (``neox_jax.parallel.rules``).
    """
    return jax.device_put(params, param_shardings(config, params, mesh, rules))

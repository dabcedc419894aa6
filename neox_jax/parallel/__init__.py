"""Meshes, the logical-axis rules table, shardings and multi-host start-up.

The model names logical axes only (``neox_jax.model.axes``); this package maps them
onto a ``jax.sharding.Mesh`` with axes ``data``, ``stage``, ``fsdp`` and ``tensor``.
"""

from neox_jax.parallel.mesh import (
    AXES,
    DISTRIBUTED_ENV,
    create_mesh,
    initialize_distributed,
    resolve_axis_sizes,
)
from neox_jax.parallel.placement import param_logical_specs, param_shardings, shard_params
from neox_jax.parallel.rules import (
    BATCH_AXES,
    RULES,
    batch_sharding,
    data_parallel_size,
    fit_spec,
    logical_to_sharding,
    replicated,
)

__all__ = [
    "AXES",
    "BATCH_AXES",
    "DISTRIBUTED_ENV",
    "RULES",
    "batch_sharding",
    "create_mesh",
    "data_parallel_size",
    "fit_spec",
    "initialize_distributed",
    "logical_to_sharding",
    "param_logical_specs",
    "param_shardings",
    "replicated",
    "resolve_axis_sizes",
    "shard_params",
]

"""Data-parallel placement for the forward-only paths (scoring, embeddings).

Parameters are placed once with the project's logical-axis rules (on the default
``data``-only mesh they are replicated; a mesh with an ``fsdp`` or ``tensor`` axis shards
them the same way training does) and every batch is split along its first dimension
over ``data`` x ``fsdp``. Single-process only: in a multi-host run each host would need
``jax.make_array_from_process_local_data``, which the evaluation paths do not do yet.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from neox_jax.model import ModelConfig
from neox_jax.parallel.mesh import create_mesh
from neox_jax.parallel.placement import shard_params
from neox_jax.parallel.rules import batch_sharding, data_parallel_size


class DataParallel:
    """Parameters placed on a mesh, and a helper that splits batches across it.

    Args:
      config: the model config (for the parameters' logical axes).
      params: the parameter tree (numpy or jax arrays; float or quantized weights).
      mesh: a mesh with the project's axes; default: every local device on ``data``.
    """

    def __init__(self, config: ModelConfig, params: Any, mesh: jax.sharding.Mesh | None = None):
        if jax.process_count() > 1:
            raise NotImplementedError(
                "evaluation and embedding run in one process; start one process per host "
                "with its own devices (or extend DataParallel.put to global arrays)."
            )
        self.mesh = mesh if mesh is not None else create_mesh({"data": -1})
        self.params = shard_params(config, params, self.mesh)  # float or quantized
        self.num_shards = data_parallel_size(self.mesh)
        self._batch = batch_sharding(self.mesh, 1)  # first dimension split, the rest whole

    def round_batch(self, n: int) -> int:
        """``n`` rounded up to a multiple of the data-parallel size (each shard gets rows)."""
        return -(-n // self.num_shards) * self.num_shards

    def put(self, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
        """Split each ``[B, ...]`` host array along ``B`` over the devices."""
        return tuple(jax.device_put(a, self._batch) for a in arrays)

"""The one table mapping the model's logical axis names onto mesh axes.

Layout it implements (Megatron tensor parallelism + ZeRO-3/FSDP + data parallelism):

* ``tensor``: attention heads (the fused QKV output and the attention-out input), the
  MLP hidden dimension and the vocabulary are split across it, so each device holds
  a slice of every layer and the residual stream is all-reduced twice per layer.
* ``fsdp``: every parameter (and its optimizer state) is split along its ``embed``
  dimension; XLA all-gathers a layer's weights just before use. The batch is split
  across it too, as in ZeRO-3.
* ``data``: pure data parallelism; parameters are replicated across it.
* ``stage``: the stacked ``layers`` axis, for pipeline parallelism.
* ``expert``: the stacked ``expert`` axis of mixture-of-experts weights (their hidden
  dimension stays on ``tensor``), and the batch, as in GShard/Switch: each device routes
  its own tokens, and two all-to-alls per sparse layer carry them to the devices holding
  their experts and back (``neox_jax.model.expert_parallel``). Every other parameter is
  replicated across it, as across ``data``.

A dimension that an axis does not divide is left unsharded along that axis
(``logical_to_sharding`` warns), so tiny test models run on any mesh.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec

from neox_jax.model import axes

BATCH_AXES = ("data", "fsdp", "expert")

RULES: tuple[tuple[str, Any], ...] = (
    # Parameters.
    (axes.VOCAB, "tensor"),
    (axes.EMBED, "fsdp"),
    (axes.HEADS, "tensor"),
    # Separate k/v projections (KV heads * head_dim); fit_spec keeps them whole when
    # the tensor axis does not divide that width.
    (axes.KV_HEADS, "tensor"),
    (axes.MLP, "tensor"),
    (axes.LAYERS, "stage"),
    (axes.EXPERT, "expert"),
    (axes.ROUTER, None),
    (axes.NORM, None),
    (axes.RANK, None),
    (axes.GROUPS, None),
    # Activations.
    (axes.BATCH, BATCH_AXES),
    (axes.LENGTH, None),
    (axes.ACT_EMBED, None),
    (axes.ACT_HEADS, "tensor"),
    # Fewer KV heads than query heads (GQA/MQA) may not divide the tensor axis; each
    # device keeps every KV head its query heads need.
    (axes.ACT_KV_HEADS, None),
    (axes.ACT_KV, None),
    (axes.ACT_MLP, "tensor"),
    (axes.ACT_VOCAB, "tensor"),
    # A capacity-mode [experts, capacity, embed] buffer: its experts where theirs are.
    (axes.ACT_EXPERT, "expert"),
    # KV cache.
    (axes.CACHE_LAYERS, "stage"),
    (axes.CACHE_BATCH, BATCH_AXES),
    (axes.CACHE_LENGTH, None),
    (axes.CACHE_HEADS, "tensor"),
    (axes.CACHE_KV, None),
)


def rules_for(mesh: jax.sharding.Mesh) -> tuple[tuple[str, Any], ...]:
    """``RULES`` without the mesh axes ``mesh`` lacks: a mesh built by hand with fewer
    axes than ``create_mesh``'s (say, without ``expert``) shards as if they had size 1."""
    present = set(mesh.axis_names)

    def keep(target):
        if target is None or isinstance(target, str):
            return target if target in present else None
        return tuple(a for a in target if a in present) or None

    return tuple((name, keep(target)) for name, target in RULES)


def _mesh_axes(spec: PartitionSpec, rules) -> PartitionSpec:
    return nn.logical_to_mesh_axes(tuple(spec), rules)


def fit_spec(
    mesh_spec: PartitionSpec, shape: tuple[int, ...], mesh: jax.sharding.Mesh, name: str = ""
) -> PartitionSpec:
    """Drop mesh axes from dimensions they do not divide (with a warning)."""
    out = []
    for dim, entry in zip(
        shape, tuple(mesh_spec) + (None,) * (len(shape) - len(mesh_spec)), strict=True
    ):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept = []
        size = 1
        for n in names:
            if mesh.shape[n] > 1 and dim % (size * mesh.shape[n]) == 0:
                kept.append(n)
                size *= mesh.shape[n]
            elif mesh.shape[n] > 1:
                logging.warning(
                    "%s: dimension %d is not divisible by mesh axis %r (%d); "
                    "leaving it unsharded there.",
                    name or "array",
                    dim,
                    n,
                    mesh.shape[n],
                )
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def logical_to_sharding(logical: Any, shapes: Any, mesh: jax.sharding.Mesh, rules=None) -> Any:
    """``NamedSharding`` for every leaf, from its logical spec and shape.

    Args:
      logical: tree of ``PartitionSpec`` of logical names (e.g. ``param_logical_axes``).
      shapes: matching tree of arrays or ``ShapeDtypeStruct``.
      rules: the logical-to-mesh table; default ``rules_for(mesh)``.
    """
    rules = rules_for(mesh) if rules is None else rules

    def one(spec, shape):
        mesh_spec = fit_spec(_mesh_axes(spec, rules), tuple(shape.shape), mesh, str(spec))
        return NamedSharding(mesh, mesh_spec)

    return jax.tree.map(one, logical, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
    """Batches are split over ``data`` x ``fsdp`` x ``expert`` along their first dimension."""
    batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None
    return NamedSharding(mesh, PartitionSpec(batch, *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def mesh_context(mesh: jax.sharding.Mesh | None) -> contextlib.ExitStack:
    """The mesh and this rules table, for calls that run on ``mesh``; nothing without one.

    The inference generator and the serving engine enter it around every device call.
    """
    stack = contextlib.ExitStack()
    if mesh is not None:
        stack.enter_context(jax.set_mesh(mesh))
        stack.enter_context(nn.logical_axis_rules(rules_for(mesh)))
    return stack


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    """How many ways the batch is split (the product of ``BATCH_AXES``)."""
    return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)

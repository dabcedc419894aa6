"""A kernel (one custom call XLA cannot partition) run on each device's shard of its
operands under ``jax.shard_map``, laid out by the logical-axis rules in force."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def per_device(fn, logical_in, logical_out, out_shape):
    """``fn`` run on each device's shard under ``jax.shard_map`` when a mesh is set.

    A Pallas kernel is one custom call that XLA cannot partition: in a sharded jit
    Mosaic refuses to lower it, and a Triton call would gather every operand and
    compute the whole batch on each device. Batch and
    heads are independent in attention, so each device runs the kernel on its own
    rows and heads: the dims that the logical-axis rules in force shard (a mesh axis
    that does not divide a dim, or is already manual, is left out); the rest is
    replicated. Without a mesh (or inside a ``shard_map`` over all of it), ``fn``.

    Args:
      fn: takes arrays laid out as ``logical_in`` (a tuple of logical axis names per
        array, ``()`` for a scalar, None for an argument every device gets whole, of
        any pytree) and returns one of ``out_shape`` laid out as ``logical_out``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    free = set() if mesh.empty else {a for a in mesh.axis_names if a not in mesh.manual_axes}
    if not free:
        return fn
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))

    def spec(names, shape):
        dims = []
        for entry, dim in zip(nn.logical_to_mesh_axes(names), shape, strict=True):
            group = (entry,) if isinstance(entry, str) else entry or ()
            group = tuple(a for a in group if a in free)
            dims.append(group if group and dim % math.prod(sizes[a] for a in group) == 0 else None)
        return P(*dims)

    def run(*args):
        in_specs = tuple(
            P() if n is None else spec(n, jnp.shape(a))
            for n, a in zip(logical_in, args, strict=True)
        )
        # Every free axis goes manual, size-1 ones too: Mosaic refuses to lower a kernel
        # while any mesh axis is left to the automatic partitioner.
        # check_vma=False: pallas_call's outputs carry no varying-axes annotation.
        shard = jax.shard_map(
            fn,
            in_specs=in_specs,
            out_specs=spec(logical_out, out_shape),
            axis_names=free,
            check_vma=False,
        )
        return shard(*args)

    return run

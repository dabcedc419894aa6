"""Expert parallelism: tokens travel to the devices holding their experts and back.

When the logical-axis rules in force split a mixture-of-experts layer's stacked
``experts`` dimension over mesh axes (the rules table maps it to ``expert``), each
device holds ``num_experts / S`` whole experts (``S`` the product of those axes) and
the batch is split over the same axes, as in GShard and Switch Transformer. One
sparse layer then runs per device under ``jax.shard_map``:

1. sort this device's ``n * k`` (token, expert) assignments by expert; as experts
   are numbered shard by shard, that groups them by destination device too;
2. write them into a send buffer ``[S, C, E]`` (block ``s`` for device ``s``) and
   exchange the blocks with one ``all_to_all``;
3. sort the received rows by local expert and run the experts on them as one grouped
   matmul (``expert_fn``, e.g. ``jax.lax.ragged_dot``: the megablox approach);
4. send the results back with a second ``all_to_all`` to the slots they came from,
   scale by the routing weights and sum each token's ``k`` results.

``C``, the rows one device may send another, is ``n * k`` by default: the case where
every assignment goes to one device, so nothing is ever dropped (dropless) and the
result equals the single-device layer up to round-off. ``capacity_factor`` bounds it
to ``ceil(factor * n * k / S)`` instead (less memory and compute, at the price of
dropping a device's assignments past that many per destination).

If the experts' hidden dimension is split too (``mlp`` on ``tensor``), each device
computes partial sums of its experts' down projection, added up by one ``psum``
over those axes at the end (Megatron's MLP split, inside each expert).

Mesh axis names never appear here: they are read from the rules in force
(``flax.linen.logical_axis_rules``), as ``model.per_device`` does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from neox_jax.errors import UserError
from neox_jax.model import axes

Array = jax.Array
# (local expert params, rows [R, E] sorted by local expert, group sizes [X_local])
#   -> [R, E]; rows past sum(group_sizes) are padding whose output is ignored.
ExpertFn = Callable[[Any, Array, Array], Array]


def _free_axes() -> tuple[dict[str, int], set[str]]:
    """The current mesh's axis sizes and the axes not already manual."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return {}, set()
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    return sizes, {a for a in mesh.axis_names if a not in mesh.manual_axes}


def _mesh_axes(name: str | None, dim: int, sizes: dict[str, int], free: set[str]):
    """The free mesh axes (size > 1) that the rules map logical ``name`` to, as a
    tuple, or () when there are none or they do not divide ``dim``."""
    if name is None:
        return ()
    (entry,) = nn.logical_to_mesh_axes((name,))
    group = (entry,) if isinstance(entry, str) else tuple(entry or ())
    group = tuple(a for a in group if a in free and sizes[a] > 1)
    return group if group and dim % math.prod(sizes[a] for a in group) == 0 else ()


def expert_shards(num_experts: int) -> int:
    """How many ways the rules in force split the experts (1: no expert parallelism).

    Raises:
      UserError: the expert mesh axes do not divide ``num_experts``.
    """
    sizes, free = _free_axes()
    if not free:
        return 1
    (entry,) = nn.logical_to_mesh_axes((axes.EXPERT,))
    group = (entry,) if isinstance(entry, str) else tuple(entry or ())
    shards = math.prod(sizes[a] for a in group if a in free)
    if num_experts % shards:
        raise UserError(
            f"The mesh splits the experts {shards} ways (axes {group}), which does not "
            f"divide num_experts={num_experts}; choose mesh.expert among the divisors of "
            f"{num_experts}."
        )
    return shards


def dispatch(
    expert_fn: ExpertFn,
    params: Any,
    param_names: Any,
    x: Array,
    expert_ids: Array,
    weights: Array,
    valid: Array | None = None,
    *,
    num_experts: int,
    capacity_factor: float | None = None,
) -> Array:
    """The sparse layer's output with experts on different devices.

    Args:
      expert_fn: the experts over rows grouped by expert (see ``ExpertFn``). A split
        hidden (``mlp``) dimension is summed after it, so it must be linear in its last
        use of that dimension, as a gated MLP's down projection is.
      params: the layer's expert weights (any pytree), the experts first (``[X, ...]``).
      param_names: the matching tree of tuples of logical axis names per array, e.g.
        ``(axes.EXPERT, axes.EMBED, axes.MLP)``; ``embed`` is gathered for the call.
      x: ``[N, E]`` tokens (the batch flattened: split as the batch is).
      expert_ids: ``[N, k]`` int, the experts each token goes to.
      weights: ``[N, k]`` the routing weights that scale their outputs.
      valid: ``[N]`` bool, False for padding tokens (sent nowhere, output zero).
      num_experts: ``X``.
      capacity_factor: None for dropless; else rows per destination device of
        ``ceil(factor * n * k / S)`` (``n`` the tokens per device).
    Returns:
      ``[N, E]`` in ``x``'s dtype.
    """
    sizes, free = _free_axes()
    expert_group = _mesh_axes(axes.EXPERT, num_experts, sizes, free)
    shards = expert_shards(num_experts)
    if not expert_group:
        raise ValueError("dispatch needs a mesh whose rules split the experts.")
    if valid is None:
        valid = jnp.ones(x.shape[:1], bool)
    hidden_axes: set[str] = set()

    def param_spec(names, leaf):
        # Only the experts' own axes and the hidden dimension's stay split; the rest
        # (fsdp's split of ``embed``) is gathered, as FSDP gathers every weight.
        dims = []
        for name, dim in zip(names, jnp.shape(leaf), strict=True):
            group = _mesh_axes(name, dim, sizes, free) if name in (axes.EXPERT, axes.MLP) else ()
            if name == axes.MLP:
                hidden_axes.update(group)
            dims.append(group or None)
        return P(*dims)

    param_specs = jax.tree.map(
        param_spec, param_names, params, is_leaf=lambda n: isinstance(n, tuple)
    )
    token_spec = P(_mesh_axes(axes.BATCH, x.shape[0], sizes, free) or None)
    body = functools.partial(
        _local_dispatch,
        expert_fn,
        expert_axes=expert_group,
        shards=shards,
        hidden_axes=tuple(sorted(hidden_axes)),
        num_experts=num_experts,
        capacity_factor=capacity_factor,
    )
    # Every free axis goes manual: inside, each device sees only its own tokens.
    # check_vma=False: when the tokens do not divide the expert axes they are
    # replicated over them and so is the result, which the check cannot see.
    return jax.shard_map(
        body,
        in_specs=(param_specs, *[token_spec] * 4),
        out_specs=token_spec,
        axis_names=free,
        check_vma=False,
    )(params, x, expert_ids, weights, valid)


def _local_dispatch(
    expert_fn: ExpertFn,
    params: Any,
    x: Array,
    expert_ids: Array,
    weights: Array,
    valid: Array,
    *,
    expert_axes: tuple[str, ...],
    shards: int,
    hidden_axes: tuple[str, ...],
    num_experts: int,
    capacity_factor: float | None,
) -> Array:
    """One device's part of ``dispatch`` (inside ``shard_map``): ``x [n, E]``."""
    n, e = x.shape
    k = expert_ids.shape[-1]
    local = num_experts // shards  # experts per device; expert i lives on i // local
    cap = n * k if capacity_factor is None else math.ceil(capacity_factor * n * k / shards)
    cap = max(1, min(cap, n * k))

    # 1. This device's assignments sorted by expert, hence by destination device;
    # padding tokens get expert X (device S): sorted last, sent nowhere.
    flat_ids = jnp.where(valid[:, None], expert_ids, num_experts).reshape(n * k)
    order = jnp.argsort(flat_ids, stable=True)  # [n*k]
    sorted_ids = flat_ids[order]
    token = order // k  # the token of each sorted assignment
    dest = sorted_ids // local  # [n*k] in [0, S]
    counts = jnp.bincount(dest, length=shards)  # device S (padding) not counted
    slot = jnp.arange(n * k) - (jnp.cumsum(counts) - counts)[jnp.minimum(dest, shards - 1)]
    kept = (dest < shards) & (slot < cap)
    # Dropped (padding, or past the capacity): an out-of-range slot the scatter skips.
    slot = jnp.where(kept, slot, cap)

    # 2. Send buffer [S, C, E] and the local expert id of every row (``local`` marks
    # an empty row, sorted after every real one).
    send = jnp.zeros((shards, cap, e), x.dtype).at[dest, slot].set(x[token], mode="drop")
    send_ids = jnp.full((shards, cap), local, jnp.int32)
    send_ids = send_ids.at[dest, slot].set((sorted_ids % local).astype(jnp.int32), mode="drop")
    recv = jax.lax.all_to_all(send, expert_axes, 0, 0, tiled=True)  # [S, C, E] by source
    recv_ids = jax.lax.all_to_all(send_ids, expert_axes, 0, 0, tiled=True)

    # 3. The local experts over the received rows, grouped by expert.
    rows, row_ids = recv.reshape(shards * cap, e), recv_ids.reshape(shards * cap)
    by_expert = jnp.argsort(row_ids, stable=True)
    group_sizes = jnp.bincount(row_ids, length=local).astype(jnp.int32)  # empty rows dropped
    out_sorted = expert_fn(params, rows[by_expert], group_sizes)
    out = jnp.zeros_like(out_sorted).at[by_expert].set(out_sorted)

    # 4. Back to the sending device, into the slots the rows left from.
    back = jax.lax.all_to_all(out.reshape(shards, cap, e), expert_axes, 0, 0, tiled=True)
    result = back.at[dest, slot].get(mode="fill", fill_value=0)  # [n*k, E], sorted order
    scale = jnp.where(kept, weights.reshape(n * k)[order], 0).astype(jnp.float32)
    combined = jnp.zeros((n, e), jnp.float32).at[token].add(result * scale[:, None])
    if hidden_axes:  # each device summed over its slice of the experts' hidden dim
        combined = jax.lax.psum(combined, hidden_axes)
    return combined.astype(x.dtype)

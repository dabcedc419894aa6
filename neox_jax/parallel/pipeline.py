"""Pipeline parallelism: the layer stack split over the mesh axis ``stage``.

The stacked ``[L, ...]`` layer parameters (and the ``[L, B, KV, S, D]`` KV cache) are
sharded along their layer axis over ``stage`` (the rules table maps ``layers`` and
``cache_layers`` there), so stage ``s`` holds layers ``[s L/S, (s+1) L/S)``. The batch is
cut into ``M`` microbatches that flow through the stages GPipe-style: at tick ``t``
stage ``s`` runs microbatch ``t - s`` through its layers and passes the result to stage
``s + 1`` with one ``ppermute``; after ``M + S - 1`` ticks the last stage holds every
microbatch's output. The bubble costs ``(S - 1) / (M + S - 1)`` of the ticks.

The schedule knows nothing of the model: it is given the function of one layer
(``neox_jax.model.block_fn``). ``neox_jax.training.step.pipeline_apply`` wraps it with
the model's ends into a drop-in for ``GPTNeoX.apply`` (same parameters, same outputs).
It is differentiable (a ``fori_loop`` of ``shard_map``-ed ops; ``ppermute`` transposes
to the reverse permutation), so the same schedule serves training (``train_step`` with
``pipeline_apply_fn``) and generation (``inference.step.forward`` with ``pipeline=M``
inside the decode loop). Only ``stage`` is manual inside the
``shard_map``; ``data``, ``fsdp`` and ``tensor`` keep working as usual around and inside it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

STAGE = "stage"

# block(layer_params, x, layer_cache, positions, segment_ids, cache_info)
#   -> (x, new layer_cache or None); layer_cache is None or {"k", "v"} [B, KV, S, D].
BlockFn = Callable[..., tuple[jax.Array, dict | None]]


def _split(x, m):
    """``[B, ...] -> [M, B/M, ...]`` contiguous microbatches."""
    return x.reshape(m, x.shape[0] // m, *x.shape[1:])


def _local_layers(block: BlockFn, layer_params, x, positions, segment_ids, k, v, info):
    """Run this stage's layers (a scan over its ``L/S`` stacked layers)."""

    def body(x, p_kv):
        p, k_l, v_l = p_kv
        cache = None if k_l is None else {"k": k_l, "v": v_l}
        x, new = block(p, x, cache, positions, segment_ids, info)
        return x, (None, None) if new is None else (new["k"], new["v"])

    x, (k, v) = jax.lax.scan(body, x, (layer_params, k, v))
    return x, k, v


def _pipeline_body(
    block,
    microbatches,
    stages,
    layer_params,
    x,
    positions,
    segment_ids,
    k,
    v,
    cache_segments,
    index,
):
    """Inside ``shard_map``: this stage's view of the whole schedule."""
    stage = jax.lax.axis_index(STAGE)
    m = microbatches
    xs, pos, seg = _split(x, m), _split(positions, m), _split(segment_ids, m)
    cached = k is not None
    if cached:
        rows = x.shape[0] // m
        segs = _split(cache_segments, m)
    outputs = jnp.zeros_like(xs)
    perm = [(i, (i + 1) % stages) for i in range(stages)]

    def tick(t, carry):
        buf, outputs, k, v = carry
        mb = t - stage
        valid = (mb >= 0) & (mb < m)
        mc = jnp.clip(mb, 0, m - 1)
        inp = jnp.where(stage == 0, xs[mc], buf)
        if cached:
            start = (0, mc * rows, 0, 0, 0)
            size = (k.shape[0], rows, *k.shape[2:])
            k_m = jax.lax.dynamic_slice(k, start, size)
            v_m = jax.lax.dynamic_slice(v, start, size)
            info = {"index": index, "segment_ids": segs[mc]}
            out, k_new, v_new = _local_layers(
                block, layer_params, inp, pos[mc], seg[mc], k_m, v_m, info
            )
            # Only a valid tick writes its rows of the cache.
            k = jax.lax.dynamic_update_slice(k, jnp.where(valid, k_new, k_m), start)
            v = jax.lax.dynamic_update_slice(v, jnp.where(valid, v_new, v_m), start)
        else:
            out, _, _ = _local_layers(block, layer_params, inp, pos[mc], seg[mc], None, None, None)
        keep = valid & (stage == stages - 1)
        outputs = outputs.at[mc].set(jnp.where(keep, out, outputs[mc]))
        buf = jax.lax.ppermute(out, STAGE, perm)
        return buf, outputs, k, v

    init = (jnp.zeros_like(xs[0]), outputs, k, v)
    _, outputs, k, v = jax.lax.fori_loop(0, m + stages - 1, tick, init)
    # Every stage returns the last stage's outputs (the head runs replicated).
    outputs = jax.lax.psum(jnp.where(stage == stages - 1, outputs, 0), STAGE)
    return outputs.reshape(x.shape), k, v


def pipeline_layers(
    block: BlockFn,
    layer_params,
    x,
    positions,
    segment_ids,
    *,
    microbatches: int,
    cache=None,
    cache_info=None,
    mesh=None,
):
    """The layer stack, pipelined over ``stage``. Returns ``(x, new k, new v)``.

    Args:
      block: one layer as a function of its parameters (``neox_jax.model.block_fn``).
      layer_params: stacked ``[L, ...]`` parameters (``params["layers"]``).
      x: ``[B, T, E]`` embeddings; positions, segment_ids: ``[B, T]``.
      microbatches: ``M``; must divide the batch.
      cache: None or ``{"k", "v"}`` stacked ``[L, B, KV, S, D]``.
      cache_info: ``{"index", "segment_ids" (updated)}`` with a cache.
      mesh: the mesh (default: the one set with ``jax.set_mesh``).
    """
    mesh = mesh or jax.sharding.get_abstract_mesh()
    stages = mesh.shape[STAGE]
    layers = jax.tree.leaves(layer_params)[0].shape[0]
    if layers % stages:
        raise ValueError(f"{layers} layers cannot be split evenly over {stages} stages.")
    if x.shape[0] % microbatches:
        raise ValueError(f"batch {x.shape[0]} is not divisible by {microbatches} microbatches.")
    stage_spec = jax.tree.map(lambda _: P(STAGE), layer_params)
    k = v = segs = index = None
    if cache is not None:
        k, v = cache["k"], cache["v"]
        segs, index = cache_info["segment_ids"], cache_info["index"]
    kv_spec = None if k is None else P(STAGE)
    fn = jax.shard_map(
        functools.partial(_pipeline_body, block, microbatches, stages),
        mesh=mesh,
        in_specs=(
            stage_spec,
            P(),
            P(),
            P(),
            kv_spec,
            kv_spec,
            None if segs is None else P(),
            None if index is None else P(),
        ),
        out_specs=(P(), kv_spec, kv_spec),
        axis_names={STAGE},
        check_vma=False,
    )
    return fn(layer_params, x, positions, segment_ids, k, v, segs, index)

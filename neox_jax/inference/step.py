"""``GPTNeoX`` with a KV cache, the layers unrolled: the forward pass generation runs.

``GPTNeoX`` scans over its layers (compile time flat in depth, the right choice for
training). Inside a decode loop on XLA:CPU the scan costs bandwidth, and decoding is
bandwidth bound: every step XLA copies each layer's weight slice out of the stacked
``[L, ...]`` parameters before the matmul reads it (a dynamic-slice fusion per kernel),
and slices, copies and re-stacks the ``[L, B, KV, S, D]`` cache as scan inputs and
outputs. Static slices of stacked weights are copied too, so the weights must be
separate buffers before the jitted loop: ``split_params`` (once, outside jit).

Here the model's own modules (``Block``, ``LayerNorm``, ``Linear``: every parameter,
activation, attention kernel switch and quantized weight behaves as in the model) are
applied once per layer, and the cache is a tuple of per-layer ``[B, KV, S, D]`` buffers
that the while loop updates in place. The glue mirrors ``GPTNeoX.__call__`` with a
cache; tests check it against the model, full recomputation and transformers.
Measured effect: experiments/decode_bench/README.md.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from neox_jax.errors import UserError
from neox_jax.model import (
    ModelConfig,
    block_fn,
    cache_logical_axes,
    embed_tokens,
    init_cache,
    output_logits,
    prepare_inputs,
    rolling_cache,
    updated_cache,
)
from neox_jax.parallel.pipeline import pipeline_layers

Array = jax.Array


def split_params(params) -> dict:
    """``params`` with ``layers`` as a tuple of per-layer trees (separate buffers).

    Call once, outside jit. While the caller also keeps the stacked params, the layer
    weights are held twice.
    """
    layers = params["layers"]
    if isinstance(layers, tuple | list):
        return params
    count = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(_layer(layers, i) for i in range(count))}


def _layer(layers, i: int):
    if isinstance(layers, tuple | list):
        return layers[i]
    return jax.tree.map(lambda a: a[i], layers)  # a static slice: copied on every call


def layer_cache(
    config: ModelConfig,
    batch: int,
    max_length: int,
    dtype=None,
    *,
    stacked: bool = False,
    rolling: bool = False,
) -> dict:
    """An empty cache: ``init_cache``'s layout with ``k``/``v`` as per-layer tuples, or
    (``stacked``, for the pipeline) the ``[L, B, KV, S, D]`` arrays themselves.

    Under ``nn.logical_axis_rules`` and a mesh the buffers carry the cache's logical
    sharding (heads over ``tensor``, layers over ``stage``, batch over ``data``/``fsdp``).
    """
    cache = init_cache(config, batch, max_length, dtype, rolling=rolling)
    names = tuple(cache_logical_axes()["k"])
    if stacked:
        k, v = (nn.with_logical_constraint(cache[n], names) for n in ("k", "v"))
        return {**cache, "k": k, "v": v}
    per_layer = lambda a: tuple(nn.with_logical_constraint(x, names[1:]) for x in a)  # noqa: E731
    return {**cache, "k": per_layer(cache["k"]), "v": per_layer(cache["v"])}


def map_cache_rows(cache: dict, fn) -> dict:
    """Apply ``fn`` (a function of a ``[B, ...]`` array) to every batch row of the cache,
    whichever layout (per-layer tuples or stacked ``[L, B, ...]``)."""
    if isinstance(cache["k"], tuple | list):
        kv = {n: tuple(map(fn, cache[n])) for n in ("k", "v")}
    else:
        kv = {n: jax.vmap(fn)(cache[n]) for n in ("k", "v")}
    return {**cache, **kv, "segment_ids": fn(cache["segment_ids"])}


def forward(
    config: ModelConfig,
    params,
    tokens: Array,
    positions: Array,
    segment_ids: Array,
    cache: dict,
    *,
    compute_logits: bool = True,
    all_logits: bool = False,
    pipeline: int = 0,
):
    """Run ``tokens`` through the model, writing their keys/values into ``cache``.

    Args:
      config: the model config.
      params: ``GPTNeoX`` parameters, stacked or from ``split_params`` (faster in loops).
      tokens, positions, segment_ids: ``[B, T]`` int ids, rotary positions, segment ids
        (0 = padding, never attended).
      cache: a ``layer_cache`` tree; the tokens are written at ``cache["index"]``.
      compute_logits: also return the logits of the last position.
      all_logits: return the logits of every position, ``[B, T, V]`` (prompt scoring).
      pipeline: 0 runs the layers here, one after another; ``M > 0`` runs them as a
        pipeline over the mesh's ``stage`` axis with ``M`` microbatches (fewer when ``M``
        does not divide the batch); then ``params`` and ``cache`` must be stacked.

    Returns:
      ``(logits [B, V] fp32 of the last position or None, new cache)``, the cache index
      advanced by ``T``.
    """
    rolling = rolling_cache(config, cache)
    if rolling and pipeline:
        raise UserError(
            "a rolling sliding-window KV cache cannot run as a pipeline yet; "
            "build the cache with rolling=False."
        )
    positions, segment_ids, info = prepare_inputs(tokens, positions, segment_ids, cache, rolling)
    x = embed_tokens(config, params, tokens)  # [B, T, E]
    block = block_fn(config)
    if pipeline:
        x, new_k, new_v = pipeline_layers(
            block,
            params["layers"],
            x,
            positions,
            segment_ids,
            microbatches=math.gcd(pipeline, tokens.shape[0]),
            cache={"k": cache["k"], "v": cache["v"]},
            cache_info=info,
        )
    else:
        new_k, new_v = [], []
        for i in range(config.num_hidden_layers):
            x, updated = block(
                _layer(params["layers"], i),
                x,
                {"k": cache["k"][i], "v": cache["v"][i]},
                positions,
                segment_ids,
                info,
                layer=i,
            )
            new_k.append(updated["k"])
            new_v.append(updated["v"])
        new_k, new_v = tuple(new_k), tuple(new_v)
    new_cache = updated_cache({"k": new_k, "v": new_v}, info, tokens.shape[1])
    if not compute_logits:
        return None, new_cache
    if all_logits:
        return output_logits(config, params, x), new_cache
    return output_logits(config, params, x[:, -1:])[:, 0], new_cache

"""``GPTNeoX`` with a KV cache, the layers unrolled: the forward pass generation runs.

``GPTNeoX`` scans over its layers (compile time flat in depth, the right choice for
training). Inside a decode loop on XLA:CPU the scan costs bandwidth, and decoding is
bandwidth bound: every step XLA copies each layer's weight slice out of the stacked
``[L, ...]`` parameters before the matmul reads it (a dynamic-slice fusion per kernel),
and slices, copies and re-stacks the ``[L, B, KV, S, D]`` cache as scan inputs and
outputs. Static slices of stacked weights are copied too, so the weights must be
separate buffers before the jitted loop: ``split_params`` (once, outside jit).
It also keeps the untied output head as a ``[V, E]`` copy (``VOCAB_MAJOR_HEAD``):
XLA:CPU's matmul runs the few-row vocabulary projection ``[B, E] x [E, V]``
1.4-1.7x faster per CPU-second when the weight is stored vocabulary-major
(``x @ W.T``, as a tied head is), measured on the decode step itself.

Here the model's own modules (``Block``, ``LayerNorm``, ``Linear``: every parameter,
activation, attention kernel switch and quantized weight behaves as in the model) are
applied once per layer, and the cache is a tuple of per-layer ``[B, KV, S, D]`` buffers
that the while loop updates in place. On CPU, given the config, ``split_params`` keeps
a plain GPT-NeoX layer instead as two fused weight products (``inference.fused``),
which ``forward`` runs in place of ``Block``. The glue mirrors ``GPTNeoX.__call__`` with a
cache; tests check it against the model, full recomputation and transformers.
Measured effect: experiments/decode_bench/README.md.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from neox_jax.errors import UserError
from neox_jax.inference import fused
from neox_jax.inference.fused import FUSED_LAYERS
from neox_jax.model import (
    ModelConfig,
    axes,
    block_fn,
    cache_logical_axes,
    embed_tokens,
    final_norm,
    init_cache,
    output_logits,
    prepare_inputs,
    rolling_cache,
    updated_cache,
)
from neox_jax.parallel.pipeline import pipeline_layers

Array = jax.Array


VOCAB_MAJOR_HEAD = "embed_out_vocab_major"  # split_params' [V, E] copy of embed_out/kernel


def split_params(
    params, config: ModelConfig | None = None, *, batch: int | None = None, input_major=False
) -> dict:
    """``params`` with ``layers`` as a tuple of per-layer trees (separate buffers), and
    on CPU a plain untied output head also as a ``[V, E]`` copy under ``VOCAB_MAJOR_HEAD``
    (``forward`` projects with it; ``embed_out`` stays for code that reads it).

    With ``config``, on one CPU device, and when every layer is a plain GPT-NeoX layer
    (``fused.fusable``), the layers are instead kept as ``fused.fuse_layer``'s two
    concatenated products per layer under ``FUSED_LAYERS`` (``forward`` runs those;
    ``layers`` stays as given, for code that reads it), in the blocks of input columns
    that suit ``batch`` rows per step (``fused.block_columns``; default several rows).
    Given params split already, returns them with their fused weights in ``batch``'s
    layout, sharing every buffer that layout does not change (``fused.reblock``).
    ``input_major``: the fused weights input-major instead (``fused.to_input_major``) and
    no ``[V, E]`` head copy (the head is ``embed_out``'s ``[E, V]``), for programs
    compiled with ``fused.XLA_DOTS`` (``uses_xla_dots``); where nothing is fused, the
    same as without it.

    Call once, outside jit. While the caller also keeps the stacked params, the layer
    weights are held twice, and on CPU the head is always held twice.
    """
    if input_major:
        split = split_params(params, config, batch=batch)
        if FUSED_LAYERS not in split:
            return split
        layers = tuple(fused.to_input_major(layer) for layer in split[FUSED_LAYERS])
        split = {k: v for k, v in split.items() if k != VOCAB_MAJOR_HEAD}
        return {**split, FUSED_LAYERS: layers}
    layers = params["layers"]
    columns = fused.block_columns(2 if batch is None else batch)
    if FUSED_LAYERS in params:  # already split
        if fused.is_input_major(params[FUSED_LAYERS]):
            raise ValueError("split_params: these params are input-major; split the originals.")
        params = {**params, FUSED_LAYERS: fused.reblock(params[FUSED_LAYERS], columns)}
        return _head_copy(params)
    if config is not None and _fuse_here(params):
        count = config.num_hidden_layers
        per_layer = [_layer(layers, i) for i in range(count)]
        if all(fused.fusable(config, layer) for layer in per_layer):
            layers = tuple(fused.fuse_layer(layer, columns) for layer in per_layer)
            return _head_copy({**params, FUSED_LAYERS: layers})
    if not isinstance(layers, tuple | list):
        count = jax.tree.leaves(layers)[0].shape[0]
        params = {**params, "layers": tuple(_layer(layers, i) for i in range(count))}
    return _head_copy(params)


class BatchLayouts:
    """``split_params``' weights for each batch size a holder decodes at, each layout
    built on first use: ``layouts(batch)`` returns the params for ``batch`` rows.

    One row per step (batch 1) reads each fused weight as one block, a few rows read
    them in blocks of ``fused.K_BLOCK`` input columns (``fused.block_columns``: the
    blocks cost batch 1 8 % of its speed and give batch 16 16 %, pythia-160m), and from
    ``fused.INPUT_MAJOR_ROWS`` rows they are input-major, one block each, for a decode
    program compiled with XLA's own dots (``fused.input_major_rows``; ``uses_xla_dots``).
    A holder that decodes at only one batch size holds one layout; one that decodes at
    several holds the weights whose layouts differ again (up to all the layer weights,
    e.g. one row and sixteen). The biases are shared. Where nothing is fused (a mesh,
    a config ``fused.fusable`` refuses), every batch size gets the same params.
    """

    def __init__(self, params, config: ModelConfig):
        self._params, self._config = params, config
        self._built: dict[int | str, dict] = {}  # block columns or "input_major" -> params

    def __call__(self, batch: int, *, xla_dots: bool = True) -> dict:
        """The params for ``batch`` rows; ``xla_dots=False`` for a program compiled
        without ``fused.XLA_DOTS`` (never input-major)."""
        input_major = xla_dots and fused.input_major_rows(batch)
        key = "input_major" if input_major else fused.block_columns(batch)
        if key not in self._built:
            first = next(iter(self._built.values()), None)
            if first is not None and FUSED_LAYERS not in first:
                return first  # nothing fused: no layouts to tell apart
            # Another output-major layout shares its unchanged buffers (``reblock``).
            base = next((p for k, p in self._built.items() if k != "input_major"), None)
            self._built[key] = split_params(
                self._params if base is None else base,
                self._config,
                batch=batch,
                input_major=input_major,
            )
        return self._built[key]


def uses_xla_dots(params) -> bool:
    """Whether ``params`` hold input-major fused weights, whose programs are compiled
    with ``fused.XLA_DOTS`` (``BatchLayouts``)."""
    return isinstance(params, dict) and fused.is_input_major(params.get(FUSED_LAYERS, ()))


_XLA_DOTS_PROGRAMS: dict = {}  # jitted function -> the same with fused.XLA_DOTS


def program_for(params, jitted, **jit_kwargs):
    """``jitted`` (a ``jax.jit`` function), or for input-major weights
    (``uses_xla_dots``) the same function jitted again with ``jit_kwargs`` (its own
    static and donated arguments) and ``fused.XLA_DOTS``, built once: XLA's own dots
    read those weights faster than YNNPACK (``inference/fused.py``)."""
    if not uses_xla_dots(params):
        return jitted
    if jitted not in _XLA_DOTS_PROGRAMS:
        options = fused.xla_dot_options()
        program = jax.jit(jitted.__wrapped__, compiler_options=options, **jit_kwargs)
        _XLA_DOTS_PROGRAMS[jitted] = program
    return _XLA_DOTS_PROGRAMS[jitted]


def _fuse_here(params) -> bool:
    """Fused layers only on XLA:CPU (measured there), with unsharded weights."""
    if jax.default_backend() != "cpu":
        return False
    leaves = jax.tree.leaves(params["layers"])
    return all(not isinstance(a, jax.Array) or len(a.sharding.device_set) == 1 for a in leaves)


def _head_copy(params) -> dict:
    """``params`` with the output head's ``[V, E]`` copy (see ``split_params``)."""
    head = params.get("embed_out")
    kernel = head.get("kernel") if isinstance(head, dict) and len(head) == 1 else None
    # A plain float array only: not a quantized weight, no LoRA adapter beside it. On
    # XLA:CPU only (measured there); accelerators keep one copy of the head in memory.
    plain = getattr(kernel, "ndim", 0) == 2 and jnp.issubdtype(kernel.dtype, jnp.floating)
    if plain and VOCAB_MAJOR_HEAD not in params and jax.default_backend() == "cpu":
        params = {**params, VOCAB_MAJOR_HEAD: jnp.asarray(kernel).T}  # a [V, E] copy
    return params


def logits_of(config: ModelConfig, params, x: Array) -> Array:
    """``output_logits`` (final norm, output head: ``[B, T, E]`` -> fp32 ``[B, T, V]``),
    from ``split_params``' ``[V, E]`` head copy when there is one: the same products
    as ``Linear`` (compute dtype, then fp32), only the weight's layout differs."""
    table = params.get(VOCAB_MAJOR_HEAD)
    if table is None:
        return output_logits(config, params, x)
    x = final_norm(config, params, x).astype(config.compute_dtype)
    logits = jnp.einsum("bte,ve->btv", x, table.astype(config.compute_dtype))
    return nn.with_logical_constraint(
        logits.astype(jnp.float32), (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB)
    )


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
        fused_layers = params.get(FUSED_LAYERS)
        if fused_layers is not None:
            block = functools.partial(fused.fused_block, config)
        for i in range(config.num_hidden_layers):
            layer = _layer(params["layers"], i) if fused_layers is None else fused_layers[i]
            x, updated = block(
                layer,
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
        return logits_of(config, params, x), new_cache
    return logits_of(config, params, x[:, -1:])[:, 0], new_cache

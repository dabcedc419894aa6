"""``GPTNeoX``: embedding, a scanned stack of blocks, final norm, output projection.

The layers are one ``nn.scan`` over ``Block``, so every layer parameter carries a
leading ``[num_hidden_layers]`` axis (logical name ``layers``). That keeps compile time
flat in depth (the 44-layer 20B compiles as fast as 2 layers), and makes pipeline
stages a reshape of that axis.

Parameter tree (``kernel`` is ``[in, out]``; see ``neox_jax.convert.hf`` for the
mapping to Hugging Face names)::

    embed_in/embedding                                  [V, E]
    layers/input_layernorm/{scale,bias}                 [L, E]
    layers/post_attention_layernorm/{scale,bias}        [L, E]
    layers/attention/query_key_value/{kernel,bias}      [L, E, 3E], [L, 3E]
    layers/attention/dense/{kernel,bias}                [L, E, E], [L, E]
    layers/mlp/dense_h_to_4h/{kernel,bias}              [L, E, F], [L, F]
    layers/mlp/dense_4h_to_h/{kernel,bias}              [L, F, E], [L, E]
    final_layer_norm/{scale,bias}                       [E]
    embed_out/kernel                                    [E, V]   (absent when tied)

With the family options (``ModelConfig``): ``norm_type="rmsnorm"`` norms hold only
``scale``; ``fused_qkv=False`` replaces ``query_key_value`` by ``q_proj`` [L, E, H*D],
``k_proj``/``v_proj`` [L, E, KV*D] (biases per ``attention_bias``); ``qk_norm`` adds
``attention/{q_norm,k_norm}/scale`` [L, D]; ``gated_mlp`` replaces the MLP by
``gate_proj``/``up_proj`` [L, E, F] and ``down_proj`` [L, F, E] (biases per ``mlp_bias``).
Mixture-of-experts configs (``num_experts``) put the sparse MLP under ``layers/moe``
(see ``neox_jax.model.moe``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from neox_jax.model import axes
from neox_jax.model.config import ModelConfig
from neox_jax.model.grouped import is_rolling, ring_write
from neox_jax.model.layers import Block, Linear, norm_layer, small_init
from neox_jax.model.moe import MoEBlock, layer_flags

Array = jax.Array

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@flax.struct.dataclass
class ModelOutput:
    """What ``GPTNeoX`` returns when a cache or hidden states are asked for.

    logits: ``[B, T, V]`` fp32 (None when ``compute_logits=False``).
    cache: the updated KV cache (see ``init_cache``), or None.
    hidden_states: ``[L + 1, B, T, E]`` as transformers' ``output_hidden_states``:
      entry ``i < L`` is the input of layer ``i`` (0 = embeddings), entry ``L`` the
      final-LayerNorm output. None unless requested.
    """

    logits: Array | None
    cache: dict[str, Array] | None = None
    hidden_states: Array | None = None


class GPTNeoX(nn.Module):
    """GPT-NeoX causal language model (``GPTNeoXForCausalLM`` in transformers)."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        *,
        attention_mask: Array | None = None,
        cache: dict[str, Array] | None = None,
        return_hidden_states: bool = False,
        compute_logits: bool = True,
    ):
        """Run the model.

        Args:
          input_ids: ``[B, T]`` int token ids.
          positions: ``[B, T]`` rotary positions; default ``arange(T)`` (offset by the
            cache index when decoding), as transformers does without ``position_ids``.
          segment_ids: ``[B, T]`` int, 0 = padding; tokens attend only within their id
            (packed documents). Default: all ones.
          attention_mask: Hugging Face style ``[B, T]`` (1 = token, 0 = padding); used as
            ``segment_ids`` when those are not given.
          cache: a KV cache from ``init_cache``; the new keys/values are written at
            ``cache["index"]`` and the returned cache has the index advanced by ``T``.
          return_hidden_states: also return every layer's hidden states.
          compute_logits: skip the vocabulary projection (embeddings only need states).

        Returns:
          logits ``[B, T, V]`` (fp32) when neither ``cache`` nor ``return_hidden_states``
          is given (with ``compute_logits=False``: the final-normed states ``[B, T, E]``,
          which the training loss projects itself), else a ``ModelOutput``.
        """
        cfg = self.config
        if segment_ids is None:
            segment_ids = attention_mask
        positions, segment_ids, cache_info = prepare_inputs(
            input_ids, positions, segment_ids, cache, rolling_cache(cfg, cache)
        )
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.with_logical_partitioning(
                small_init(cfg.hidden_size), (axes.VOCAB, axes.EMBED)
            ),
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
            name="embed_in",
        )
        # Cast before the lookup (as nn.Embed does), ``embed_tokens`` after: the same
        # values, but the table's gradient accumulates in the compute dtype here, as
        # training always has.
        table = _lookup_table(embed.embedding.astype(cfg.compute_dtype))
        x = _constrain_embeddings(jnp.take(table, input_ids.astype(jnp.int32), axis=0))

        layer_caches = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        # Mixed dense/sparse stacks tell each layer which it is (a scanned input).
        flags = (layer_flags(cfg),) if cfg.mixed_mlp else ()
        x, (new_layer_caches, layer_inputs) = self._stack(return_hidden_states)(
            x, layer_caches, positions, segment_ids, cache_info, *flags
        )
        x = _final_norm(cfg, name="final_layer_norm")(x)
        logits = None
        if compute_logits:
            head = None if cfg.tie_word_embeddings else _output_head(cfg, name="embed_out")
            logits = _project(cfg, x, head, embed.embedding)

        if cache is None and not return_hidden_states:
            return logits if compute_logits else x
        new_cache = None
        if cache is not None:
            new_cache = updated_cache(new_layer_caches, cache_info, input_ids.shape[1])
        hidden = None
        if return_hidden_states:
            hidden = jnp.concatenate([layer_inputs, x[None]], axis=0)
        return ModelOutput(logits=logits, cache=new_cache, hidden_states=hidden)

    def _stack(self, keep_hidden: bool):
        cfg = self.config
        block = block_class(cfg)
        if cfg.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        flags = (0,) if cfg.mixed_mlp else ()
        return nn.scan(
            block,
            # "intermediates": the router statistics MoE layers sow (neox_jax.model.moe).
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, *flags),
            length=cfg.num_hidden_layers,
            unroll=min(cfg.scan_unroll, cfg.num_hidden_layers),
            metadata_params={nn.PARTITION_NAME: axes.LAYERS},
            # Flax's default traces the layer once more before the scan, to check that
            # broadcast values are loop invariants: there are no broadcast variables or
            # outputs here (the broadcast inputs are positions, segment ids and cache
            # bookkeeping), and that trace was up to half the cost of tracing a forward
            # pass or the model's init (experiments/trace_bench/). Same scan, same program.
            check_constancy_invariants=False,
        )(cfg, keep_hidden, name="layers")


# ------------------------------------------- the model's ends, outside its scan
# GPTNeoX and the paths that run the layers themselves (the unrolled decode step, the
# pipeline) share these, so they cannot drift from each other.
def prepare_inputs(
    input_ids: Array,
    positions: Array | None,
    segment_ids: Array | None,
    cache: dict[str, Array] | None,
    rolling: bool = False,
) -> tuple[Array, Array, dict[str, Array] | None]:
    """Default positions and segment ids, and the cache bookkeeping of ``GPTNeoX``.

    Returns:
      ``(positions [B, T], segment_ids [B, T] int32, cache_info)``: positions default to
      ``arange(T)`` offset by the cache index, segment ids to ones; ``cache_info`` is
      None without a cache, else ``{"index", "segment_ids" [B, S] with these written}``
      (and, for a ``rolling`` window cache, ``"old_segment_ids"`` before the write).
    """
    batch, length = input_ids.shape
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    offset = 0 if cache is None else cache["index"]
    if positions is None:
        positions = jnp.broadcast_to(offset + jnp.arange(length, dtype=jnp.int32), (batch, length))
    cache_info = None
    if cache is not None and rolling:
        cache_info = {
            "index": cache["index"],
            "segment_ids": ring_write(cache["segment_ids"], segment_ids, cache["index"]),
            "old_segment_ids": cache["segment_ids"],
        }
    elif cache is not None:
        cache_info = {
            "index": cache["index"],
            "segment_ids": jax.lax.dynamic_update_slice(
                cache["segment_ids"], segment_ids, (0, cache["index"])
            ),
        }
    return positions, segment_ids, cache_info


def rolling_cache(config: ModelConfig, cache: dict[str, Array] | None) -> bool:
    """Whether ``cache`` is a rolling sliding-window cache (see ``init_cache``)."""
    if cache is None:
        return False
    return is_rolling(config.sliding_window, cache["segment_ids"].shape[1], cache["index"])


def updated_cache(layer_caches: dict[str, Array], cache_info: dict[str, Array], length: int):
    """The cache after ``length`` tokens: new ``k``/``v``, segments, index advanced."""
    return {
        **layer_caches,
        "segment_ids": cache_info["segment_ids"],
        "index": cache_info["index"] + length,
    }


def block_class(config: ModelConfig) -> type[Block]:
    """``MoEBlock`` for mixture-of-experts configs, else ``Block``."""
    return MoEBlock if config.is_moe else Block


def block_fn(config: ModelConfig):
    """One layer as a function of its parameters, for paths that run the layers
    themselves: ``(layer_params, x, layer_cache, positions, segment_ids, cache_info,
    layer=None) -> (x, new layer_cache or None)``; ``layer`` (the layer's index) is
    needed only when the config mixes dense and sparse layers."""
    block = block_class(config)(config)

    def apply(layer_params, x, layer_cache, positions, segment_ids, cache_info, layer=None):
        sparse = None if layer is None else layer in config.sparse_layers
        x, (new_cache, _) = block.apply(
            {"params": layer_params}, x, layer_cache, positions, segment_ids, cache_info, sparse
        )
        return x, new_cache

    return apply


def _lookup_table(table: Array) -> Array:
    """The ``[V, E]`` input table whole along ``embed`` for the lookup.

    Under FSDP the table is stored split along ``embed``; a lookup into it would give
    embeddings split along ``embed``, which XLA then reshards to the batch layout by
    gathering the activations (its "involuntary full rematerialization" warning).
    Gathering the table first, as FSDP does for every other weight, keeps the lookup's
    output batch-sharded from the start.
    """
    return nn.with_logical_constraint(table, (axes.VOCAB, None))


def _constrain_embeddings(x: Array) -> Array:
    return nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))


def _final_norm(config: ModelConfig, name: str | None = None):
    return norm_layer(config, name=name)


def _output_head(config: ModelConfig, name: str | None = None) -> Linear:
    return Linear(
        features=config.vocab_size,
        kernel_axes=(axes.EMBED, axes.VOCAB),
        kernel_init=small_init(config.hidden_size),
        use_bias=False,
        dtype=config.compute_dtype,
        param_dtype=config.params_dtype,
        name=name,
    )


def _project(config: ModelConfig, x: Array, head, table: Array) -> Array:
    """``[B, T, E]`` normed states -> fp32 logits ``[B, T, V]``: the untied ``head``, or
    the input embedding ``table`` when tied (``head`` is None)."""
    if head is None:
        logits = jnp.einsum(
            "bte,ve->btv", x, table.astype(x.dtype), preferred_element_type=jnp.float32
        )
    else:
        logits = head(x)
    return nn.with_logical_constraint(
        logits.astype(jnp.float32), (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB)
    )


def embed_tokens(config: ModelConfig, params, input_ids: Array) -> Array:
    """``[B, T]`` ids -> ``[B, T, E]`` embeddings in the compute dtype (``embed_in``)."""
    table = _lookup_table(params["embed_in"]["embedding"])
    x = jnp.take(table, input_ids.astype(jnp.int32), axis=0).astype(config.compute_dtype)
    return _constrain_embeddings(x)


def final_norm(config: ModelConfig, params, x: Array) -> Array:
    """The final layer norm (``final_layer_norm``) of ``[B, T, E]`` states."""
    return _final_norm(config).apply({"params": params["final_layer_norm"]}, x)


def output_logits(config: ModelConfig, params, x: Array) -> Array:
    """Final layer norm and output head: ``[B, T, E]`` -> fp32 logits ``[B, T, V]``."""
    x = final_norm(config, params, x)
    head = None
    if not config.tie_word_embeddings:
        head = functools.partial(_output_head(config).apply, {"params": params["embed_out"]})
    return _project(config, x, head, params["embed_in"]["embedding"])


# ------------------------------------------------------------------ utilities
def init_params(config: ModelConfig, rng: Array) -> dict[str, Any]:
    """Random parameters (unboxed) for ``config``; GPT-NeoX's small_init/wang_init."""
    variables = GPTNeoX(config).init(rng, jnp.zeros((1, 1), jnp.int32))
    return nn.meta.unbox(variables["params"])


@functools.lru_cache(maxsize=32)
def _abstract_variables(config: ModelConfig) -> dict[str, Any]:
    """``GPTNeoX(config).init``'s boxed parameters as ``jax.ShapeDtypeStruct``s.

    Tracing the whole model's init is the costly part of both functions below, and
    loading, sharding, checking and converting a model each ask for them; the config is
    frozen and hashable, so one trace per config serves every call. Callers get new
    containers each time (both build new trees) around leaves that are never mutated.
    """
    return jax.eval_shape(
        lambda: GPTNeoX(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    )["params"]


def abstract_params(config: ModelConfig) -> dict[str, Any]:
    """Parameter shapes/dtypes as ``jax.ShapeDtypeStruct``; allocates nothing."""
    # The boxes' values, not ``nn.meta.unbox``: outside a trace, under a mesh and logical
    # axis rules, unbox would apply a sharding constraint to each ShapeDtypeStruct.
    return jax.tree.map(
        lambda box: box.value,
        _abstract_variables(config),
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def param_logical_axes(config: ModelConfig) -> dict[str, Any]:
    """The logical axis names of every parameter, as a tree of ``PartitionSpec``."""
    return nn.get_partition_spec(_abstract_variables(config))


def count_params(config: ModelConfig, *, active: bool = False) -> int:
    """Number of parameters, from ``jax.eval_shape`` (nothing is allocated).

    A config mixing dense and sparse layers stacks both MLPs in every layer (see
    ``neox_jax.model.moe``); the unused ones are not counted. ``active``: only the
    parameters one token uses, ``num_experts_per_tok`` of each sparse layer's experts
    (a mixture of experts' "activated" count); the same as the total for dense models.
    """
    shapes = abstract_params(config)
    total = sum(int(x.size) for x in jax.tree.leaves(shapes))
    if not config.is_moe:
        return total
    layers, sparse = config.num_hidden_layers, len(config.sparse_layers)

    def per_layer(tree) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(tree)) // layers

    if config.mixed_mlp:
        total -= per_layer(shapes["layers"]["mlp"]) * sparse
        total -= per_layer(shapes["layers"]["moe"]) * (layers - sparse)
    if active:
        idle = config.num_experts - config.num_experts_per_tok
        total -= per_layer(shapes["layers"]["moe"]["experts"]) * sparse * idle // config.num_experts
    return total


def init_cache(
    config: ModelConfig, batch: int, max_length: int, dtype=None, *, rolling: bool = False
) -> dict[str, Array]:
    """An empty KV cache.

    Layout: ``k``, ``v``: ``[L, B, KV, S, D]``, heads-major so that a decode step's
    attention reads each head's slots as one contiguous block (no transpose of the
    cache per step); only the key/value heads (grouped-query attention stores
    ``num_attention_heads / num_key_value_heads`` times fewer bytes);
    ``segment_ids``: ``[B, S]`` (0 = empty or
    padding slot); ``index``: int32 scalar, the next slot to write.

    ``rolling`` (models with a ``sliding_window`` shorter than ``max_length``): only
    ``S = sliding_window`` slots, reused modulo the window (a token at slot ``i`` sees
    only the last ``window`` keys, so older ones are never read again); the cache
    then takes any number of tokens, in ``window / max_length`` of the memory.
    """
    dtype = dtype or config.compute_dtype
    if rolling and config.sliding_window is not None:
        max_length = min(max_length, config.sliding_window)
    shape = (
        config.num_hidden_layers,
        batch,
        config.kv_heads,
        max_length,
        config.head_dim,
    )
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "segment_ids": jnp.zeros((batch, max_length), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def cache_logical_axes() -> dict[str, Any]:
    """Logical axis names of the ``init_cache`` tree, for sharding it."""
    kv = jax.sharding.PartitionSpec(
        axes.CACHE_LAYERS, axes.CACHE_BATCH, axes.CACHE_HEADS, axes.CACHE_LENGTH, axes.CACHE_KV
    )
    return {
        "k": kv,
        "v": kv,
        "segment_ids": jax.sharding.PartitionSpec(axes.CACHE_BATCH, axes.CACHE_LENGTH),
        "index": jax.sharding.PartitionSpec(),
    }

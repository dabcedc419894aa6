"""The decoder building blocks: LayerNorm/RMSNorm, Linear, rotary, attention, MLP, block.

GPT-NeoX by default; the ``ModelConfig`` family options switch in grouped KV heads,
separate q/k/v projections, QK-norm, RMSNorm and the gated MLP (Llama, Mistral, Qwen).

Shapes: ``B`` batch, ``T`` length, ``S`` cache length, ``E`` hidden, ``H`` heads,
``KV`` key/value heads, ``G = H / KV``, ``D`` head size, ``F`` intermediate size, ``V`` vocabulary.

Every linear layer is a ``Linear`` with a ``kernel`` of shape ``[in, out]`` (the
transpose of a torch ``nn.Linear.weight``) and a ``bias`` of shape ``[out]``. The fused
``query_key_value`` projection keeps Hugging Face's output order, per head ``[q|k|v]``:
output feature ``h * 3D + j * D + d`` is component ``j`` (0=q, 1=k, 2=v), dimension
``d`` of head ``h``. Sharding its output axis into contiguous chunks therefore hands
whole heads to each tensor-parallel shard, which is why Megatron chose this layout.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from neox_jax.kernels import reference
from neox_jax.kernels.causal_split import causal_split_attention, split_applies
from neox_jax.kernels.decode_attention import decode_attention
from neox_jax.kernels.flash_attention import flash_attention
from neox_jax.model import axes
from neox_jax.model.activations import activation, erf_gelu  # noqa: F401 (re-exported)
from neox_jax.model.config import ModelConfig
from neox_jax.model.grouped import (
    cache_attention,
    fused_attention,
    grouped_attention,
    is_rolling,
    ring_write,
    rolling_attention,
    step_attention,
    window_mask,
)
from neox_jax.model.paged_cache import PAGED, paged_cached_attention
from neox_jax.model.per_device import per_device
from neox_jax.model.residual import materialized_grad
from neox_jax.model.rotary import apply_rotary, rotary_attention_scaling, rotary_inv_freq

Array = jax.Array


# --------------------------------------------------------------- initialisers
def small_init(dim: int):
    """GPT-NeoX ``small_init``: N(0, sqrt(2 / 5d)) (Nguyen & Salazar 2019); Pythia's init_method."""
    return nn.initializers.normal(math.sqrt(2.0 / (5.0 * dim)))


def wang_init(dim: int, num_layers: int):
    """GPT-NeoX ``wang_init``: N(0, 2 / (L sqrt(d))) for the layers writing the residual."""
    return nn.initializers.normal(2.0 / (num_layers * math.sqrt(dim)))


# ---------------------------------------------------------------------- layers
class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 (two-pass variance, as torch), output in ``dtype``."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dim = x.shape[-1]
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)),
            (dim,),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, (axes.NORM,)),
            (dim,),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class RMSNorm(nn.Module):
    """RMSNorm as transformers' ``LlamaRMSNorm``: normalised in fp32, cast back to the
    input dtype, then scaled (so bf16 rounds where transformers rounds)."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return (scale.astype(self.dtype) * y.astype(x.dtype)).astype(self.dtype)


def norm_layer(config: ModelConfig, name: str | None = None) -> nn.Module:
    """The config's normalisation (``norm_type``) over the model width."""
    cls = RMSNorm if config.norm_type == "rmsnorm" else LayerNorm
    return cls(
        eps=config.layer_norm_eps,
        dtype=config.compute_dtype,
        param_dtype=config.params_dtype,
        name=name,
    )


class Linear(nn.Module):
    """``y = x @ kernel + bias`` over the last axis; ``kernel`` is ``[in, out]``.

    ``kernel_axes`` are the logical names of (in, out); the bias takes the out name.
    """

    features: int
    kernel_axes: tuple[str, str]
    kernel_init: nn.initializers.Initializer
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        stored = self.get_variable("params", "kernel")
        if hasattr(stored, "matmul"):  # a neox_jax.quant.QuantizedWeight replaced the kernel
            y = stored.matmul(x, self.dtype)  # dequantizes on the fly; see neox_jax.quant
        else:
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                (x.shape[-1], self.features),
                self.param_dtype,
            )
            y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (self.kernel_axes[1],)),
                (self.features,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        adapter = self.get_variable("params", "lora")  # a finetune.lora.LoraAdapter, or None
        if adapter is not None:  # y + scale * dropout(x) @ A @ B, after the bias as PEFT does
            # Dropout noise comes from the "dropout" stream, which the layer scan splits
            # so each layer draws its own (finetune.lora.lora_apply_fn passes it).
            use_dropout = adapter.dropout > 0 and self.has_rng("dropout")
            y = y + adapter(x, self.dtype, self.make_rng("dropout") if use_dropout else None)
        return y


# ------------------------------------------------------------------- attention
def attend(
    config: ModelConfig,
    q,
    k,
    v,
    q_segment_ids,
    kv_segment_ids,
    *,
    q_offset=0,
    cached: bool = False,
    length=None,
):
    """Dispatch on ``config.attention_impl``; every path equals ``reference.attention``.

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, T, KV, D]``, or the KV cache's ``[B, KV, S, D]``
        when ``cached`` (KV < H: grouped-query attention, K/V never repeated).
      q_segment_ids: ``[B, T]``; kv_segment_ids: ``[B, T]`` or ``[B, S]`` (0 = padding /
        empty slot).
      q_offset: cache slot of the first query (``cached`` only).
      cached: k/v are a KV cache written up to ``length`` slots.
    """
    if cached:
        return _attend_cache(config, q, k, v, q_segment_ids, kv_segment_ids, q_offset, length)
    window = config.sliding_window
    if config.attention_impl == "pallas" and _kv_shards_follow_queries(q.shape[2], k.shape[2]):
        # k/v are named like q: the kernels map query head h to K/V head h // G locally,
        # which holds on each shard when both head axes split the same way (checked).
        seq = (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, axes.ACT_KV)  # q, k, v, out
        flash = lambda q, k, v, seg: flash_attention(q, k, v, seg, causal=True, window=window)  # noqa: E731
        run = per_device(flash, (seq, seq, seq, seq[:2]), seq, q.shape)
        return run(q, k, v, q_segment_ids)
    if config.attention_impl == "cudnn":
        return fused_attention(q, k, v, q_segment_ids, window)
    self_attention = q_segment_ids is kv_segment_ids and k.shape[2] == q.shape[2]
    if self_attention and window is None and split_applies(q.shape[1], k.shape[1]):
        return causal_split_attention(q, k, v, q_segment_ids)  # kernels.causal_split
    mask = reference.make_attention_mask(q_segment_ids, kv_segment_ids, causal=True)
    if window is not None:
        mask &= window_mask(q.shape[1], k.shape[1], 0, window)
    if k.shape[2] != q.shape[2]:
        return grouped_attention(q, k, v, mask)
    return reference.attention(q, k, v, mask)


def _pallas_decode(config: ModelConfig, q, k_cache) -> bool:
    """Whether ``attend`` over the cache ``[B, KV, S, D]`` runs the Pallas decode kernel."""
    pallas = config.attention_impl == "pallas" and q.shape[1] == 1
    return pallas and _kv_shards_follow_queries(q.shape[2], k_cache.shape[1])


def _attend_step(config: ModelConfig, q, k, v, layer_cache, q_segment_ids, cache_info):
    """``attend`` of one new token per row (``q [B, 1, H, D]``, ``k``/``v [B, 1, KV, D]``)
    over ``layer_cache`` as it was before the token's write, plus the token itself
    (``grouped.step_attention``); the same mask as ``attend`` over the written cache."""
    index, kv_segment_ids = cache_info["index"], cache_info["segment_ids"]
    slots = layer_cache["k"].shape[2]
    q_slot = jnp.asarray(index, jnp.int32).reshape(-1, 1, 1)  # scalar or [B]
    kv_slot = jnp.arange(slots, dtype=jnp.int32)[None, None, :]
    # [B, 1, S]: a slot written before this step, in the query's segment
    seen = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_slot < q_slot)
    seen &= kv_segment_ids[:, None, :] != 0
    if config.sliding_window is not None:
        seen &= kv_slot > q_slot - config.sliding_window
    itself = (q_segment_ids != 0)[:, None, :, None]  # [B, 1, 1, 1]
    k_cache, v_cache = (layer_cache[n].astype(q.dtype) for n in ("k", "v"))
    # The new key/value as the cache stores them (its dtype may be narrower), as read back.
    k, v = (t.astype(layer_cache[n].dtype).astype(q.dtype) for n, t in (("k", k), ("v", v)))
    return step_attention(q, k, v, k_cache, v_cache, seen[:, None], itself)


def _attend_cache(config, q, k, v, q_segment_ids, kv_segment_ids, q_offset, length):
    """``attend`` over a KV cache ``[B, KV, S, D]``: one token per row through the
    Pallas decode kernel, else XLA (``cache_attention``; chunked prefill too)."""
    window = config.sliding_window
    if _pallas_decode(config, q, k):
        seq = (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, axes.ACT_KV)
        cache = (axes.CACHE_BATCH, axes.CACHE_HEADS, axes.CACHE_LENGTH, axes.CACHE_KV)
        decode = lambda q, k, v, seg, n: decode_attention(  # noqa: E731
            q[:, 0], k, v, seg, length=n, window=window, layout="bksd"
        )
        out_shape = (q.shape[0], *q.shape[2:])  # [B, H, D]
        segments = (axes.CACHE_BATCH, axes.CACHE_LENGTH)
        run = per_device(decode, (seq, cache, cache, segments, ()), seq[::2] + seq[3:], out_shape)
        return run(q, k, v, kv_segment_ids, k.shape[2] if length is None else length)[:, None]
    mask = reference.make_attention_mask(
        q_segment_ids, kv_segment_ids, causal=True, q_offset=q_offset
    )
    if window is not None:
        mask &= window_mask(q.shape[1], k.shape[2], q_offset, window)
    return cache_attention(q, k, v, mask)


def _kv_shards_follow_queries(heads: int, kv_heads: int) -> bool:
    """Whether the mesh in force splits K/V heads wherever it splits query heads, so a
    kernel's local head ``h`` still reads local K/V head ``h // G``. Not so when the
    tensor axis divides the query heads but not the fewer K/V heads (they stay whole
    on every device): that layout runs the XLA path, which GSPMD partitions."""
    mesh = jax.sharding.get_abstract_mesh()
    if kv_heads == heads or mesh.empty:
        return True
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    entry = nn.logical_to_mesh_axes((axes.ACT_HEADS,))[0]
    group = (entry,) if isinstance(entry, str) else entry or ()
    split = math.prod(sizes[a] for a in group if a in sizes and a not in mesh.manual_axes)
    return heads % split != 0 or kv_heads % split == 0


def cached_attention(config: ModelConfig, q, k, v, layer_cache, segment_ids, cache_info):
    """Attention of ``T`` new tokens over one layer's KV cache, and the cache with their
    keys/values written at ``cache_info["index"]``.

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, T, KV, D]`` (after rotary).
      layer_cache: ``{"k", "v"}`` of ``[B, KV, S, D]``, heads-major: a step's attention
        reads each head's slots as one contiguous block, with no transpose of the cache.
      segment_ids: ``[B, T]``; cache_info: as ``prepare_inputs`` makes it.
    Returns ``(out [B, T, H, D], new layer_cache)``.
    """
    if PAGED in cache_info:  # the serving engine's paged cache, through the Pallas kernel
        return paged_cached_attention(q, k, v, layer_cache, cache_info)
    index = cache_info["index"]
    if is_rolling(config.sliding_window, layer_cache["k"].shape[2], index):
        out = rolling_attention(
            q, k, v, layer_cache["k"], layer_cache["v"], segment_ids,
            cache_info["old_segment_ids"], index, config.sliding_window,
        )  # fmt: skip
        new_cache = {
            n: ring_write(layer_cache[n], t.swapaxes(1, 2), index, axis=2)
            for n, t in (("k", k), ("v", v))
        }
        return out, new_cache
    write = lambda c, t: jax.lax.dynamic_update_slice(  # noqa: E731
        c, t.swapaxes(1, 2).astype(c.dtype), (0, 0, index, 0)
    )
    length = q.shape[1]
    if length == 1 and not _pallas_decode(config, q, layer_cache["k"]):
        # A decode step: attend over the cache before the write plus the new token, so
        # the write is the buffer's only user and runs in place.
        out = _attend_step(config, q, k, v, layer_cache, segment_ids, cache_info)
        # The write must come after the products that read the old buffer; XLA:CPU
        # copies the buffer (twice per layer at batch 1) unless the write depends on
        # them, so make it depend on the output (adding 0; NaN only where out is NaN).
        dep = out[:, :1, :1, :1] * 0  # [B, 1, 1, 1]
        k, v = k + dep.astype(k.dtype), v + dep.astype(v.dtype)
        return out, {"k": write(layer_cache["k"], k), "v": write(layer_cache["v"], v)}
    k_all, v_all = write(layer_cache["k"], k), write(layer_cache["v"], v)
    out = attend(
        config, q, k_all.astype(q.dtype), v_all.astype(q.dtype), segment_ids,
        cache_info["segment_ids"], q_offset=index, cached=True, length=index + length,
    )  # fmt: skip
    return out, {"k": k_all, "v": v_all}


class Attention(nn.Module):
    """Self-attention with (partial) rotary embeddings, optional grouped KV heads,
    QK-norm and a KV cache."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, layer_cache=None, cache_info=None):
        """Args:
          x: ``[B, T, E]``; positions, segment_ids: ``[B, T]``.
          layer_cache: None, or ``{"k", "v"}`` of ``[B, KV, S, D]`` for this layer.
          cache_info: ``{"segment_ids": [B, S] (already updated), "index": scalar}``.
        Returns ``(out [B, T, E], new layer_cache or None)``.
        """
        cfg = self.config
        batch, length, _ = x.shape
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim
        q, k, v = self._project_qkv(x)
        names = (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, axes.ACT_KV)
        # K/V heads shard like query heads only when there are as many of them.
        kv_names = names if cfg.kv_heads == heads else (*names[:2], axes.ACT_KV_HEADS, names[3])
        q = nn.with_logical_constraint(q, names)
        k, v = (nn.with_logical_constraint(t, kv_names) for t in (k, v))
        if cfg.qk_norm:  # per head, before rotary (Qwen3)
            norm = functools.partial(
                RMSNorm, eps=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
                param_dtype=cfg.params_dtype,
            )  # fmt: skip
            q, k = norm(name="q_norm")(q), norm(name="k_norm")(k)
        inv_freq, scale = rotary_inv_freq(cfg, positions), rotary_attention_scaling(cfg)
        q, k = (apply_rotary(t, positions, inv_freq, scale) for t in (q, k))

        if layer_cache is None:
            out = attend(cfg, q, k, v, segment_ids, segment_ids)
            new_cache = None
        else:
            out, new_cache = cached_attention(cfg, q, k, v, layer_cache, segment_ids, cache_info)
        out = nn.with_logical_constraint(out, names).reshape(batch, length, heads * head_dim)
        init = wang_init(cfg.hidden_size, cfg.num_hidden_layers)
        out = Linear(
            features=cfg.hidden_size,
            kernel_axes=(axes.HEADS, axes.EMBED),
            kernel_init=init,
            use_bias=cfg.out_bias,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
            name="dense",
        )(out)
        return out, new_cache

    def _project_qkv(self, x):
        """``[B, T, E]`` -> q ``[B, T, H, D]``, k and v ``[B, T, KV, D]``."""
        cfg = self.config
        batch, length, _ = x.shape
        heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
        dense = functools.partial(
            Linear,
            use_bias=cfg.attention_bias,
            kernel_init=small_init(cfg.hidden_size),
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
        )
        if cfg.fused_qkv:
            qkv = dense(
                features=3 * heads * head_dim,
                kernel_axes=(axes.EMBED, axes.HEADS),
                name="query_key_value",
            )(x)
            qkv = qkv.reshape(batch, length, heads, 3, head_dim)  # per head [q|k|v]
            return qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        q = dense(features=heads * head_dim, kernel_axes=(axes.EMBED, axes.HEADS), name="q_proj")
        k, v = (
            dense(features=kv_heads * head_dim, kernel_axes=(axes.EMBED, axes.KV_HEADS), name=n)
            for n in ("k_proj", "v_proj")
        )
        return (
            q(x).reshape(batch, length, heads, head_dim),
            k(x).reshape(batch, length, kv_heads, head_dim),
            v(x).reshape(batch, length, kv_heads, head_dim),
        )


class MLP(nn.Module):
    """GPT-NeoX's ``dense_4h_to_h(act(dense_h_to_4h(x)))``, or with ``gated_mlp`` the
    Llama form ``down_proj(act(gate_proj(x)) * up_proj(x))`` (SwiGLU when act is silu)."""

    config: ModelConfig
    intermediate_size: int | None = None  # None: the config's (a shared expert's is its own)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dense = functools.partial(
            Linear,
            use_bias=cfg.mlp_bias,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
        )
        names = ("gate_proj", "up_proj", "down_proj")
        if not cfg.gated_mlp:
            names = (None, "dense_h_to_4h", "dense_4h_to_h")
        up = functools.partial(
            dense,
            features=self.intermediate_size or cfg.intermediate_size,
            kernel_axes=(axes.EMBED, axes.MLP),
            kernel_init=small_init(cfg.hidden_size),
        )
        act_names = (axes.BATCH, axes.LENGTH, axes.ACT_MLP)
        h = nn.with_logical_constraint(up(name=names[1])(x), act_names)
        if cfg.gated_mlp:
            gate = nn.with_logical_constraint(up(name=names[0])(x), act_names)
            h = activation(cfg.hidden_act)(gate) * h
        else:
            h = activation(cfg.hidden_act)(h)
        init = wang_init(cfg.hidden_size, cfg.num_hidden_layers)
        return dense(
            features=cfg.hidden_size,
            kernel_axes=(axes.MLP, axes.EMBED),
            kernel_init=init,
            name=names[2],
        )(h)


class Block(nn.Module):
    """One transformer layer, parallel or sequential residual (as ``GPTNeoXLayer``).

    Written for ``nn.scan``: ``(carry=x, per-layer cache) -> (x, (new cache, layer input))``.
    ``neox_jax.model.moe.MoEBlock`` replaces ``_mlp`` in sparse layers; ``sparse`` is
    only read there.
    """

    config: ModelConfig
    keep_hidden: bool = False

    @nn.compact
    def __call__(self, x, layer_cache, positions, segment_ids, cache_info, sparse=None):
        cfg = self.config
        act_names = (axes.BATCH, axes.LENGTH, axes.ACT_EMBED)
        x = nn.with_logical_constraint(x, act_names)
        if min(cfg.scan_unroll, cfg.num_hidden_layers) > 1:  # unrolled: see model.residual
            x = materialized_grad(x)
        layer_input = x if self.keep_hidden else None
        norm = functools.partial(norm_layer, cfg)
        attn, new_cache = Attention(cfg, name="attention")(
            norm(name="input_layernorm")(x), positions, segment_ids, layer_cache, cache_info
        )
        if cfg.use_parallel_residual:
            # x + attn(ln1(x)) + mlp(ln2(x)), summed in transformers' order.
            h = norm(name="post_attention_layernorm")(x)
            x = self._mlp(h, segment_ids, sparse) + attn + x
        else:
            x = attn + x
            h = norm(name="post_attention_layernorm")(x)
            x = self._mlp(h, segment_ids, sparse) + x
        return nn.with_logical_constraint(x, act_names), (new_cache, layer_input)

    def _mlp(self, h, segment_ids, sparse=None):
        del segment_ids, sparse  # only the sparse MLP needs them
        return MLP(self.config, name="mlp")(h)

"""Mixture of experts: a router sends each token to ``top_k`` of ``num_experts`` gated MLPs.

Routing (``route``) is computed exactly as transformers' ``Qwen3MoeTopKRouter`` and
``MixtralTopKRouter``: router logits in fp32, softmax over the experts, the ``top_k``
largest probabilities (descending, as ``torch.topk``) and, with ``norm_topk_prob``,
those renormalised to sum to 1 (Mixtral always renormalises; its configs set it).
Each chosen expert computes ``down(act(gate(x)) * up(x))`` and the outputs are summed
with the routing weights.

The expert computation is separate from routing, so a parallel dispatch can replace
the local one: an entry of ``EXPERT_IMPLS`` is ``fn(x [N, E], routing, weights, act,
config) -> [N, E]``, and ``config.moe_impl`` picks one:

* ``ragged`` (default, dropless): the ``N * K`` (token, expert) pairs are sorted by
  expert and each projection is one grouped matmul, ``jax.lax.ragged_dot`` (the
  megablox approach, arXiv:2211.15841): work is proportional to ``N * K``, nothing is
  dropped.
* ``capacity``: each expert takes at most ``C = ceil(capacity_factor * N * K / X)``
  tokens (first choices before second choices, then token order; GShard,
  arXiv:2006.16668), processed as one ``[X, C, E]`` batched matmul; overflow skips the
  expert. Fixed shapes that shard evenly over an expert axis.
* ``dense``: every expert on every token, combined with the routing weights: the
  masked reference the others are tested against (``X / K`` times the work).

Padding tokens (``valid`` False) get zero routing weight: they take no expert capacity,
add nothing to the router statistics, and their output is zero, so they never change
what real tokens compute.

Shapes: ``N`` tokens (batch * length), ``E`` hidden, ``X`` experts, ``K`` top-k,
``F`` expert width, ``C`` capacity.

Parameters of a sparse layer (under ``layers/moe``; stacked over layers by the scan)::

    router/kernel                               [E, X]
    experts/{gate_proj,up_proj}/kernel          [X, E, F]
    experts/down_proj/kernel                    [X, F, E]
    shared_expert/{gate,up,down}_proj/kernel    [E, S], [E, S], [S, E]  (Qwen2-MoE only)
    shared_expert_gate/kernel                   [E, 1]                  (Qwen2-MoE only)

When only some layers are sparse (``decoder_sparse_step`` > 1 or ``mlp_only_layers``)
every stacked layer holds both the dense ``mlp`` and the ``moe`` parameters, since one
scan needs one parameter shape per layer; the unused set of each layer stays zero when
loaded from a checkpoint and is never written out.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from neox_jax.errors import UserError
from neox_jax.model import axes, expert_parallel
from neox_jax.model.config import ModelConfig
from neox_jax.model.layers import MLP, Block, Linear, activation, small_init, wang_init

Array = jax.Array


# ------------------------------------------------------------------- routing
@flax.struct.dataclass
class Routing:
    """Where each token goes.

    weights: ``[N, K]`` fp32 routing weights (zero for padding tokens).
    experts: ``[N, K]`` int32 chosen experts, most probable first.
    probs: ``[N, X]`` fp32 router softmax.
    logits: ``[N, X]`` fp32 router logits.
    valid: ``[N]`` bool, False for padding tokens.
    """

    weights: Array
    experts: Array
    probs: Array
    logits: Array
    valid: Array


def route(logits: Array, top_k: int, normalize: bool, valid: Array | None = None) -> Routing:
    """Top-k routing of ``[N, X]`` router logits, as transformers' MoE routers."""
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    if valid is None:
        valid = jnp.ones(logits.shape[:1], bool)
    weights = jnp.where(valid[:, None], weights, 0.0)
    return Routing(weights, experts.astype(jnp.int32), probs, logits, valid)


def router_stats(routing: Routing) -> dict[str, Array]:
    """Per-layer sums the training terms and load metrics need (real tokens only).

    counts: ``[X]`` (token, expert) assignments per expert; probs: ``[X]`` summed router
    probabilities; z: summed ``logsumexp(logits)^2``; tokens: real tokens.
    """
    num_experts = routing.probs.shape[-1]
    valid = routing.valid.astype(jnp.float32)  # [N]
    hits = jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32)  # [N, K, X]
    z = jax.nn.logsumexp(routing.logits, axis=-1)
    return {
        "counts": jnp.einsum("nkx,n->x", hits, valid),
        "probs": jnp.einsum("nx,n->x", routing.probs, valid),
        "z": jnp.sum(jnp.square(z) * valid),
        "tokens": jnp.sum(valid),
    }


# ------------------------------------------------------------ expert weights
@flax.struct.dataclass
class ExpertKernel:
    """One projection of every expert: ``kernel [X, in, out]`` in the compute dtype, and
    an optional LoRA adapter with ``a [X, in, r]``, ``b [X, r, out]`` (per expert)."""

    kernel: Array
    lora: Any = None

    def grouped(self, x: Array, group_sizes: Array) -> Array:
        """``[M, in]`` rows sorted by expert (``group_sizes [X]`` of them each; rows past
        the last group give zeros) -> ``[M, out]``."""
        y = jax.lax.ragged_dot(x, self.kernel, group_sizes)
        if self.lora is not None:
            a, b = (w.astype(x.dtype) for w in (self.lora.a, self.lora.b))
            h = jax.lax.ragged_dot(x, a, group_sizes)
            y = y + jax.lax.ragged_dot(h, b, group_sizes) * jnp.asarray(self.lora.scale, x.dtype)
        return y

    def batched(self, x: Array) -> Array:
        """``[X, C, in]`` (row block ``x[i]`` for expert ``i``) -> ``[X, C, out]``."""
        y = jnp.einsum("xci,xio->xco", x, self.kernel)
        if self.lora is not None:
            a, b = (w.astype(x.dtype) for w in (self.lora.a, self.lora.b))
            h = jnp.einsum("xci,xir->xcr", x, a)
            y = y + jnp.einsum("xcr,xro->xco", h, b) * jnp.asarray(self.lora.scale, x.dtype)
        return y


@flax.struct.dataclass
class ExpertWeights:
    gate: ExpertKernel  # [X, E, F]
    up: ExpertKernel  # [X, E, F]
    down: ExpertKernel  # [X, F, E]

    @property
    def num_experts(self) -> int:
        return self.gate.kernel.shape[0]


def _ffn_grouped(w: ExpertWeights, x: Array, group_sizes: Array, act) -> Array:
    h = act(w.gate.grouped(x, group_sizes)) * w.up.grouped(x, group_sizes)
    return w.down.grouped(h, group_sizes)


def _ffn_batched(w: ExpertWeights, x: Array, act) -> Array:
    return w.down.batched(act(w.gate.batched(x)) * w.up.batched(x))


# ------------------------------------------------------- expert computations
def ragged_experts(x, routing: Routing, w: ExpertWeights, act, config: ModelConfig) -> Array:
    """Dropless: pairs sorted by expert, grouped matmuls (``jax.lax.ragged_dot``)."""
    del config
    n, k = routing.experts.shape
    num_experts = w.num_experts
    # Padding tokens get expert id X: sorted last, outside every group, never computed.
    flat = jnp.where(routing.valid[:, None], routing.experts, num_experts).reshape(-1)  # [N*K]
    order = jnp.argsort(flat, stable=True)  # [N*K] pair index, grouped by expert
    group_sizes = jnp.zeros(num_experts, jnp.int32).at[flat].add(1, mode="drop")  # [X]
    y = _ffn_grouped(w, x[order // k], group_sizes, act)  # [N*K, E]
    y = y.astype(jnp.float32) * routing.weights.reshape(-1)[order][:, None]
    y = jnp.zeros_like(y).at[order].set(y)  # back to (token, choice) order
    return y.reshape(n, k, -1).sum(axis=1).astype(x.dtype)


def capacity(config: ModelConfig, tokens: int) -> int:
    """Slots per expert: ``ceil(capacity_factor * tokens * top_k / num_experts)``."""
    k, num_experts = config.num_experts_per_tok, config.num_experts
    return max(1, math.ceil(config.capacity_factor * tokens * k / num_experts))


def capacity_slots(routing: Routing, num_experts: int, slots: int):
    """Each (token, choice) pair's slot in its expert's buffer, choice-major ``[K*N]``.

    Every token's first choice claims a slot before any second choice (GShard's
    priority); within a choice, earlier tokens first. Returns ``(experts, slot, kept)``:
    padding pairs carry expert id ``X`` and dropped pairs slot ``C`` (out of range).
    """
    experts = jnp.where(routing.valid[:, None], routing.experts, num_experts).T.reshape(-1)
    hits = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32)  # [K*N, X]; zero for padding
    slot = jnp.sum((jnp.cumsum(hits, axis=0) - 1) * hits, axis=-1)  # [K*N] rank within expert
    kept = (experts < num_experts) & (slot < slots)
    return experts, jnp.where(kept, slot, slots), kept


def capacity_experts(x, routing: Routing, w: ExpertWeights, act, config: ModelConfig) -> Array:
    """At most ``capacity`` tokens per expert (first choices first); overflow is dropped."""
    n, k = routing.experts.shape
    num_experts, slots = w.num_experts, capacity(config, n)
    experts, slot, _ = capacity_slots(routing, num_experts, slots)
    tokens = jnp.tile(jnp.arange(n), k)  # [K*N]
    buf = jnp.zeros((num_experts, slots, x.shape[-1]), x.dtype)
    buf = buf.at[experts, slot].set(x[tokens], mode="drop")  # [X, C, E]; drops overflow
    buf = nn.with_logical_constraint(buf, (axes.ACT_EXPERT, None, axes.ACT_EMBED))
    out = _ffn_batched(w, buf, act)  # [X, C, E]
    y = out.at[experts, slot].get(mode="fill", fill_value=0)  # [K*N, E]
    y = y.astype(jnp.float32) * routing.weights.T.reshape(-1)[:, None]
    return y.reshape(k, n, -1).sum(axis=0).astype(x.dtype)


def dense_experts(x, routing: Routing, w: ExpertWeights, act, config: ModelConfig) -> Array:
    """Every expert on every token, weighted by the (mostly zero) routing weights."""
    del config
    num_experts = w.num_experts
    out = _ffn_batched(w, jnp.broadcast_to(x, (num_experts, *x.shape)), act)  # [X, N, E]
    hits = jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32)  # [N, K, X]
    combine = jnp.einsum("nkx,nk->xn", hits, routing.weights)  # [X, N]
    return jnp.einsum("xne,xn->ne", out.astype(jnp.float32), combine).astype(x.dtype)


def expert_parallel_experts(x, routing: Routing, w: ExpertWeights, act, config) -> Array:
    """The experts split over the mesh (``neox_jax.model.expert_parallel``): each device
    sends its tokens to the devices holding their experts and back by all-to-all.
    Dropless, or with ``moe_impl="capacity"`` at most ``capacity_factor`` times the even
    share of rows from one device to another (dropped per device pair, not per expert)."""
    names = ExpertWeights(
        gate=_kernel_names(w.gate, (axes.EMBED, axes.MLP)),
        up=_kernel_names(w.up, (axes.EMBED, axes.MLP)),
        down=_kernel_names(w.down, (axes.MLP, axes.EMBED)),
    )
    return expert_parallel.dispatch(
        lambda w, rows, group_sizes: _ffn_grouped(w, rows, group_sizes, act),
        w,
        names,
        x,
        routing.experts,
        routing.weights,
        routing.valid,
        num_experts=w.num_experts,
        capacity_factor=config.capacity_factor if config.moe_impl == "capacity" else None,
    )


def _kernel_names(k: ExpertKernel, io: tuple[str, str]) -> ExpertKernel:
    """The logical axes of one projection's arrays (kernel ``[X, in, out]``; a LoRA
    adapter's ``a [X, in, r]`` and ``b [X, r, out]`` split as the kernel is)."""
    lora = None
    if k.lora is not None:
        lora = k.lora.replace(a=(axes.EXPERT, io[0], None), b=(axes.EXPERT, None, io[1]))
    return ExpertKernel((axes.EXPERT, *io), lora)


ExpertFn = Callable[[Array, Routing, ExpertWeights, Callable, ModelConfig], Array]
EXPERT_IMPLS: dict[str, ExpertFn] = {
    "ragged": ragged_experts,
    "capacity": capacity_experts,
    "dense": dense_experts,
}


# ------------------------------------------------------------------- modules
class ExpertProjection(nn.Module):
    """The stacked ``kernel [X, in, out]`` of one projection of every expert.

    Returns an ``ExpertKernel``: the kernel in the compute dtype (dequantized when a
    ``neox_jax.quant.QuantizedWeight`` replaced it) with the LoRA adapter placed beside
    it, if any.
    """

    num_experts: int
    in_features: int
    features: int
    kernel_axes: tuple[str, str, str]
    kernel_init: nn.initializers.Initializer
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> ExpertKernel:
        stored = self.get_variable("params", "kernel")
        if hasattr(stored, "dequantize"):
            kernel = stored.dequantize(self.dtype)
        else:
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                (self.num_experts, self.in_features, self.features),
                self.param_dtype,
            )
        return ExpertKernel(kernel.astype(self.dtype), self.get_variable("params", "lora"))


class SparseMoE(nn.Module):
    """The sparse MLP of one layer (transformers' ``Qwen3MoeSparseMoeBlock``,
    ``MixtralSparseMoeBlock``, and Qwen2-MoE's shared expert)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, valid: Array) -> Array:
        """``x [B, T, E]``, ``valid [B, T]`` (False = padding) -> ``[B, T, E]``."""
        cfg = self.config
        batch, length, hidden = x.shape
        flat = x.reshape(batch * length, hidden)  # [N, E]
        logits = Linear(
            features=cfg.num_experts,
            kernel_axes=(axes.EMBED, axes.ROUTER),
            kernel_init=small_init(hidden),
            use_bias=False,
            dtype=jnp.float32,  # router logits in fp32 whatever the compute dtype
            param_dtype=cfg.params_dtype,
            name="router",
        )(flat)
        routing = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob, valid.reshape(-1))
        stats = router_stats(routing)
        if cfg.moe_impl == "capacity":  # pairs over capacity, a training metric
            _, _, kept = capacity_slots(routing, cfg.num_experts, capacity(cfg, flat.shape[0]))
            pairs = jnp.sum(routing.valid) * cfg.num_experts_per_tok
            stats["dropped"] = (pairs - jnp.sum(kept)).astype(jnp.float32)
        self.sow("intermediates", "router_stats", stats)
        impl = EXPERT_IMPLS[cfg.moe_impl]
        # A mesh whose rules split the experts: exchange tokens between their devices
        # (the dense reference stays as written: XLA partitions it like any einsum).
        if expert_parallel.expert_shards(cfg.num_experts) > 1 and cfg.moe_impl != "dense":
            impl = expert_parallel_experts
        y = impl(
            flat.astype(cfg.compute_dtype),
            routing,
            Experts(cfg, name="experts")(hidden),
            activation(cfg.hidden_act),
            cfg,
        )
        if cfg.shared_expert_intermediate_size:
            shared = MLP(cfg, cfg.shared_expert_intermediate_size, name="shared_expert")(flat)
            gate = Linear(
                features=1,
                kernel_axes=(axes.EMBED, axes.ROUTER),
                kernel_init=small_init(hidden),
                use_bias=False,
                dtype=cfg.compute_dtype,
                param_dtype=cfg.params_dtype,
                name="shared_expert_gate",
            )(flat)
            y = y + jax.nn.sigmoid(gate) * shared
        return y.reshape(batch, length, hidden)


class Experts(nn.Module):
    """The stacked gated MLPs of one sparse layer (``experts/{gate,up,down}_proj``)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, hidden: int) -> ExpertWeights:
        cfg = self.config
        proj = functools.partial(
            ExpertProjection,
            cfg.num_experts,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
        )
        width = cfg.expert_size
        up_axes = (axes.EXPERT, axes.EMBED, axes.MLP)
        up_init = small_init(hidden)
        down_init = wang_init(hidden, cfg.num_hidden_layers)
        return ExpertWeights(
            gate=proj(hidden, width, up_axes, up_init, name="gate_proj")(),
            up=proj(hidden, width, up_axes, up_init, name="up_proj")(),
            down=proj(width, hidden, (axes.EXPERT, axes.MLP, axes.EMBED), down_init,
                      name="down_proj")(),
        )  # fmt: skip


class MoEBlock(Block):
    """``Block`` whose MLP is a ``SparseMoE`` in the config's sparse layers.

    ``sparse`` says whether this layer is sparse when the config mixes dense and sparse
    layers: a Python bool (only that MLP runs) or a traced bool from the layer scan
    (both run and the layer's own is kept; mixed configs are small test models, the
    published MoE models are sparse in every layer).
    """

    def _mlp(self, h: Array, segment_ids: Array, sparse=None) -> Array:
        cfg = self.config
        moe = functools.partial(SparseMoE(cfg, name="moe"), h, segment_ids != 0)
        if not cfg.mixed_mlp:
            return moe()
        dense = functools.partial(MLP(cfg, name="mlp"), h)
        if sparse is None:  # block_fn without a layer index: the pipeline
            raise UserError(
                f"Only layers {list(cfg.sparse_layers)} of {cfg.num_hidden_layers} are "
                "sparse; the pipeline runs one block function for every layer and cannot "
                "mix dense and sparse ones yet. Run without the pipeline."
            )
        if isinstance(sparse, bool):
            return moe() if sparse else dense()
        return jnp.where(sparse, moe(), dense())


def layer_flags(config: ModelConfig) -> Array:
    """``[L]`` bool: which layers are sparse (the scanned input of mixed configs)."""
    flags = [i in config.sparse_layers for i in range(config.num_hidden_layers)]
    return jnp.asarray(flags)

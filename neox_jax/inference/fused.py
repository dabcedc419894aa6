"""A GPT-NeoX layer as two weight products, for decoding on CPU.

A decode step at batch 1 reads every weight once and does little else, so its speed is
the memory bandwidth the weight products reach, less what each op costs to start.
XLA:CPU runs each product as its own library call; a parallel-residual GPT-NeoX layer
has four (``query_key_value``, ``dense``, ``dense_h_to_4h``, ``dense_4h_to_h``) and two
layer norms. Here they become two products over concatenated weights:

* in: both layer norms normalise the same ``x`` and differ only in their scale and
  bias, so ``ln_i(x) @ W = norm(x) @ (diag(g_i) W) + (b_i @ W)``; the scales fold into
  the weights and ``[qkv | h] = norm(x) @ [diag(g1) W_qkv | diag(g2) W_up] + b_in``,
  one ``[E, 3E + F]`` product (the same FLOPs as the two it replaces);
* out: ``attn @ W_dense + gelu(h) @ W_down = [attn | gelu(h)] @ [W_dense; W_down]``,
  one ``[E + F, E]`` product, both biases summed into one.

Both weights are stored output-major (``[out, in]``, as torch's ``nn.Linear.weight``):
XLA:CPU's matrix-vector product at batch 1 then reads each output's weights as one
contiguous row, and took 14-15 % less CPU time per step than with ``[in, out]``
(pythia-160m, decode_bench/ab_step.py; no difference at batch 16).

And both are stored in blocks of at most ``K_BLOCK`` input columns (separate buffers),
each product a sum of one product per block. At batch 16 XLA:CPU's matmul (YNNPACK)
does 1.5x less work per FLOP over 768 inputs than over 3840 (the out product's
``E + F`` for pythia-160m): per CPU-second 52.4 GFLOP at 768 columns, 40.7 at 1280,
34.6 at 3840 and 47.7 at 384 (the 16-row input block is 48 KB at 768 columns, the
size of a core's L1 data cache). In the batch-16 step the unblocked out product was
30 % of the time at half the in product's rate (experiments/decode_bench/README.md).
At batch 1 the blocks cost instead: each is one more matrix-vector call (with its
threads' start and join), and the batch-1 step took 8 % longer with them (79.4 % of the
bandwidth roofline against 86.6 % with one block per weight, pythia-160m). So the
layout follows the batch: ``block_columns(batch)`` is one block per weight for one row
and ``K_BLOCK`` columns for more; ``reblock`` turns one layout into the other.

From ``INPUT_MAJOR_ROWS`` rows on, the weights are instead stored input-major
(``[in, out]``, one block each, ``to_input_major``) and the decode loop is compiled with
XLA:CPU's own dot emitter instead of YNNPACK (``XLA_DOTS``; ``step.program_for``: the
Generator's decode loop, the serving engine's decode calls from as many slots).
At 8-16 rows that pair streams the weights from memory 1.3-1.6x faster than YNNPACK in
either weight order (experiments/decode_bench/bound.py ``--streamed``): the batch-16
step of pythia-160m took 85 ms instead of 115 with the blocked output-major weights,
batch 8 85 instead of 103; at 1 and 4 rows no gain (README, 2026-12-02).

The same arithmetic in another order, so the logits differ from the model's by fp32
round-off (tests check them against the model). Only for configs and weights where the
algebra holds exactly: fp32, a plain parallel-residual GPT-NeoX layer (LayerNorm, fused
``query_key_value``, no gated MLP, no QK-norm, no MoE), float weights without LoRA
adapters or quantization. ``step.split_params`` builds the weights; ``step.forward``
runs them. Measured effect: experiments/decode_bench/README.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.model import ModelConfig
from neox_jax.model.layers import activation, cached_attention
from neox_jax.model.rotary import apply_rotary, rotary_attention_scaling, rotary_inv_freq

Array = jax.Array

FUSED_LAYERS = "layers_fused"  # split_params' per-layer fused weights (``fuse_layer``)
K_BLOCK = 768  # input columns per weight block (module docstring; measured on XLA:CPU)
INPUT_MAJOR_ROWS = 8  # rows per step from which weights are input-major (module docstring)
# Compile options of a program over input-major weights: XLA:CPU's own dots, not YNNPACK.
XLA_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}

_LINEAR = {"kernel", "bias"}
_LAYER = {
    "input_layernorm": {"scale", "bias"},
    "post_attention_layernorm": {"scale", "bias"},
    "attention": {"query_key_value", "dense"},
    "mlp": {"dense_h_to_4h", "dense_4h_to_h"},
}


def fusable(config: ModelConfig, layer) -> bool:
    """Whether ``layer`` (one layer's parameter tree) can run as ``fused_block``."""
    plain_config = (
        not config.is_moe
        and config.fused_qkv
        and not config.gated_mlp
        and config.use_parallel_residual
        and config.norm_type == "layernorm"
        and not config.qk_norm
        and config.attention_impl == "xla"
        and config.compute_dtype == jnp.float32
        and config.params_dtype == jnp.float32
    )
    if not plain_config or not isinstance(layer, dict) or set(layer) != set(_LAYER):
        return False
    for name, keys in _LAYER.items():
        if not isinstance(layer[name], dict) or set(layer[name]) != keys:
            return False
    linears = [layer["attention"][n] for n in _LAYER["attention"]]
    linears += [layer["mlp"][n] for n in _LAYER["mlp"]]
    if any(not isinstance(p, dict) or set(p) - _LINEAR or "kernel" not in p for p in linears):
        return False  # a LoRA adapter or a quantized weight beside the kernel
    leaves = jax.tree.leaves(layer)
    return all(isinstance(a, jax.Array | np.ndarray) and a.dtype == np.float32 for a in leaves)


def block_columns(batch: int) -> int:
    """Input columns per weight block for a step of ``batch`` rows (module docstring):
    0 (each weight one block) for one row, else ``K_BLOCK``."""
    return 0 if batch == 1 else K_BLOCK


@functools.cache
def xla_dot_options() -> dict | None:
    """``XLA_DOTS`` if this XLA:CPU accepts them (a tiny compile, once), else None: a
    jaxlib without the option keeps the output-major layouts and YNNPACK."""
    probe = jax.jit(lambda a: a @ a, compiler_options=XLA_DOTS)
    try:
        probe.lower(np.ones((2, 2), np.float32)).compile()
    except jax.errors.JaxRuntimeError:  # "No such compile option"
        return None
    return dict(XLA_DOTS)


def input_major_rows(batch: int) -> bool:
    """Whether a step of ``batch`` rows on CPU takes input-major weights and
    ``XLA_DOTS`` (module docstring)."""
    on_cpu = jax.default_backend() == "cpu"
    return batch >= INPUT_MAJOR_ROWS and on_cpu and xla_dot_options() is not None


def to_input_major(layer) -> dict:
    """A ``fuse_layer`` layer (output-major, in any blocks) with both weights input-major,
    one buffer each: ``w_in_t [E, 3E + F]``, ``w_out_t [E + F, E]``; biases shared."""
    if "w_in_t" in layer:
        return layer
    whole = lambda parts: parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)  # noqa: E731
    return {
        "w_in_t": jnp.asarray(whole(layer["w_in"]).T),
        "b_in": layer["b_in"],
        "w_out_t": jnp.asarray(whole(layer["w_out"]).T),
        "b_out": layer["b_out"],
    }


def is_input_major(fused_layers) -> bool:
    return any("w_in_t" in layer for layer in fused_layers)


def fuse_layer(layer, columns: int | None = None) -> dict:
    """The two concatenated products of one ``fusable`` layer (module docstring),
    output-major and in blocks of ``columns`` input columns (``blocks``; default
    ``K_BLOCK``, 0 for one block): ``w_in`` the blocks of ``[3E + F, E]``,
    ``b_in [3E + F]``, ``w_out`` the blocks of ``[E, E + F]``, ``b_out [E]``."""
    ln1, ln2 = layer["input_layernorm"], layer["post_attention_layernorm"]
    qkv, dense = layer["attention"]["query_key_value"], layer["attention"]["dense"]
    up, down = layer["mlp"]["dense_h_to_4h"], layer["mlp"]["dense_4h_to_h"]
    bias = lambda p: p.get("bias", jnp.zeros(p["kernel"].shape[1], jnp.float32))  # noqa: E731
    fold = lambda ln, p: (  # noqa: E731
        ln["scale"][:, None] * p["kernel"],
        jnp.dot(ln["bias"], p["kernel"], precision="highest") + bias(p),
    )
    (w_qkv, b_qkv), (w_up, b_up) = fold(ln1, qkv), fold(ln2, up)
    return {
        "w_in": blocks(jnp.concatenate([w_qkv, w_up], axis=1).T, columns),
        "b_in": jnp.concatenate([b_qkv, b_up]),
        "w_out": blocks(jnp.concatenate([dense["kernel"], down["kernel"]], axis=0).T, columns),
        "b_out": bias(dense) + bias(down),
    }


def blocks(weight: Array, size: int | None = None) -> tuple[Array, ...]:
    """An output-major ``weight [out, in]`` as ``[out, <= size]`` blocks of its input
    columns (``size`` default ``K_BLOCK``, 0 for one block), each its own buffer (a
    slice inside jit would be copied every call)."""
    n = weight.shape[1]
    size = K_BLOCK if size is None else size or n
    return tuple(jnp.array(weight[:, i : i + size]) for i in range(0, n, size))


def reblock(fused_layers, columns: int) -> tuple[dict, ...]:
    """``fuse_layer``'s layers with each weight in blocks of ``columns`` input columns
    (0 for one block). A weight whose blocks come out the same keeps its buffers, as do
    the biases, so the new layout costs memory only for the weights whose blocks change
    (for pythia-160m the out products, ``[E, E + F]``; ``w_in`` has ``E = 768`` inputs,
    one block either way)."""

    def weight(parts: tuple[Array, ...]) -> tuple[Array, ...]:
        n = sum(w.shape[1] for w in parts)
        size = columns or n
        if [w.shape[1] for w in parts] == [min(size, n - i) for i in range(0, n, size)]:
            return parts  # already in this layout: share the buffers
        whole = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        return blocks(whole, columns)

    return tuple(
        {**layer, "w_in": weight(layer["w_in"]), "w_out": weight(layer["w_out"])}
        for layer in fused_layers
    )


def _product(x: Array, weights: tuple[Array, ...]) -> Array:
    """``x [B, T, in] @ W.T`` for an output-major ``W [out, in]`` given as ``blocks``:
    the sum of each block's product with its columns of ``x``."""
    out, start = None, 0
    for w in weights:
        part = jnp.einsum("bti,oi->bto", x[..., start : start + w.shape[1]], w)
        out, start = part if out is None else out + part, start + w.shape[1]
    return out


def _apply(x: Array, fused, name: str) -> Array:
    """``x @ W`` for the fused weight ``name`` (``w_in``/``w_out``), in either layout."""
    if f"{name}_t" in fused:  # input-major
        return jnp.einsum("bti,io->bto", x, fused[f"{name}_t"])
    return _product(x, fused[name])


def _normalize(config: ModelConfig, x: Array) -> Array:
    """``LayerNorm`` without its scale and bias (they are in the fused weights)."""
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + config.layer_norm_eps)


def fused_block(
    config: ModelConfig,
    fused,
    x,
    layer_cache,
    positions,
    segment_ids,
    cache_info,
    layer=None,
    *,
    attention=cached_attention,
):
    """One layer from ``fuse_layer``'s weights, as ``Block`` with a KV cache
    (``block_fn``'s signature; ``layer`` is unused).

    Args:
      x: ``[B, T, E]`` fp32; positions, segment_ids: ``[B, T]``.
      layer_cache: ``{"k", "v"}`` of ``[B, KV, S, D]``; cache_info: ``prepare_inputs``'.
      attention: ``cached_attention``'s signature; the serving engine's mixed
        prefill/decode step (``serving.mixed``) passes one that splits the tokens
        between two caches (``layer_cache`` and ``cache_info`` are then its own).
    Returns ``(x [B, T, E], new layer_cache)``.
    """
    del layer
    batch, length, _ = x.shape
    heads, head_dim = config.num_attention_heads, config.head_dim
    width = heads * head_dim
    y = _apply(_normalize(config, x), fused, "w_in") + fused["b_in"]  # [B, T, 3E + F]
    qkv = y[..., : 3 * width].reshape(batch, length, heads, 3, head_dim)  # per head [q|k|v]
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    inv_freq, scale = rotary_inv_freq(config, positions), rotary_attention_scaling(config)
    q, k = (apply_rotary(t, positions, inv_freq, scale) for t in (q, k))
    attn, new_cache = attention(config, q, k, v, layer_cache, segment_ids, cache_info)
    h = activation(config.hidden_act)(y[..., 3 * width :])  # [B, T, F]
    both = jnp.concatenate([attn.reshape(batch, length, width), h], axis=-1)  # [B, T, E + F]
    return _apply(both, fused, "w_out") + fused["b_out"] + x, new_cache

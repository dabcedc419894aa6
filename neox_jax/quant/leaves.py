"""Where a parameter tree's quantized leaves are, and how one leaf is quantized (RTN).

Shared by the whole-tree round-to-nearest pass (``params``) and sequential GPTQ
(``gptq_model``), which sits below ``params``.
"""

from __future__ import annotations

import jax

from neox_jax.model import ModelConfig
from neox_jax.quant.config import QuantConfig
from neox_jax.quant.core import QuantizedWeight, quantize

# The Linear kernels of one GPT-NeoX block, as paths under params["layers"].
BLOCK_KERNELS = (
    ("attention", "query_key_value"),
    ("attention", "dense"),
    ("mlp", "dense_h_to_4h"),
    ("mlp", "dense_4h_to_h"),
)


def block_kernels(config: ModelConfig) -> tuple[tuple[str, ...], ...]:
    """The Linear kernels of one block of ``config``, in the block's order: GPT-NeoX's,
    or separate q/k/v projections and the gated MLP as the family options choose; a
    mixture of experts' stacked expert kernels ``[X, in, out]`` (each expert quantized
    on its own groups) and, in a mixed stack, the dense MLP too."""
    attn = (("attention", "query_key_value"),)
    if not config.fused_qkv:
        attn = tuple(("attention", n) for n in ("q_proj", "k_proj", "v_proj"))
    mlp = BLOCK_KERNELS[2:]
    if config.gated_mlp:
        mlp = tuple(("mlp", n) for n in ("gate_proj", "up_proj", "down_proj"))
    if config.is_moe:
        experts = tuple(("moe", "experts", n) for n in ("gate_proj", "up_proj", "down_proj"))
        mlp = (*mlp, *experts) if config.mixed_mlp else experts
    return (*attn, ("attention", "dense"), *mlp)


EMBED_IN = ("embed_in", "embedding")
EMBED_OUT = ("embed_out", "kernel")


_quantize_jit = jax.jit(
    quantize,
    static_argnames=("bits", "group_size", "symmetric", "transposed", "scale_dtype", "impl"),
)


def target_paths(config: ModelConfig, qconfig: QuantConfig) -> list[tuple[str, ...]]:
    """Paths of the parameters that ``qconfig`` quantizes, in the model's order."""
    paths = [("layers", *p, "kernel") for p in block_kernels(config)]
    if qconfig.embed_out and not config.tie_word_embeddings:
        paths.append(EMBED_OUT)
    if qconfig.embed_in:
        paths.append(EMBED_IN)
    return paths


def get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path, value) -> dict:
    """A copy of ``tree`` (dicts copied along ``path`` only) with ``value`` at ``path``."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = set_path(tree[path[0]], path[1:], value)
    return out


def quantize_leaf(w, path: tuple[str, ...], qconfig: QuantConfig) -> QuantizedWeight:
    """Round-to-nearest quantization of the parameter at ``path`` (a kernel or the table)."""
    embedding = path == EMBED_IN
    in_dim = w.shape[-1] if embedding else w.shape[-2]
    group = qconfig.group_for(in_dim, "/".join(path))
    return _quantize_jit(
        w,
        bits=qconfig.bits,
        group_size=group,
        symmetric=qconfig.symmetric,
        transposed=not embedding,
        scale_dtype=qconfig.scale_jnp_dtype,
        impl=qconfig.matmul_impl,
    )

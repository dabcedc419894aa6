"""Sequential GPTQ over a whole GPT-NeoX model, one block at a time.

As in the paper's reference pipeline (§5, "Setup"): the calibration tokens are embedded
once; then for each block ``i``
  1. the *float* block runs on its inputs and the input of each of its ``Linear`` layers
     is captured (an ``nn.intercept_methods`` hook, so the model code is untouched) and
     folded into that layer's Hessian ``2 X X^T / n``;
  2. each of the four kernels is GPTQ-quantized with its Hessian;
  3. the *quantized* block runs on the same inputs, and its outputs are the inputs of
     block ``i + 1``. Later blocks thus see, and compensate for, the error of earlier
     ones.
The layers are scanned (stacked on a leading ``[L]`` axis); a block's params are the
slice ``x[i]`` of every leaf, and ``Block`` is applied on its own.
"""

from __future__ import annotations

import functools
import logging
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.model import ModelConfig, final_norm
from neox_jax.model.layers import Block, Linear
from neox_jax.quant.config import QuantConfig
from neox_jax.quant.core import is_quantized
from neox_jax.quant.gptq import gptq_quantize, hessian
from neox_jax.quant.leaves import (
    EMBED_IN,
    EMBED_OUT,
    block_kernels,
    get_path,
    quantize_leaf,
    set_path,
)

logger = logging.getLogger(__name__)


def _positions(x):
    batch, length = x.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return pos, jnp.ones((batch, length), jnp.int32)


def _outer_sum(x):
    """``sum_t x_t x_t^T`` in fp32 over every token of ``x [..., K]``."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return jnp.einsum("tk,tl->kl", x, x, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnums=0)
def _block_hessian_sums(config: ModelConfig, block_params, x):
    """Run the float block on ``x [B, T, E]``; ``{linear path: sum x x^T}`` of its Linears."""
    captured = {}

    def capture(next_fn, args, kwargs, context):
        if isinstance(context.module, Linear) and context.method_name == "__call__":
            captured["/".join(context.module.path)] = args[0]
        return next_fn(*args, **kwargs)

    with nn.intercept_methods(capture):
        Block(config).apply({"params": block_params}, x, None, *_positions(x), None)
    return {name: _outer_sum(v) for name, v in captured.items()}


@functools.partial(jax.jit, static_argnums=0)
def _block_forward(config: ModelConfig, block_params, x):
    return Block(config).apply({"params": block_params}, x, None, *_positions(x), None)[0]


def _xla(qw):
    # Calibration forwards use the XLA matmul (the Pallas one is interpreted on CPU);
    # the returned weights keep the configured implementation.
    return qw.replace(impl="xla") if is_quantized(qw) else qw


def gptq_quantize_params(
    config: ModelConfig,
    params,
    qconfig: QuantConfig,
    calibration: np.ndarray,
    *,
    batch_size: int = 8,
    log=None,
):
    """GPTQ-quantize a model's weights with calibration tokens (see the module docstring).

    Args:
      config: the model config.
      params: float parameters.
      qconfig: the scheme (``method`` is not consulted).
      calibration: ``[num_samples, length]`` token ids (e.g. 128 x 2048 in the paper).
      batch_size: calibration sequences per forward pass (memory vs speed).
      log: optional ``fn(str)`` for progress lines; default the module logger.

    Returns:
      Parameters with ``QuantizedWeight`` kernels, as ``quantize_params``.
    """
    log = log or logger.info
    tokens = np.asarray(calibration, np.int32)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"calibration must be [num_samples, length] ids, got {tokens.shape}")
    if int(tokens.max()) >= config.vocab_size or int(tokens.min()) < 0:
        raise ValueError(
            f"calibration token ids must lie in [0, {config.vocab_size}); the tokenizer "
            "does not match the model."
        )
    table = params["embed_in"]["embedding"]
    xs = [
        jnp.take(table, tokens[i : i + batch_size], axis=0).astype(config.compute_dtype)
        for i in range(0, len(tokens), batch_size)
    ]  # list of [b, T, E]
    count = int(tokens.size)
    per_layer = []
    for layer in range(config.num_hidden_layers):
        start = time.perf_counter()
        block = jax.tree.map(lambda a, i=layer: a[i], params["layers"])
        sums = None
        for x in xs:
            part = _block_hessian_sums(config, block, x)
            sums = part if sums is None else jax.tree.map(jnp.add, sums, part)
        quantized = block
        for sub in block_kernels(config):
            name = "/".join(sub)
            qw = gptq_quantize(
                block[sub[0]][sub[1]]["kernel"],
                hessian(sums[name], count),
                qconfig,
                name=f"layers[{layer}]/{name}",
            )
            quantized = set_path(quantized, (*sub, "kernel"), qw)
        xs = [
            _block_forward(config, jax.tree.map(_xla, quantized, is_leaf=is_quantized), x)
            for x in xs
        ]
        per_layer.append([get_path(quantized, (*sub, "kernel")) for sub in block_kernels(config)])
        log(
            f"GPTQ layer {layer + 1}/{config.num_hidden_layers}: {time.perf_counter() - start:.1f}s"
        )

    out = params
    for j, sub in enumerate(block_kernels(config)):
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *(qws[j] for qws in per_layer))
        out = set_path(out, ("layers", *sub, "kernel"), stacked)
    if qconfig.embed_out and not config.tie_word_embeddings:
        apply_norm = jax.jit(functools.partial(final_norm, config))
        norm_params = {"final_layer_norm": params["final_layer_norm"]}
        sums = sum(_outer_sum(apply_norm(norm_params, x)) for x in xs)
        qw = gptq_quantize(
            params["embed_out"]["kernel"], hessian(sums, count), qconfig, name="embed_out"
        )
        out = set_path(out, EMBED_OUT, qw)
    if qconfig.embed_in:  # a lookup has no input activations: GPTQ does not apply
        out = set_path(out, EMBED_IN, quantize_leaf(table, EMBED_IN, qconfig))
    return out

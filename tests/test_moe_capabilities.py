"""A mixture of experts through the other capabilities: LoRA on the attention and expert
projections, int8/int4 quantization of the stacked experts, and the scanned KV-cache
decode of a stack mixing dense and sparse layers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax.finetune.lora import (
    LoraConfig,
    LoraError,
    attach,
    init_adapters,
    lora_apply_fn,
    merge,
)
from neox_jax.finetune.peft_format import save_peft_adapter
from neox_jax.model import GPTNeoX, ModelConfig, init_cache, init_params
from neox_jax.quant import QuantConfig
from neox_jax.quant.config import QuantizationError
from neox_jax.quant.params import dequantize_params, quantize_params
from neox_jax.training.step import loss_and_grads

CONFIG = ModelConfig(
    model_type="qwen3_moe", vocab_size=64, hidden_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, norm_type="rmsnorm",
    gated_mlp=True, mlp_bias=False, fused_qkv=False, use_parallel_residual=False,
    attention_bias=False, qk_norm=True, num_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=16, mlp_only_layers=(1,), norm_topk_prob=True,
)  # fmt: skip
TARGETS = ("q_proj", "o_proj", "experts.gate_proj", "experts.up_proj", "experts.down_proj")


@functools.cache
def _params(seed=0):
    """Random params scaled so activations and router logits are O(1). Jitted and made
    once: eager, every op of the model's init dispatches and compiles on its own."""

    def draw(rng):
        params = init_params(CONFIG, rng)
        return jax.tree.map(lambda p: p * 4.0 if p.ndim > 2 else p, params)

    return jax.jit(draw)(jax.random.key(seed))


@functools.cache
def _forward(config):
    # Jitted: eager, every op of the 3-layer MoE dispatches (and compiles) on its own.
    return jax.jit(lambda params, ids: GPTNeoX(config).apply({"params": params}, ids))


def _logits(params, ids, config=CONFIG):
    return np.asarray(_forward(config)(params, jnp.asarray(ids)))


IDS = np.random.default_rng(0).integers(0, 64, (2, 10))


def _random_adapters(lora, seed=1):
    """Adapters with B drawn too (B = 0 at init would make every check vacuous)."""

    def draw(rng, rng_values):
        leaves, tree = jax.tree.flatten(init_adapters(CONFIG, lora, rng))
        keys = jax.random.split(rng_values, len(leaves))
        values = [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
        return jax.tree.unflatten(tree, values)

    return jax.jit(draw)(jax.random.key(seed), jax.random.key(seed + 1))


@pytest.mark.parametrize("impl", ["ragged", "capacity", "dense"])
def test_lora_on_experts_equals_merged_weights(impl):
    """The adapters applied inside the grouped matmuls (per expert) give the logits of
    the kernels with ``scale * A_x @ B_x`` folded into each expert; fp32 round-off, 1e-5."""
    config = CONFIG.replace(moe_impl=impl, capacity_factor=4.0)
    lora = LoraConfig(targets=TARGETS, rank=4)
    base, adapters = _params(), _random_adapters(lora)
    assert adapters["layers"]["moe"]["experts"]["gate_proj"]["lora_a"].shape == (3, 8, 32, 4)
    live = _logits(attach(base, adapters, lora), IDS, config)
    merged = _logits(merge(base, adapters, lora), IDS, config)
    scale = np.abs(merged).max()
    np.testing.assert_allclose(live, merged, rtol=0, atol=1e-5 * scale)
    plain = _logits(base, IDS, config)
    assert np.abs(plain - merged).max() > 1e-2 * scale  # the expert adapters matter


def test_lora_trains_expert_adapters_and_refuses_what_it_cannot_do(tmp_path):
    lora = LoraConfig(targets=TARGETS, rank=4)
    base, adapters = _params(), _random_adapters(lora)
    batch = {"tokens": jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 9)))}
    grad_fn = jax.jit(lambda a, b: loss_and_grads(a, b, batch, None, lora_apply_fn(CONFIG, lora)))
    _, _, grads = grad_fn(adapters, base)
    expert_grads = grads["layers"]["moe"]["experts"]["down_proj"]["lora_b"]  # [L, X, r, E]
    # The sparse layers' adapters learn; the dense layer's (1) are never used.
    assert np.abs(expert_grads[0]).max() > 0 and np.abs(expert_grads[2]).max() > 0
    assert np.abs(expert_grads[1]).max() == 0
    with pytest.raises(LoraError, match="not implemented for the expert targets"):
        init_adapters(CONFIG, LoraConfig(targets=TARGETS, rank=4, dropout=0.1), jax.random.key(0))
    with pytest.raises(LoraError, match="PEFT has no module for them"):
        save_peft_adapter(CONFIG, adapters, lora, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    with pytest.raises(LoraError, match="not layers of this qwen3_moe model"):
        init_adapters(CONFIG, LoraConfig(targets=("gate_proj",), rank=4), jax.random.key(0))


@pytest.mark.parametrize("bits,group,rel", [(8, None, 0.01), (4, 16, 0.2)])
def test_quantized_experts(bits, group, rel):
    """Every expert kernel is quantized (per expert, per group); the quantized model
    computes exactly the float model of its dequantized weights (1e-5: fp32 round-off),
    and stays near the original: mean error within 1% (int8) / 20% (int4) of the largest
    logit. A mean, because a rounding that flips one token's expert moves that token a
    lot (measured here: int8 0.6% mean, 3.6% max; int4 10% mean on these random
    weights scaled to O(1) routing)."""
    params = _params()
    qparams = quantize_params(CONFIG, params, QuantConfig(bits=bits, group_size=group))
    kernel = qparams["layers"]["moe"]["experts"]["gate_proj"]["kernel"]
    assert hasattr(kernel, "dequantize") and kernel.dequantize().shape == (3, 8, 32, 16)
    assert hasattr(qparams["layers"]["mlp"]["up_proj"]["kernel"], "dequantize")
    ours = _logits(qparams, IDS)
    reference = _logits(dequantize_params(qparams), IDS)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5 * scale)
    assert np.abs(ours - _logits(params, IDS)).mean() <= rel * scale
    with pytest.raises(QuantizationError, match="gptq.*mixture-of-experts"):
        quantize_params(CONFIG, params, QuantConfig(bits=4, method="gptq"), np.zeros((1, 8)))


def test_scanned_cache_decode_equals_full_forward():
    """Prefill then one token at a time through the scanned stack (the layers' sparse
    flags are scanned inputs) gives the full forward's logits."""
    params = _params()
    model = GPTNeoX(CONFIG)
    full = _logits(params, IDS)
    cache = init_cache(CONFIG, batch=2, max_length=16)
    step = jax.jit(lambda p, ids, c: model.apply({"params": p}, ids, cache=c))  # not eager
    out = step(params, jnp.asarray(IDS[:, :6]), cache)
    steps = [np.asarray(out.logits)]
    for t in range(6, IDS.shape[1]):
        out = step(params, jnp.asarray(IDS[:, t : t + 1]), out.cache)
        steps.append(np.asarray(out.logits))
    decoded = np.concatenate(steps, axis=1)
    np.testing.assert_allclose(decoded, full, rtol=0, atol=1e-5 * np.abs(full).max())

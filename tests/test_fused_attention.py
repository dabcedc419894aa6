"""attention_impl="cudnn": ``jax.nn.dot_product_attention`` (cuDNN's fused attention on
an NVIDIA GPU in bf16; on this CPU suite, that function's XLA implementation) equals
the model's own XLA path, forward and gradient, with packed documents, padding,
grouped K/V heads and a sliding window. What this checks on CPU is the plumbing (the
mask, the head layout, GQA); experiments/gpu_check.sh runs the cuDNN kernel itself.

Tolerance: fp32 on both sides, the same softmax computed by different code (summation
order only): logits and gradients within 1e-5 of their largest magnitude.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax.model import GPTNeoX, ModelConfig, init_cache, init_params

NEOX = ModelConfig(
    vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=128, max_position_embeddings=64, rotary_pct=0.25,
)  # fmt: skip
FAMILY = ModelConfig(
    model_type="mistral", vocab_size=64, hidden_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, rotary_pct=1.0,
    max_position_embeddings=64, norm_type="rmsnorm", gated_mlp=True, mlp_bias=False,
    fused_qkv=False, attention_bias=False, use_parallel_residual=False, hidden_act="silu",
    qk_norm=True, sliding_window=6,
)  # fmt: skip


def _close(got, want, rel=1e-5):
    got, want = np.asarray(got), np.asarray(want)
    assert np.abs(got - want).max() <= rel * np.abs(want).max(), np.abs(got - want).max()


@pytest.mark.parametrize("config", [NEOX, FAMILY], ids=["neox", "gqa_window_qknorm"])
def test_cudnn_impl_equals_xla_forward_and_gradient(config):
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, min(64, config.vocab_size), (2, 24)), jnp.int32)
    seg = jnp.asarray([[1] * 14 + [2] * 10, [0] * 5 + [1] * 19])  # packing, left padding
    real = np.asarray(seg) > 0

    def loss(params, cfg):
        logits = GPTNeoX(cfg).apply({"params": params}, ids, segment_ids=seg)
        return jnp.sum(jnp.where(seg[..., None] > 0, jnp.sin(logits), 0.0)), logits

    fused = config.replace(attention_impl="cudnn")
    (_, want), grads_want = jax.value_and_grad(loss, has_aux=True)(params, config)
    (_, got), grads_got = jax.value_and_grad(loss, has_aux=True)(params, fused)
    _close(np.asarray(got)[real], np.asarray(want)[real])
    for g, w in zip(jax.tree.leaves(grads_got), jax.tree.leaves(grads_want), strict=True):
        _close(g, w)


def test_cudnn_impl_decodes_through_the_xla_path():
    """Prefill into a cache then one cached step: the same logits as attention_impl=xla."""
    params = init_params(FAMILY, jax.random.key(1))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 10)), jnp.int32)
    steps = []
    for cfg in (FAMILY, FAMILY.replace(attention_impl="cudnn")):
        model = GPTNeoX(cfg)
        out = model.apply({"params": params}, ids[:, :9], cache=init_cache(cfg, 2, 16))
        out = model.apply({"params": params}, ids[:, 9:], cache=out.cache)
        steps.append(np.asarray(out.logits))
    _close(steps[1], steps[0])

"""The mixture-of-experts presets: each published config.json maps to the preset, and
``count_params`` (``jax.eval_shape``, nothing allocated) gives the published total and
activated parameter counts."""

from __future__ import annotations

import pytest

from neox_jax.convert import config_from_hf
from neox_jax.model import ModelConfig, count_params

# The architecture keys of each checkpoint's config.json on the Hugging Face hub.
_QWEN3_MOE = dict(
    model_type="qwen3_moe", vocab_size=151936, head_dim=128, max_position_embeddings=40960,
    rope_theta=1000000.0, rms_norm_eps=1e-06, tie_word_embeddings=False, attention_bias=False,
    use_sliding_window=False, sliding_window=None, hidden_act="silu", decoder_sparse_step=1,
    mlp_only_layers=[], num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    output_router_logits=False, router_aux_loss_coef=0.001,
)  # fmt: skip
HUB_CONFIGS = {
    "qwen3-30b-a3b": dict(
        _QWEN3_MOE, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, intermediate_size=6144, moe_intermediate_size=768,
        max_window_layers=48,
    ),
    "qwen3-235b-a22b": dict(
        _QWEN3_MOE, hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
        num_key_value_heads=4, intermediate_size=12288, moe_intermediate_size=1536,
        max_window_layers=94,
    ),
    "mixtral-8x7b": dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-05,
        sliding_window=None, hidden_act="silu", tie_word_embeddings=False,
        num_local_experts=8, num_experts_per_tok=2, output_router_logits=False,
        router_aux_loss_coef=0.02, router_jitter_noise=0.0,
    ),
}  # fmt: skip

# (total, active, one unit of the last digit published): the Qwen3 model cards give
# 30.5B / 3.3B and 235B / 22B; Mixtral's model card 46.7B and 12.9B active. Counts must
# lie within one unit of that digit: Mixtral rounds (12.88B is "12.9B") while Qwen
# appears to truncate (3.35B activated is "3.3B").
PUBLISHED = {
    "qwen3-30b-a3b": (30.5e9, 3.3e9, 0.1e9),
    "qwen3-235b-a22b": (235e9, 22e9, 1e9),
    "mixtral-8x7b": (46.7e9, 12.9e9, 0.1e9),
}


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_preset_is_the_hub_config(name):
    assert config_from_hf(HUB_CONFIGS[name]) == ModelConfig.from_preset(name)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_total_and_active_parameters_match_published(name):
    config = ModelConfig.from_preset(name)
    total, active, precision = PUBLISHED[name]
    assert abs(count_params(config) - total) < precision
    assert abs(count_params(config, active=True) - active) < precision


def test_active_count_of_a_mixed_stack_counts_each_layer_once():
    """A direct count for a tiny config with a dense layer between two sparse ones."""
    e, f, fe, x, k, v = 16, 40, 8, 4, 2, 32
    config = ModelConfig(
        vocab_size=v, hidden_size=e, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=f, norm_type="rmsnorm", gated_mlp=True, mlp_bias=False,
        fused_qkv=False, attention_bias=False, num_experts=x, num_experts_per_tok=k,
        moe_intermediate_size=fe, mlp_only_layers=(1,),
    )  # fmt: skip
    attention = 4 * e * e + 2 * e  # q, k, v, o and two norms per layer
    ends = 2 * v * e + e  # embeddings, head, final norm
    dense, router, expert = 3 * e * f, e * x, 3 * e * fe
    assert count_params(config) == ends + 3 * attention + dense + 2 * (router + x * expert)
    active = ends + 3 * attention + dense + 2 * (router + k * expert)
    assert count_params(config, active=True) == active

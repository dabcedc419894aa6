"""The Llama/Qwen/Mistral presets: the published config.json of each checkpoint maps to
the preset, and ``count_params`` (``jax.eval_shape``, nothing allocated) gives the
published parameter totals."""

from __future__ import annotations

import pytest

from neox_jax.convert import config_from_hf
from neox_jax.model import ModelConfig, count_params

# The keys of each checkpoint's config.json on the Hugging Face hub that matter for the
# architecture (Mistral Small 3.2: its text_config).
HUB_CONFIGS = {
    "qwen2.5-3b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=2048, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, intermediate_size=11008,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-06,
        tie_word_embeddings=True, sliding_window=32768, use_sliding_window=False,
        max_window_layers=36, hidden_act="silu",
    ),
    "qwen3-1.7b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=2048, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=6144,
        max_position_embeddings=40960, rope_theta=1000000, rms_norm_eps=1e-06,
        tie_word_embeddings=True, attention_bias=False, sliding_window=None,
        use_sliding_window=False, max_window_layers=28, hidden_act="silu",
    ),
    "mistral-small-3.2": dict(
        model_type="mistral", vocab_size=131072, hidden_size=5120, num_hidden_layers=40,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=32768,
        max_position_embeddings=131072, rope_theta=1000000000.0, rms_norm_eps=1e-05,
        sliding_window=None, hidden_act="silu", tie_word_embeddings=False,
    ),
    "ministral-8b": dict(
        model_type="mistral", vocab_size=131072, hidden_size=4096, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=12288,
        max_position_embeddings=32768, rope_theta=100000000.0, rms_norm_eps=1e-05,
        sliding_window=32768, hidden_act="silu", tie_word_embeddings=False,
    ),
    "llama-3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-05,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, hidden_act="silu",
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    ),
}  # fmt: skip

# (published total, the precision it is published to): exact counts from the model
# cards (Ministral, Llama 3.1's safetensors total); Qwen's cards give 3.09B and 1.7B,
# Mistral-Small-24B-Base-2501's hub page 23.6B.
PUBLISHED = {
    "qwen2.5-3b": (3.09e9, 1e7),
    "qwen3-1.7b": (1.7e9, 1e8),
    "mistral-small-3.2": (23.6e9, 1e8),
    "ministral-8b": (8_019_808_256, 1),
    "llama-3.1-8b": (8_030_261_248, 1),
}
# Non-embedding totals from the Qwen model cards (2.77B and 1.4B).
NON_EMBEDDING = {"qwen2.5-3b": (2.77e9, 1e7), "qwen3-1.7b": (1.4e9, 1e8)}


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_preset_is_the_hub_config(name):
    assert ModelConfig.from_preset(name) == config_from_hf(HUB_CONFIGS[name])


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_parameter_counts(name):
    published, precision = PUBLISHED[name]
    assert round(count_params(ModelConfig.from_preset(name)) / precision) * precision == published


@pytest.mark.parametrize("name", NON_EMBEDDING)
def test_qwen_non_embedding_counts(name):
    config = ModelConfig.from_preset(name)
    embeddings = config.vocab_size * config.hidden_size  # tied: one table
    published, precision = NON_EMBEDDING[name]
    assert round((count_params(config) - embeddings) / precision) * precision == published

"""The GPT-NeoX model: config, size table and Flax linen modules."""

from neox_jax.model.config import PRESETS, ModelConfig
from neox_jax.model.transformer import (
    GPTNeoX,
    ModelOutput,
    abstract_params,
    block_fn,
    cache_logical_axes,
    count_params,
    embed_tokens,
    final_norm,
    init_cache,
    init_params,
    output_logits,
    param_logical_axes,
    prepare_inputs,
    rolling_cache,
    updated_cache,
)

__all__ = [
    "PRESETS",
    "GPTNeoX",
    "ModelConfig",
    "ModelOutput",
    "abstract_params",
    "block_fn",
    "cache_logical_axes",
    "count_params",
    "embed_tokens",
    "final_norm",
    "init_cache",
    "init_params",
    "output_logits",
    "param_logical_axes",
    "prepare_inputs",
    "rolling_cache",
    "updated_cache",
]

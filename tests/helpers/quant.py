"""The quantization tests' tiny model and its O(1)-activation parameters."""

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.model import ModelConfig, init_params

# Quantized (int4, groups of 32) vs float logits of this model, relative to the largest
# logit; the reasoning is in tests/test_quant.py's docstring.
INT4_MODEL_REL = 0.3

CONFIG = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
)


def o1_params(config=CONFIG, seed=0):
    """Random params with O(1) activations: weights N(0, 1/fan_in), LayerNorms as init."""
    params = init_params(config, jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def fn(path, x):
        name = jax.tree_util.keystr(path)
        if "kernel" not in name and "embedding" not in name:
            return x
        fan_in = x.shape[-2] if "kernel" in name else 1
        return jnp.asarray(rng.standard_normal(x.shape) / np.sqrt(fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(fn, params)

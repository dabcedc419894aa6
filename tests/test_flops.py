"""The model-FLOPs formula's parameter count (``matmul_params``) against the parameter
shapes themselves: every ``kernel`` the model holds (``jax.eval_shape``, nothing
allocated), with a sparse layer's experts counted ``num_experts_per_tok / num_experts``
times, as only that many multiply each token. Exact integers, no tolerance."""

import jax
import pytest

from neox_jax.model import PRESETS, ModelConfig, abstract_params
from neox_jax.training.metrics import flops_per_token, matmul_params


def _kernel_params(config: ModelConfig) -> int:
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]:
        names = [str(getattr(p, "key", p)) for p in path]
        if names[-1] != "kernel":
            continue  # the input embedding (a gather), norms and biases
        if "experts" in names:  # [L, X, in, out]: k of the X experts per token
            total += leaf.size * config.num_experts_per_tok // config.num_experts
        else:
            total += leaf.size
    return total


@pytest.mark.parametrize(
    "name", ["pythia-160m", "neox-20b", "qwen3-235b-a22b", "qwen3-30b-a3b", "mixtral-8x7b"]
)
def test_matmul_params_are_the_kernels_a_token_uses(name):
    assert name in PRESETS
    config = ModelConfig.from_preset(name)
    assert matmul_params(config) == _kernel_params(config)


def test_active_flops_of_qwen3_235b():
    # 22B activated parameters (model card); 6N per token is then ~1.3e11 FLOPs, far
    # below 6 x 235B: the formula counts what a token computes.
    config = ModelConfig.from_preset("qwen3-235b-a22b")
    assert 20e9 < matmul_params(config) < 22.5e9
    attention = 12 * 94 * 64 * 128 * 4096
    assert flops_per_token(config, 4096) == 6 * matmul_params(config) + attention

"""A family model (Qwen3: grouped K/V heads, QK-norm, RMSNorm, SwiGLU) and a mixture of
experts (Qwen3-MoE: 8 experts, top 2) through the serving engine, contiguous and paged
KV cache, against ``Generator.generate`` on each request alone (exact greedy tokens).

The checkpoints are tiny random transformers models with O(1) activations
(``hf_reference.random_causal_lm``), loaded by ``load_hf`` as a user's would be. The
engine runs each slot as a batch of one, the ``Generator`` the request alone: the same
computation, so only round-off could differ, and a greedy flip would need two logits
within ~1e-6 of each other, vanishingly rare on these O(1)-logit models (see
test_serving_engine.py); any real bug (a slot reading another's cache or pages, a wrong
position, an expert routed from the wrong token) changes tokens within a step or two.
"""

import numpy as np
import pytest
import transformers
from helpers.hf_reference import random_causal_lm

from neox_jax.convert import load_hf
from neox_jax.inference import Generator, SamplingParams
from neox_jax.serving import Engine

SHAPE = dict(
    vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=12, intermediate_size=40, max_position_embeddings=128,
    initializer_range=0.3, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip
MODELS = {
    "qwen3": lambda: transformers.Qwen3Config(**SHAPE),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **SHAPE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24
    ),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    random_causal_lm(MODELS[request.param](), path, seed=3)
    config, params = load_hf(path)
    assert config.kv_heads == 2 and config.qk_norm
    assert config.is_moe == (request.param == "qwen3_moe")
    return config, params


@pytest.mark.parametrize("kv_cache", ["slots", "paged"])
def test_family_and_moe_models_serve_generators_tokens(model, kv_cache):
    config, params = model
    engine = Engine(
        config, params, None, num_slots=3, max_len=32, prefill_buckets=(8, 16),
        kv_cache=kv_cache, page_size=4, num_pages=16,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    lengths, max_new = (3, 14, 7, 1, 11), (9, 6, 12, 8, 5)
    prompts = [[int(t) for t in rng.integers(0, config.vocab_size, n)] for n in lengths]
    samplings = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in max_new]
    served = engine.generate(prompts, samplings)
    gen = Generator(config, params, None, max_cache_len=32)
    for p, s, (ids, _, reason) in zip(prompts, samplings, served, strict=True):
        assert ids == gen.generate([p], s)[0].token_ids
        assert reason == "length"
    assert engine.free_slots == engine.num_slots
    if kv_cache == "paged":
        assert engine.pages.free_pages == 16

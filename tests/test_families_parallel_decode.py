"""Tensor- and pipeline-parallel generation of a grouped-query, sliding-window model
give one device's tokens (4 fake CPU devices, one subprocess printing JSON).

The model has 2 KV heads for 4 query heads (one per shard on tensor=2) and a window
of 6 slots, shorter than prompt + output, so the one-device and
tensor layouts decode through the rolling window cache while the pipeline keeps every
slot and masks by the window: equal tokens also check the two caches against each
other. fp32; the layouts differ only in the order of partial sums, which on this
model never flips a choice, so tokens must be identical (as tests/test_parallel_inference.py).
"""

import textwrap

import pytest
from helpers.train import run_json_script

SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")  # the suite's flags
                               + " --xla_force_host_platform_device_count=4")
    import jax, numpy as np
    from neox_jax.inference import Generator, SamplingParams
    from neox_jax.model import ModelConfig, init_params
    from neox_jax.parallel import create_mesh

    cfg = ModelConfig(model_type="mistral", vocab_size=96, hidden_size=64,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, rotary_pct=1.0, max_position_embeddings=128,
                      norm_type="rmsnorm", gated_mlp=True, mlp_bias=False, fused_qkv=False,
                      attention_bias=False, use_parallel_residual=False, hidden_act="silu",
                      sliding_window=6)
    params = init_params(cfg, jax.random.key(0))
    # Larger weights than the init's, so the logits are O(1) and the tokens vary.
    params = jax.tree.map(lambda x: x * 4 if x.ndim == 3 else x, params)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 96, n).tolist() for n in (5, 11, 3)]
    requests = {
        "greedy": SamplingParams(max_new_tokens=12, ignore_eos=True),
        "beam": SamplingParams(max_new_tokens=8, num_beams=3, ignore_eos=True),
    }
    layouts = {
        "single": None,
        "tensor2": {"tensor": 2, "data": 2},
        "stage2_tensor2": {"stage": 2, "tensor": 2},
    }
    out = {}
    for name, axes in layouts.items():
        mesh = None if axes is None else create_mesh(axes)
        gen = Generator(cfg, params, mesh=mesh)
        row = {k: [r.token_ids for r in gen.generate(prompts, p)] for k, p in requests.items()}
        leaf = gen._layouts(1)["layers"]
        leaf = leaf[0] if isinstance(leaf, tuple) else leaf
        k_proj = leaf["attention"]["k_proj"]["kernel"]
        row["k_shard"] = list(k_proj.addressable_shards[0].data.shape)
        out[name] = row
    print("JSON" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def result():
    return run_json_script(SCRIPT)


@pytest.mark.parametrize("layout", ["tensor2", "stage2_tensor2"])
@pytest.mark.parametrize("request_kind", ["greedy", "beam"])
def test_parallel_generation_equals_one_device(result, layout, request_kind):
    assert result[layout][request_kind] == result["single"][request_kind]


def test_kv_heads_are_split(result):
    assert result["single"]["k_shard"] == [64, 32]  # [E, KV * D], 2 KV heads of 16
    assert result["tensor2"]["k_shard"] == [64, 16]  # one KV head per shard
    assert len(set(map(tuple, result["single"]["greedy"]))) > 1  # the rows differ

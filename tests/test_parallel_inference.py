"""Tensor- and pipeline-parallel generation give one device's tokens (4 fake CPU devices).

The fake device count must be set before JAX starts, so everything runs in one
subprocess that prints JSON; the assertions are here. Each layout runs the same
``Generator`` requests: greedy (mixed prompt lengths), seeded sampling with top-k/top-p
and a repetition penalty, and beam search. fp32 everywhere: the layouts differ only in
the order of partial sums across devices, which on this model never flips a choice, so
tokens must be identical.
"""

import os
import subprocess
import sys
import textwrap

import pytest
from helpers.train import REPO, run_json_script

SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")  # the suite's flags
                               + " --xla_force_host_platform_device_count=4")
    import jax, numpy as np
    from neox_jax.inference import Generator, SamplingParams
    from neox_jax.model import ModelConfig, init_params
    from neox_jax.parallel import create_mesh

    cfg = ModelConfig(vocab_size=96, hidden_size=64, num_hidden_layers=4,
                      num_attention_heads=4, intermediate_size=128, rotary_pct=0.5,
                      max_position_embeddings=128)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 96, n).tolist() for n in (5, 11, 3)]
    requests = {
        "greedy": SamplingParams(max_new_tokens=12, ignore_eos=True),
        "sampled": SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9,
                                  repetition_penalty=1.3, seed=7, ignore_eos=True),
        "beam": SamplingParams(max_new_tokens=8, num_beams=3, ignore_eos=True),
    }
    layouts = {
        "single": None,
        "tensor4": {"tensor": 4},
        "stage2": {"stage": 2, "data": 2},
        "stage2_tensor2": {"stage": 2, "tensor": 2},
        "stage4": {"stage": 4},
    }
    out = {}
    for name, axes in layouts.items():
        mesh = None if axes is None else create_mesh(axes)
        gen = Generator(cfg, params, mesh=mesh)
        row = {k: [r.token_ids for r in gen.generate(prompts, p)] for k, p in requests.items()}
        leaf = gen._layouts(1)["layers"]
        leaf = leaf[0] if isinstance(leaf, tuple) else leaf
        qkv = leaf["attention"]["query_key_value"]["kernel"]
        row["qkv_shard"] = list(qkv.addressable_shards[0].data.shape)
        row["qkv_shape"] = list(qkv.shape)
        fused = gen._layouts(1).get("layers_fused")  # inference.fused, on one CPU device only
        if fused is not None:  # blocks of input columns, joined back: [3E + F, E]
            w_in = np.concatenate([np.asarray(b) for b in fused[0]["w_in"]], axis=1)
        row["fused_in_shape"] = None if fused is None else list(w_in.shape)
        out[name] = row
    print("JSON" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def result():
    return run_json_script(SCRIPT)


@pytest.mark.parametrize("layout", ["tensor4", "stage2", "stage2_tensor2", "stage4"])
@pytest.mark.parametrize("request_kind", ["greedy", "sampled", "beam"])
def test_parallel_generation_equals_one_device(result, layout, request_kind):
    assert result[layout][request_kind] == result["single"][request_kind]


def test_weights_are_actually_split(result):
    # One CPU device: each plain GPT-NeoX layer runs as two fused products, the first
    # [3E + F, E], output-major (inference.fused); on a mesh the sharded per-layer
    # weights run instead.
    assert result["single"]["fused_in_shape"] == [192 + 128, 64]
    assert all(result[k]["fused_in_shape"] is None for k in result if k != "single")
    # Unrolled layers with heads over tensor: [E, 3E] per layer, 3E split.
    assert result["tensor4"]["qkv_shard"] == [64, 48]
    # The pipeline keeps the stacked [L, E, 3E] layers, L split over the stages.
    assert result["stage2"]["qkv_shape"] == [4, 64, 192]
    assert result["stage2"]["qkv_shard"] == [2, 64, 192]
    assert result["stage4"]["qkv_shard"] == [1, 64, 192]
    assert result["stage2_tensor2"]["qkv_shard"] == [2, 64, 96]


def test_pipeline_needs_divisible_layers():
    script = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")  # the suite's flags
                                   + " --xla_force_host_platform_device_count=4")
        import jax
        from neox_jax.inference import Generator
        from neox_jax.model import ModelConfig, init_params
        from neox_jax.parallel import create_mesh
        cfg = ModelConfig(vocab_size=32, hidden_size=32, num_hidden_layers=3,
                          num_attention_heads=4, intermediate_size=64)
        gen = Generator(cfg, init_params(cfg, jax.random.key(0)), mesh=create_mesh({"stage": 4}))
        gen.generate([[1, 2, 3]])
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env
    )
    assert r.returncode != 0
    assert "3 layers cannot be split evenly over 4 stages" in r.stderr

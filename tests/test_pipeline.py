"""Pipeline parallelism over the mesh's ``stage`` axis, on 4 fake CPU devices.

Everything runs in one subprocess (the fake device count must be set before JAX
starts) that prints JSON; the assertions are here.
"""

import textwrap

import pytest
from helpers.train import run_json_script

SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")  # the suite's flags
                               + " --xla_force_host_platform_device_count=4")
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, "tests")
    from helpers.train import logged, tiny_config, write_dataset
    from neox_jax.model import GPTNeoX, ModelConfig, init_cache, init_params, param_logical_axes
    from neox_jax.parallel.mesh import create_mesh
    from neox_jax.training.step import pipeline_apply
    from neox_jax.parallel.rules import RULES, logical_to_sharding
    from neox_jax import aot
    from neox_jax.training.trainer import train_and_evaluate

    out = {}
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4,
                      num_attention_heads=4, intermediate_size=64)
    params = init_params(cfg, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 10)), jnp.int32)
    ref = GPTNeoX(cfg).apply({"params": params}, ids)
    ref_grad = jax.grad(lambda p: GPTNeoX(cfg).apply({"params": p}, ids).mean())(params)
    mesh = create_mesh({"stage": 4})
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        p = jax.device_put(params, logical_to_sharding(param_logical_axes(cfg), params, mesh))
        out["layer_shard_shape"] = list(
            p["layers"]["mlp"]["dense_h_to_4h"]["kernel"].addressable_shards[0].data.shape)
        fwd = jax.jit(lambda p: pipeline_apply(cfg, p, ids, microbatches=2))(p)
        out["forward_err"] = float(jnp.abs(fwd - ref).max())
        out["logit_scale"] = float(jnp.abs(ref).max())
        grad = jax.jit(jax.grad(
            lambda p: pipeline_apply(cfg, p, ids, microbatches=4).mean()))(p)
        out["grad_err"] = max(float(jnp.abs(a - b).max()) for a, b in
                              zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)))
        stage = NamedSharding(mesh, P("stage"))
        rep = NamedSharding(mesh, P())
        cache = jax.device_put(init_cache(cfg, 4, 16),
                               {"k": stage, "v": stage, "segment_ids": rep, "index": rep})
        step = jax.jit(lambda p, i, c: pipeline_apply(cfg, p, i, microbatches=2, cache=c))
        logits, cache = step(p, ids[:, :6], cache)
        pieces = [logits]
        for t in range(6, 10):
            logits, cache = step(p, ids[:, t:t + 1], cache)
            pieces.append(logits)
        out["cache_err"] = float(jnp.abs(jnp.concatenate(pieces, 1) - ref).max())

    # The trainer: plain data parallelism vs a 2-stage x 2-data pipeline, same losses.
    data = write_dataset(sys.argv[1] + "/data")
    for name, over in [("plain", {"mesh.data": 4}),
                       ("pipeline", {"mesh.data": 2, "mesh.stage": 2,
                                     "train.pipeline_microbatches": 2})]:
        config = tiny_config(data, **{"train.steps": 4, "train.eval_every": 100, **over})
        train_and_evaluate(config, sys.argv[1] + "/" + name)
        out[name] = logged(sys.argv[1] + "/" + name)
        # What neox_jax.aot compiles for the same config: the stage hand-off is there
        # exactly when the trainer pipelines.
        hlo = aot.lower_train_step(config, jax.devices())[0].as_text()
        out[name + "_aot_permutes"] = "collective_permute" in hlo
    print("JSON" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_json_script(SCRIPT, str(tmp_path_factory.mktemp("pipeline")))


def test_layers_are_split_over_stages(result):
    assert result["layer_shard_shape"] == [1, 32, 64]  # 4 layers over 4 stages


def test_pipeline_forward_gradient_and_cache_match_the_model(result):
    # Same fp32 math, different reduction order across stages: round-off only.
    scale = result["logit_scale"]
    assert result["forward_err"] <= 1e-5 * scale
    assert result["cache_err"] <= 1e-5 * scale
    assert result["grad_err"] <= 1e-6


def test_pipelined_training_matches_data_parallel(result):
    plain, pipe = result["plain"], result["pipeline"]
    assert sorted(plain) == sorted(pipe) == ["1", "2", "3", "4"]  # JSON keys
    for step in plain:  # fp32, different summation order: relative 1e-5
        assert abs(plain[step] - pipe[step]) <= 1e-5 * abs(plain[step]), (step, plain, pipe)


def test_aot_compiles_the_pipelined_step(result):
    assert result["pipeline_aot_permutes"] and not result["plain_aot_permutes"]

"""Grouped-query models on a tensor-parallel mesh give the single-device logits.

One subprocess with 4 fake CPU devices (``--xla_force_host_platform_device_count``,
never set in the pytest process) shards the params of a tiny Llama-style config by
the rules table and runs the forward pass and a cached decode step under jit, for
KV-head counts that the tensor axis divides (4 and 2 KV heads on tensor=2) and that
it does not (MQA: 1 KV head on tensor=2, 2 KV heads on tensor=4). It also records how
the k/v projections and the KV cache were sharded.

Run as ``python tests/test_families_sharding.py --worker OUT`` for the subprocess side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers.xla import xla_flags

REPO = Path(__file__).resolve().parents[1]
# (kv heads, tensor axis size)
LAYOUTS = [(4, 2), (2, 2), (1, 2), (2, 4)]


def _worker(out: str) -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from neox_jax.model import GPTNeoX, ModelConfig, init_cache, init_params
    from neox_jax.model.transformer import cache_logical_axes, param_logical_axes
    from neox_jax.parallel import create_mesh
    from neox_jax.parallel.rules import RULES, logical_to_sharding

    report = {}
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 10)))
    for kv, tensor in LAYOUTS:
        config = ModelConfig(
            model_type="llama", vocab_size=96, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=kv, intermediate_size=128,
            rotary_pct=1.0, norm_type="rmsnorm", gated_mlp=True, mlp_bias=False,
            fused_qkv=False, attention_bias=False, use_parallel_residual=False,
            qk_norm=True,
        )  # fmt: skip
        params = init_params(config, jax.random.key(1))
        model = GPTNeoX(config)
        ref = np.asarray(model.apply({"params": params}, ids))
        cache = init_cache(config, 2, 16)
        ref_step = model.apply({"params": params}, ids, cache=cache).logits

        mesh = create_mesh({"data": -1, "fsdp": 1, "stage": 1, "tensor": tensor})
        shardings = logical_to_sharding(param_logical_axes(config), params, mesh)
        cache_shardings = logical_to_sharding(cache_logical_axes(), cache, mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
            sharded = jax.device_put(params, shardings)
            cache_s = jax.device_put(cache, cache_shardings)
            logits = jax.jit(model.apply)({"params": sharded}, ids)
            step = jax.jit(model.apply)({"params": sharded}, ids, cache=cache_s).logits
        attn = sharded["layers"]["attention"]
        report[f"{kv}/{tensor}"] = {
            "forward_err": float(np.max(np.abs(np.asarray(logits) - ref))),
            "cached_err": float(np.max(np.abs(np.asarray(step) - np.asarray(ref_step)))),
            "scale": float(np.max(np.abs(ref))),
            "q_spec": str(attn["q_proj"]["kernel"].sharding.spec),
            "k_spec": str(attn["k_proj"]["kernel"].sharding.spec),
            "cache_spec": str(cache_s["k"].sharding.spec),
        }
    Path(out).write_text(json.dumps(report))


def test_grouped_kv_heads_shard_and_match(tmp_path):
    out = tmp_path / "report.json"
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags(4),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }
    subprocess.run(
        [sys.executable, __file__, "--worker", str(out)], check=True, env=env, timeout=600
    )
    report = json.loads(out.read_text())
    for layout, r in report.items():
        # fp32 with a different reduction order per shard: round-off ~1e-7 relative;
        # a wrong head-to-KV-group assignment changes logits at O(1).
        assert r["forward_err"] <= 1e-5 * r["scale"], (layout, r)
        assert r["cached_err"] <= 1e-5 * r["scale"], (layout, r)
        assert "tensor" in r["q_spec"], (layout, r)
    # Whole KV heads shard when the tensor axis divides their count ...
    assert "tensor" in report["2/2"]["cache_spec"]
    assert "tensor" in report["4/2"]["cache_spec"]
    # ... and are replicated when it does not (MQA; 2 KV heads over 4 devices).
    assert "tensor" not in report["1/2"]["cache_spec"]
    assert "tensor" not in report["2/4"]["cache_spec"]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(REPO))
        _worker(sys.argv[2])

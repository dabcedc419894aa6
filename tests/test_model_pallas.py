"""attention_impl="pallas" inside the model equals the XLA reference path (interpret mode)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from helpers.xla import xla_flags

from neox_jax.model import GPTNeoX, ModelConfig, init_cache, init_params

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    max_position_embeddings=256,
)


def test_pallas_model_matches_xla_forward_and_gradient():
    params = init_params(CFG, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 40)), jnp.int32)
    seg = jnp.asarray([[1] * 25 + [2] * 15, [1] * 33 + [0] * 7])
    pallas = CFG.replace(attention_impl="pallas")

    def loss(p, cfg):
        logits = GPTNeoX(cfg).apply({"params": p}, ids, segment_ids=seg)
        return jnp.mean(jnp.where(seg[..., None] > 0, logits, 0.0) ** 2)

    # Jitted, as training runs it (eager, every op of the interpreted kernel compiles alone).
    step = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    ref_loss, ref_grad = step(params, CFG)
    got_loss, got_grad = step(params, pallas)
    # fp32 flash vs plain softmax: only the summation order differs.
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got_grad, ref_grad
    )


def test_pallas_decode_matches_xla_decode():
    params = init_params(CFG, jax.random.key(1))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 9)), jnp.int32)
    outs = []
    for cfg in (CFG, CFG.replace(attention_impl="pallas")):
        cache = init_cache(cfg, 2, 128)
        model = GPTNeoX(cfg)
        # Jitted, as the generator runs it (eager, every kernel op compiles on its own).
        apply = jax.jit(lambda p, x, c, model=model: model.apply({"params": p}, x, cache=c))
        out = apply(params, ids[:, :6], cache)
        steps = [out.logits]
        cache = out.cache
        for t in range(6, 9):
            out = apply(params, ids[:, t : t + 1], cache)
            cache = out.cache
            steps.append(out.logits)
        outs.append(jnp.concatenate(steps, axis=1))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


# Run in a subprocess with 4 fake CPU devices: the pallas model (each device running
# the kernels on its own rows and heads under shard_map) against the XLA model on the
# same mesh, forward and gradient.
_SHARDED = """
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from neox_jax.model import GPTNeoX, ModelConfig, init_params
from neox_jax.parallel.mesh import create_mesh
from neox_jax.parallel.rules import RULES
cfg = ModelConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=64)
params = init_params(cfg, jax.random.key(0))
ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 24)), jnp.int32)
seg = jnp.asarray([[1] * 24, [1] * 10 + [2] * 14, [1] * 20 + [0] * 4, [3] * 24])
def loss(p, cfg):
    logits = GPTNeoX(cfg).apply({"params": p}, ids, segment_ids=seg)
    return jnp.mean(jnp.where(seg[..., None] > 0, logits, 0.0) ** 2)
mesh = create_mesh({"data": 1, "fsdp": 2, "tensor": 2})
params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
step = jax.jit(jax.value_and_grad(loss), static_argnums=1)
with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    ref = step(params, cfg)
    got = step(params, cfg.replace(attention_impl="pallas"))
np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got[1], ref[1])
# The Pallas quantized matmul on the mesh (each device its rows) equals the XLA one.
from neox_jax.quant import QuantConfig, quantize_params
qparams = quantize_params(cfg, jax.device_get(params), QuantConfig(bits=4, group_size=32))
forward = jax.jit(lambda p: GPTNeoX(cfg).apply({"params": p}, ids, segment_ids=seg))
xla = forward(qparams)
with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    from neox_jax.quant import with_matmul_impl
    pallas = forward(with_matmul_impl(qparams, "pallas"))
np.testing.assert_allclose(pallas, xla, rtol=1e-5, atol=1e-5)
print("SHARDED_OK")
"""


def test_pallas_model_on_a_mesh_matches_xla():
    # Tolerances as in the single-device test: fp32, only the summation order differs.
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": xla_flags(4),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stderr[-3000:]

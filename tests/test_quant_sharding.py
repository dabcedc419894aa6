"""Quantized params sharded by the project's rules table (4 fake CPU devices, own process).

The mesh is ``fsdp x tensor = 2 x 2`` with ``neox_jax.parallel.rules.RULES`` (heads, mlp
and vocab over ``tensor``, embed over ``fsdp``). ``dense`` and ``dense_4h_to_h`` are
row-parallel: their input (grouped) dimension is split over ``tensor``, so each device
must hold the scales of its own groups, which is what naming the scale's group axis
after the kernel's input axis gives. The sharded model must compute the unsharded
model's logits (fp32, 1e-5 of the largest logit: only the order of the partial sums
XLA adds across devices differs).
"""

import pathlib
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")  # the suite's flags
                               + " --xla_force_host_platform_device_count=4")
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, sys.argv[1])
    import jax, jax.numpy as jnp, numpy as np
    from neox_jax.model import GPTNeoX, param_logical_axes
    from neox_jax.parallel.mesh import create_mesh
    from neox_jax.parallel.rules import logical_to_sharding
    from neox_jax.quant import QuantConfig, quantize_params, quantized_logical_axes
    from helpers.quant import CONFIG, o1_params

    mesh = create_mesh({"fsdp": 2, "tensor": 2})
    params = o1_params()
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, CONFIG.vocab_size)
    apply = jax.jit(lambda p, ids: GPTNeoX(CONFIG).apply({"params": p}, ids))
    for qconfig in (QuantConfig(bits=4, group_size=32, symmetric=False, embed_out=True),
                    QuantConfig(bits=8, embed_out=True)):
        qparams = quantize_params(CONFIG, params, qconfig)
        specs = quantized_logical_axes(param_logical_axes(CONFIG), qparams)
        sharded = jax.device_put(qparams, logical_to_sharding(specs, qparams, mesh))
        spec = lambda a: tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec))
        dense = sharded["layers"]["attention"]["dense"]["kernel"]  # stored [L, E, E(/2)]
        assert spec(dense.qvalue) == (None, "fsdp", "tensor"), dense.qvalue.sharding
        local = dense.qvalue.addressable_shards[0].data.shape
        assert local[-1] == dense.qvalue.shape[-1] // 2, local
        groups = dense.scale.shape[-1]
        want = (None, "fsdp", "tensor" if groups > 1 else None)
        assert spec(dense.scale) == want, (dense.scale.sharding, groups)
        qkv = sharded["layers"]["attention"]["query_key_value"]["kernel"]  # column-parallel
        assert spec(qkv.qvalue) == (None, "tensor", "fsdp"), qkv.qvalue.sharding
        want = (None, "tensor", "fsdp" if qkv.scale.shape[-1] > 1 else None)
        assert spec(qkv.scale) == want, qkv.scale.sharding
        with mesh:
            out = np.asarray(apply(sharded, ids))
        ref = np.asarray(apply(qparams, ids))
        err, scale = np.abs(out - ref).max(), np.abs(ref).max()
        assert err <= 1e-5 * scale, (qconfig, err, scale)
    print("OK")
    """
)


def test_tensor_parallel_quantized_model_matches_unsharded():
    tests_dir = pathlib.Path(__file__).parent
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tests_dir)],
        capture_output=True,
        text=True,
        cwd=tests_dir.parent,
        timeout=300,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]

"""Batch-16 decode of pythia-160m: one XLA:CPU device (fused) vs a tensor=2 / data=2 mesh of
two CPU devices (one per core). Alternating rounds, wall and CPU seconds.

    python experiments/decode_bench/devices_per_core.py [batch]
"""

import os
import sys
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
)
os.environ["JAX_PLATFORMS"] = "cpu"
import jax  # noqa: E402
import numpy as np  # noqa: E402

from neox_jax.inference import Generator, SamplingParams  # noqa: E402
from neox_jax.model import ModelConfig, init_params  # noqa: E402
from neox_jax.parallel.mesh import create_mesh  # noqa: E402

B, P, N = int(sys.argv[1]) if len(sys.argv) > 1 else 16, 128, 64
cfg = ModelConfig.from_preset("pythia-160m")
params = init_params(cfg, jax.random.key(0))
params = jax.device_put(params, jax.devices()[0])
prompts = np.random.default_rng(0).integers(0, 50000, (B, P)).tolist()
gens = {"one": Generator(cfg, params, max_cache_len=P + N, max_batch_size=B)}
gens["tensor2"] = Generator(
    cfg, params, max_cache_len=P + N, max_batch_size=B, mesh=create_mesh({"tensor": 2})
)
if B % 2 == 0:
    gens["data2"] = Generator(
        cfg, params, max_cache_len=P + N, max_batch_size=B, mesh=create_mesh({"data": 2})
    )
sp = SamplingParams(temperature=0.0, max_new_tokens=N, ignore_eos=True)
out = {}
for name, g in gens.items():
    out[name] = g.generate(prompts, sp)  # compile
toks = {k: [list(getattr(r, "token_ids", r)) for r in v] for k, v in out.items()}
print("same tokens:", {k: toks[k] == toks["one"] for k in toks})
best = {k: (1e9, 0) for k in gens}
for r in range(3):
    for name, g in gens.items():
        t, c = time.perf_counter(), time.process_time()
        g.generate(prompts, sp)
        w, cpu = time.perf_counter() - t, time.process_time() - c
        if w < best[name][0]:
            best[name] = (w, cpu)
        print(r, name, f"{w:.2f}s wall {cpu:.2f} cpu-s  load {os.getloadavg()[0]:.1f}", flush=True)
for k, (w, c) in best.items():
    print(k, f"{B * N / w:.1f} tok/s (e2e incl prefill) cpu {c:.2f}")

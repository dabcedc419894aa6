"""The rooflines of ``bench.py``: host and device bandwidth, the bytes and FLOPs of a
decode step, and the matmul rate at the step's own shapes."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.model import ModelConfig


def best_time(fn, repeats: int = 1) -> float:
    """Fastest of ``repeats`` calls of ``fn`` (which must block until its work is done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# ------------------------------------------------------------------ bandwidth
def host_bandwidth(mib: int = 1024, repeats: int = 5) -> dict[str, float]:
    """Host memory bandwidth in GB/s: a numpy copy (read + write, one thread) and an
    XLA reduction (read only, all threads); the larger is the roofline's bandwidth."""
    n = mib * 2**20 // 4
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
    copy = best_time(lambda: np.copyto(dst, src), repeats)
    x = jnp.ones(n, jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    read = best_time(lambda: total(x).block_until_ready(), repeats)
    return {
        "numpy_copy_gbps": 2 * src.nbytes / copy / 1e9,
        "xla_read_gbps": x.nbytes / read / 1e9,
    }


def device_bandwidth(gib: float = 4.0, repeats: int = 10) -> float:
    """Accelerator bandwidth in GB/s from a jitted elementwise op (read + write)."""
    x = jnp.ones(int(gib * 2**30) // 2, jnp.bfloat16)
    f = jax.jit(lambda a: a * 2)
    f(x).block_until_ready()
    t = best_time(lambda: f(x).block_until_ready(), repeats)
    return 2 * x.nbytes / t / 1e9


def decode_bytes(config: ModelConfig, params, batch: int, cache_len: int) -> dict[str, int]:
    """Bytes one decode step must read: weights (less the embedding gather) and K/V."""
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    weights -= params["embed_in"]["embedding"].nbytes
    itemsize = jnp.dtype(config.compute_dtype).itemsize
    kv = 2 * config.num_hidden_layers * batch * cache_len * config.hidden_size * itemsize
    return {"weights": int(weights), "kv_cache": int(kv)}


def decode_flops(config: ModelConfig, params, cache_len: int) -> float:
    """FLOPs of one decode step per batch row: 2 per weight (less the embedding, a
    gather) and, per layer, the two attention products over the cache."""
    weights = sum(x.size for x in jax.tree.leaves(params)) - params["embed_in"]["embedding"].size
    attention = 2 * 2 * config.num_hidden_layers * cache_len * config.hidden_size
    return float(2 * weights + attention)


def matmul_peak(config: ModelConfig, batch: int, repeats: int = 5) -> dict:
    """The machine's matmul rate at the decode step's own shapes: ``[batch, in] x [in,
    out]`` for every weight shape of a layer and the output layer, each jitted alone.
    The compute roofline uses the best of them, so it is an upper bound on the step."""
    e, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    rates = {}
    for k, n in ((e, 3 * e), (e, e), (e, f), (f, e), (e, v)):
        x, w = jnp.ones((batch, k), jnp.float32), jnp.ones((k, n), jnp.float32)
        dot = jax.jit(jnp.dot)
        dot(x, w).block_until_ready()
        seconds = best_time(lambda x=x, w=w, dot=dot: dot(x, w).block_until_ready(), repeats)
        rates[f"{batch}x{k}x{n}"] = 2 * batch * k * n / seconds / 1e9
    return {"gflops_by_shape": rates, "peak_gflops": max(rates.values())}

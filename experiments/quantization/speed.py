"""Decode-speed measurements for ``run.py``: whole-model decoding, matvec chains, and a
bisection by kernel type. See README.md for the results and what they mean.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.model import GPTNeoX, ModelConfig, init_cache, init_params
from neox_jax.quant import QuantConfig, quantize, quantize_params, weight_bytes, with_matmul_impl

# The weight formats the size table (``run.py``) and the decode-speed runs compare,
# by the name the results use; None = the float model.
WEIGHT_FORMATS = {
    "float": None,
    "int8": QuantConfig(bits=8),
    "int8 +embed_out": QuantConfig(bits=8, embed_out=True),
    "int4-g128": QuantConfig(bits=4, group_size=128),
    "int4-g128-asym": QuantConfig(bits=4, group_size=128, symmetric=False),
    "int4-g128 +embed_out": QuantConfig(bits=4, group_size=128, embed_out=True),
    "int4-g128 +embed_out, bf16 scales": QuantConfig(
        bits=4, group_size=128, embed_out=True, scale_dtype="bfloat16"
    ),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@functools.partial(jax.jit, static_argnames=("config", "steps"))
def greedy(config, params, prompt, steps):
    """Greedy continuation ``[B, steps]`` of ``prompt [B, T]`` with a KV cache."""
    model = GPTNeoX(config)
    batch = prompt.shape[0]
    out = model.apply(
        {"params": params}, prompt, cache=init_cache(config, batch, prompt.shape[1] + steps)
    )
    first = jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32)
    tokens = jnp.zeros((batch, steps), jnp.int32).at[:, 0].set(first)

    def body(i, carry):
        tokens, cache = carry
        prev = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)
        out = model.apply({"params": params}, prev, cache=cache)
        nxt = jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32)
        return tokens.at[:, i].set(nxt), out.cache

    return jax.lax.fori_loop(1, steps, body, (tokens, out.cache))[0]


def matvec_chain(layers: int = 12, repeats: int = 3):
    """Batch-1 quantized matvecs in a loop, by what produces their input.

    Per step, ``layers`` weights ``[K, N]`` each multiply a vector produced by: nothing
    (the loop carry), a LayerNorm, or an exact (erf) GELU. Isolates the matmul from the
    rest of the model; see the README for why the producer matters on XLA:CPU.
    """
    from neox_jax.quant import xla_matmul

    def layer_norm(v):
        mean = v.mean(-1, keepdims=True)
        var = jnp.square(v - mean).mean(-1, keepdims=True)
        return (v - mean) * jax.lax.rsqrt(var + 1e-5) * 1.1 + 0.1

    producers = {
        "none": lambda v: v,
        "layernorm": layer_norm,
        "gelu": lambda v: jax.nn.gelu(v, approximate=False),
    }
    out = {}
    for k, n in ((768, 2304), (3072, 768)):
        ws = [jax.random.normal(jax.random.key(i), (k, n)) / np.sqrt(k) for i in range(layers)]
        formats = {
            "fp32": (ws, jnp.dot),
            "int8": ([quantize_leaf_kernel(w, QuantConfig(bits=8)) for w in ws], None),
            "int4-g128": (
                [quantize_leaf_kernel(w, QuantConfig(bits=4, group_size=128)) for w in ws],
                None,
            ),
        }
        for pname, produce in producers.items():
            for fname, (weights, dot) in formats.items():
                mm = dot or (lambda x, q: xla_matmul(x, q, jnp.float32))

                def run(x0, weights, mm=mm, produce=produce, k=k, n=n):
                    def body(i, x):
                        for w in weights:
                            y = mm(produce(x), w)  # [1, N] -> back to [1, K]
                            y = y[..., :k] if n >= k else jnp.tile(y, (1, k // n))
                            x = x + 1e-3 * y
                        return x

                    return jax.lax.fori_loop(0, 4, body, x0)

                fn = jax.jit(run)
                x0 = jnp.ones((1, k))
                jax.block_until_ready(fn(x0, weights))
                best = float("inf")
                for _ in range(repeats):
                    t = time.perf_counter()
                    jax.block_until_ready(fn(x0, weights))
                    best = min(best, time.perf_counter() - t)
                key = f"[{k}x{n}] x{layers}, input from {pname}, {fname}"
                out[key] = {"ms_per_step": 1e3 * best / 4}
                log(f"matvec {key}: {out[key]['ms_per_step']:.2f} ms")
    return out


def quantize_leaf_kernel(w, qconfig):

    return quantize(w, qconfig.bits, qconfig.group_for(w.shape[0]), qconfig.symmetric)


def _engines():
    """Decode loops to time: the model's scanned forward with a cache (``greedy`` above),
    and the inference package's loop over per-layer weight buffers when present."""
    engines = {"scan": lambda config, p, prompt, n: greedy(config, p, prompt, n)}
    try:
        from neox_jax.inference import greedy_generate, split_params
    except ImportError:
        return engines, None
    engines["inference"] = lambda config, p, prompt, n: greedy_generate(config, p, prompt, n)
    return engines, split_params


def decode_speed(preset: str, gpu: bool, repeats: int = 3):
    """Batch-1 greedy tokens/s per format (per-token time from 72 vs 8 new tokens)."""
    dtype = "bfloat16" if gpu else "float32"
    config = ModelConfig.from_preset(
        preset, max_position_embeddings=128, dtype=dtype, param_dtype=dtype
    )
    params = init_params(config, jax.random.key(0))
    names = ("float", "int8", "int8 +embed_out", "int4-g128", "int4-g128 +embed_out")
    formats = {name: WEIGHT_FORMATS[name] for name in names}
    impls = ("xla", "pallas") if gpu else ("xla",)
    engines, split = _engines()
    prompt = jnp.ones((1, 16), jnp.int32)
    out = {"preset": preset, "dtype": dtype, "device": str(jax.devices()[0])}
    for name, qc in formats.items():
        qparams = params if qc is None else quantize_params(config, params, qc)
        for impl in impls if qc is not None else ("-",):
            p = qparams if qc is None else with_matmul_impl(qparams, impl)
            for engine, run in engines.items():
                q = split(p) if engine == "inference" else p
                per_token = _per_token_s(run, config, q, prompt, repeats)
                key = f"{name} [{engine}]" if qc is None else f"{name} ({impl}) [{engine}]"
                out[key] = {"ms_per_token": 1e3 * per_token, "tokens_per_s": 1 / per_token,
                            "weight_bytes": weight_bytes(p)}  # fmt: skip
                log(f"speed {key}: {out[key]}")
                del q
        del qparams, p
    for key, v in out.items():
        if isinstance(v, dict):
            base = out[f"float [{key.rsplit('[', 1)[1]}"]["tokens_per_s"]
            v["speedup_vs_float"] = v["tokens_per_s"] / base
    return out


def _per_token_s(run, config, params, prompt, repeats):
    """(best time for 72 new tokens - best for 8) / 64: prefill and dispatch cancel."""
    times = {}
    for steps in (8, 72):
        jax.block_until_ready(run(config, params, prompt, steps))  # compile
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(run(config, params, prompt, steps))
            best = min(best, time.perf_counter() - t)
        times[steps] = best
    return (times[72] - times[8]) / 64


def kernel_bisection(preset: str, repeats: int = 3):
    """Per-token decode time (inference loop) with only one kernel type in int8."""
    from neox_jax.quant.leaves import BLOCK_KERNELS, get_path, set_path

    engines, split = _engines()
    if split is None:
        return {}
    config = ModelConfig.from_preset(preset, max_position_embeddings=128)
    params = init_params(config, jax.random.key(0))
    qparams = quantize_params(config, params, QuantConfig(bits=8))
    variants = {"float": params, "all int8": qparams}
    for sub in BLOCK_KERNELS:
        path = ("layers", *sub, "kernel")
        variants[f"only {'/'.join(sub)} int8"] = set_path(params, path, get_path(qparams, path))
    prompt = jnp.ones((1, 16), jnp.int32)
    out = {}
    for name, p in variants.items():
        seconds = _per_token_s(engines["inference"], config, split(p), prompt, repeats)
        out[name] = {"ms_per_token": 1e3 * seconds}
        log(f"bisection {name}: {out[name]['ms_per_token']:.1f} ms/token")
    return out

"""Attention benchmark: Pallas flash/decode kernels vs the XLA reference vs cuDNN.

Run on a GPU (see README.md):

    python experiments/attention_bench/bench.py --out=results.json

On CPU, ``--smoke`` runs tiny shapes through the Pallas interpreter, to check that the
script works; its timings mean nothing.
"""

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from neox_jax.kernels import reference  # noqa: E402
from neox_jax.kernels.decode_attention import decode_attention  # noqa: E402
from neox_jax.kernels.flash_attention import flash_attention  # noqa: E402

# Pythia-1.4B attention: 16 heads of 128 (REFERENCE.md). Batches keep 16k tokens per
# step, so the XLA reference's [batch, heads, seq, seq] fp32 logits (4.3 GB at 4096)
# and their gradients fit an 80 GB GPU.
FULL = {
    "heads": 16,
    "head_dim": 128,
    "train": [(2048, 8), (4096, 4)],  # (seq, batch)
    "decode_batch": 8,
    "decode": [1024, 4096, 16384],  # cache_len
    "iters": 20,
}
SMOKE = {
    "heads": 2,
    "head_dim": 64,
    "train": [(64, 1)],
    "decode_batch": 2,
    "decode": [128],
    "iters": 2,
}


def _time_ms(fn, *args, iters):
    """Median wall time of a jitted call in ms, after one compile-and-warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _train_impls(smoke):
    """name -> attention(q, k, v) for the causal training benchmark."""
    blocks = {"block_q": 32, "block_k": 32} if smoke else {}
    return {
        "pallas": functools.partial(flash_attention, causal=True, **blocks),
        "xla_reference": functools.partial(reference.segment_attention, causal=True),
        "cudnn": functools.partial(
            jax.nn.dot_product_attention, is_causal=True, implementation="cudnn"
        ),
    }


def _fwd_bwd(attn):
    """jit(value_and_grad) of a scalar loss: one training step's attention work."""

    def loss(q, k, v):
        return jnp.sum(attn(q, k, v).astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _causal_tflops(batch, seq, heads, head_dim, ms):
    # Forward QK^T + PV = 4*b*h*s^2*d flops, backward 10 (recompute QK^T, dV, dP, dQ,
    # dK), halved by causality: the FlashAttention-2 paper's fwd+bwd count.
    flops = 14 * batch * heads * seq * seq * head_dim * 0.5
    return flops / (ms * 1e-3) / 1e12


def bench_train(cfg, smoke):
    rows = []
    for seq, batch in cfg["train"]:
        shape = (batch, seq, cfg["heads"], cfg["head_dim"])
        keys = jax.random.split(jax.random.PRNGKey(seq), 3)
        q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
        ref_out = jax.jit(_train_impls(smoke)["xla_reference"])(q, k, v).astype(jnp.float32)
        for name, attn in _train_impls(smoke).items():
            row = {"bench": "train_fwd_bwd", "impl": name, "seq": seq, "batch": batch}
            try:
                err = jnp.max(jnp.abs(jax.jit(attn)(q, k, v).astype(jnp.float32) - ref_out))
                ms = _time_ms(_fwd_bwd(attn), q, k, v, iters=cfg["iters"])
            except Exception as e:  # cuDNN absent (CPU, old driver) or a shape it rejects
                rows.append({**row, "status": f"unavailable: {type(e).__name__}: {e}"[:300]})
                continue
            tflops = _causal_tflops(batch, seq, cfg["heads"], cfg["head_dim"], ms)
            rows.append(
                {
                    **row,
                    "status": "ok",
                    "ms": ms,
                    "tflops": tflops,
                    "max_abs_err_vs_reference": float(err),
                }
            )
    return rows


def _decode_reference(q, k, v, seg, length):
    mask = ((seg != 0) & (jnp.arange(k.shape[1]) < length))[:, None, None, :]
    return reference.attention(q[:, None], k, v, mask)[:, 0]


def bench_decode(cfg, smoke):
    """One decode step's attention; ``length`` = a quarter and all of the cache."""
    rows, batch, heads, head_dim = [], cfg["decode_batch"], cfg["heads"], cfg["head_dim"]
    kernel = functools.partial(decode_attention, block_k=32 if smoke else None)
    impls = {
        "pallas": lambda q, k, v, seg, n: kernel(q, k, v, seg, length=n),
        "xla_reference": _decode_reference,
    }
    for cache_len in cfg["decode"]:
        keys = jax.random.split(jax.random.PRNGKey(cache_len), 3)
        q = jax.random.normal(keys[0], (batch, heads, head_dim), jnp.bfloat16)
        shape = (batch, cache_len, heads, head_dim)
        k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys[1:])
        for length in (cache_len // 4, cache_len):
            seg = (jnp.arange(cache_len)[None] < length).astype(jnp.int32).repeat(batch, 0)
            args = (q, k, v, seg, jnp.int32(length))
            ref_out = jax.jit(_decode_reference)(*args).astype(jnp.float32)
            for name, fn in impls.items():
                fn = jax.jit(fn)
                err = jnp.max(jnp.abs(fn(*args).astype(jnp.float32) - ref_out))
                us = _time_ms(fn, *args, iters=cfg["iters"] * 5) * 1e3
                read = 2 * batch * length * heads * head_dim * 2  # live K and V bytes
                rows.append(
                    {
                        "bench": "decode",
                        "impl": name,
                        "cache_len": cache_len,
                        "length": length,
                        "batch": batch,
                        "status": "ok",
                        "us": us,
                        "live_kv_gb_per_s": read / (us * 1e-6) / 1e9,
                        "max_abs_err_vs_reference": float(err),
                    }
                )
    return rows


def markdown(rows):
    """Two markdown tables (training, decode) from the result rows."""
    lines = [
        "| seq | batch | impl | fwd+bwd ms | TFLOP/s | max abs err | status |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in (r for r in rows if r["bench"] == "train_fwd_bwd"):
        ok = r["status"] == "ok"
        lines.append(
            f"| {r['seq']} | {r['batch']} | {r['impl']} | "
            f"{r['ms']:.2f} | {r['tflops']:.1f} | {r['max_abs_err_vs_reference']:.2e} | ok |"
            if ok
            else f"| {r['seq']} | {r['batch']} | {r['impl']} | - | - | - | {r['status'][:60]} |"
        )
    lines += [
        "",
        "| cache_len | length | batch | impl | us | live K/V GB/s | max abs err |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in (r for r in rows if r["bench"] == "decode"):
        lines.append(
            f"| {r['cache_len']} | {r['length']} | {r['batch']} | {r['impl']} | "
            f"{r['us']:.1f} | {r['live_kv_gb_per_s']:.0f} | "
            f"{r['max_abs_err_vs_reference']:.2e} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results.json", help="where to write the JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpret)")
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    smoke = args.smoke or backend == "cpu"
    if smoke and not args.smoke:
        print("No accelerator: running --smoke shapes in interpret mode.", file=sys.stderr)
    cfg = SMOKE if smoke else FULL
    rows = bench_train(cfg, smoke) + bench_decode(cfg, smoke)
    result = {
        "device": str(jax.devices()[0].device_kind),
        "backend": backend,
        "jax": jax.__version__,
        "smoke": smoke,
        "dtype": "bfloat16",
        "heads": cfg["heads"],
        "head_dim": cfg["head_dim"],
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"{result['device']} ({backend}, jax {jax.__version__}, bf16, heads {cfg['heads']}, "
        f"head_dim {cfg['head_dim']}, causal)\n"
    )
    print(markdown(rows))
    return result


if __name__ == "__main__":
    main()

"""The train step's matmuls one by one, JAX (XLA:CPU) against torch, same shapes.

Which products of the pythia-70m step (8 x 256 or 8 x 512 tokens, fp32) run slower in
XLA than in torch, and whether another dimension order of the same product (an
operand pre-transposed, the output transposed) runs faster. Each product is timed
alone (best of ``--reps``) in this one process, JAX first then torch; a memory-bandwidth
probe (a large fp32 copy and a scaled add) gives the GB/s the elementwise passes can
hope for.

    python experiments/train_bench/matmul_shapes.py --seq=256 --out=/tmp/shapes.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def best(fn, reps):
    fn()
    out = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def products(n: int, e: int = 512, f: int = 2048, v: int = 50304):
    """(name, lhs shape, rhs shape, jnp.einsum spec, torch form) of the step's products.

    ``n`` = tokens. Torch forms: 'mm' (a @ b), 'mt' (a @ b.T), 'tm' (a.T @ b).
    """
    return [
        ("head fwd x@W", (n, e), (e, v), "ne,ev->nv", "mm"),
        ("head dx dl@W^T", (n, v), (e, v), "nv,ev->ne", "mt"),
        ("head dx dl@Wt (W as [V,E])", (n, v), (v, e), "nv,ve->ne", "mm"),
        ("head dW x^T@dl", (n, e), (n, v), "ne,nv->ev", "tm"),
        ("head dW^T dl^T@x ([V,E] out)", (n, v), (n, e), "nv,ne->ve", "tm"),
        # The logits (and their gradient) stored vocabulary-major, [V, N]:
        ("head fwd -> logits^T", (n, e), (e, v), "ne,ev->vn", None),
        ("head dx^T = W@dl^T", (e, v), (v, n), "ev,vn->en", "mm"),
        ("head dW = x^T@(dl^T)^T", (e, n), (v, n), "en,vn->ev", "mt"),
        ("mlp up fwd", (n, e), (e, f), "ne,ef->nf", "mm"),
        ("mlp up dx", (n, f), (e, f), "nf,ef->ne", "mt"),
        ("mlp up dW", (n, e), (n, f), "ne,nf->ef", "tm"),
        ("mlp down fwd", (n, f), (f, e), "nf,fe->ne", "mm"),
        ("mlp down dx", (n, e), (f, e), "ne,fe->nf", "mt"),
        ("mlp down dW", (n, f), (n, e), "nf,ne->fe", "tm"),
        ("qkv fwd", (n, e), (e, 3 * e), "ne,ef->nf", "mm"),
        ("qkv dx", (n, 3 * e), (e, 3 * e), "nf,ef->ne", "mt"),
        ("qkv dW", (n, e), (n, 3 * e), "ne,nf->ef", "tm"),
    ]


def _flops(spec, a_shape, b_shape):
    """2 x the product of every named dimension's size (each appears once)."""
    lhs = spec.split("->")[0].split(",")
    sizes = dict(zip(lhs[0], a_shape, strict=True)) | dict(zip(lhs[1], b_shape, strict=True))
    return 2 * math.prod(sizes.values())


# XLA:CPU's dot libraries, chosen per compile (``jax.jit(compiler_options=...)``), so
# nothing global changes: YNNPACK (the default), Eigen, oneDNN.
JAX_OPTIONS = {
    "ynn": {},
    "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "onednn": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_use_onednn": True},
}


def run_jax(n, reps, options=None):
    import jax
    import jax.numpy as jnp

    out = {}
    for name, a_shape, b_shape, spec, _ in products(n):
        a = jax.random.normal(jax.random.key(0), a_shape, jnp.float32)
        b = jax.random.normal(jax.random.key(1), b_shape, jnp.float32)
        f = jax.jit(lambda a, b, spec=spec: jnp.einsum(spec, a, b), compiler_options=options)
        s = best(lambda f=f, a=a, b=b: f(a, b).block_until_ready(), reps)
        out[name] = {"s": s, "gflops": _flops(spec, a_shape, b_shape) / s / 1e9}
    x = jnp.ones((64 * 1024 * 1024,), jnp.float32)  # 256 MB
    copy = jax.jit(lambda x: x * 1.0001)
    out["bandwidth scale (GB/s, read+write)"] = (
        2 * x.nbytes / best(lambda: copy(x).block_until_ready(), reps) / 1e9
    )
    add = jax.jit(lambda x, y: x + 0.5 * y)
    y = x + 1
    out["bandwidth axpy (GB/s, 2 reads+write)"] = (
        3 * x.nbytes / best(lambda: add(x, y).block_until_ready(), reps) / 1e9
    )
    return out


def run_torch(n, reps):
    import torch

    out = {"threads": torch.get_num_threads()}
    for name, a_shape, b_shape, spec, form in products(n):
        a, b = torch.randn(*a_shape), torch.randn(*b_shape)
        if form is None:
            continue
        fn = {"mm": lambda a=a, b=b: a @ b, "mt": lambda a=a, b=b: a @ b.T,
              "tm": lambda a=a, b=b: a.T @ b}[form]  # fmt: skip
        s = best(fn, reps)
        out[name] = {"s": s, "gflops": _flops(spec, a_shape, b_shape) / s / 1e9}
    x = torch.ones(64 * 1024 * 1024)
    out["bandwidth scale (GB/s, read+write)"] = 2 * x.nbytes / best(lambda: x * 1.0001, reps) / 1e9
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--libs", default="ynn", help=f"comma-separated of {list(JAX_OPTIONS)}")
    p.add_argument("--out", default="")
    args = p.parse_args()
    n = args.batch * args.seq
    libs = args.libs.split(",")
    report = {"tokens": n, "load_before": os.getloadavg()}
    for lib in libs:
        report[f"jax:{lib}"] = run_jax(n, args.reps, JAX_OPTIONS[lib])
    engines = [f"jax:{lib}" for lib in libs]
    if not args.skip_torch:
        report["torch"] = run_torch(n, args.reps)
        engines.append("torch")
    report["load_after"] = os.getloadavg()
    print(f"{'product (GFLOP/s; bandwidth GB/s)':34s} " + " ".join(f"{e:>10s}" for e in engines))
    for name in report[engines[0]]:
        vals = []
        for e in engines:
            r = report[e].get(name)
            r = r["gflops"] if isinstance(r, dict) else r
            vals.append(f"{r:10.1f}" if isinstance(r, float) else f"{'-':>10s}")
        print(f"{name:34s} " + " ".join(vals))
    print("load", report["load_before"], report["load_after"])
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()

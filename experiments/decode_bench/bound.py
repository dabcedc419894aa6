"""How fast can an XLA:CPU greedy decode step be on this machine? An upper bound on tokens/s.

Issue 19 asks for batch-16 greedy decoding of pythia-160m (fp32) at >= 2x transformers'
tokens/s on the same 2 cores. This bounds any XLA:CPU program of that decode loop from
above (its time from below), optimistically:

* **the products**: every weight product of one step (each layer's QKV, attention
  output, MLP up and down, and the output layer), ``[batch, in]`` rows against the
  weight in either storage order (``[in, out]`` or ``[out, in]``: a program may keep
  either), each jitted and timed alone with the fastest of XLA:CPU's three dot libraries
  (YNNPACK, Eigen, oneDNN, per compile through ``compiler_options``). Timed alone and
  repeated, a layer's weights may stay in the caches between calls, which in a real step
  (650 MB of weights streaming through) they cannot: that only makes the bound lower.
  A product the library runs on one core could overlap another on the second core, so
  each counts ``min(wall, CPU seconds / 2)``;
* **the attention over the cache**: at a cache of ``p`` positions every step must read
  the ``p`` valid keys and values of every layer and row once, ``2 L B p E`` words (a
  perfect kernel that reads no empty columns), at the best memory bandwidth measured here;
  its products (one query row per head) count no time beyond those bytes;
* **everything else counts zero**: the layer norms, GELU, residual adds, rotary, the
  softmax, the argmax, the embedding gather and the host's loop.

Summed over the bench's decode (``--prompt_len`` 128, ``--new_tokens`` 128: the steps
attend over 129 ... 255 positions; the prefill makes the first token), ``batch x
new_tokens / time``, the bench's own count for both decoders, bounds tokens/s from above.
With ``--results`` (a ``bench.py`` report of the same quiet window) it prints how that
bound compares with 2x transformers' decode-only tokens/s.

    python experiments/decode_bench/bench.py --models=pythia-160m --batches=16 --rounds=2 \\
        --out=experiments/decode_bench/results_bound.json
    python experiments/decode_bench/bound.py \\
        --results=experiments/decode_bench/results_bound.json \\
        --out=experiments/decode_bench/bound_160m_b16.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train_bench"))

from matmul_shapes import JAX_OPTIONS  # noqa: E402


def weight_products(config) -> list[tuple[str, int, int, int]]:
    """(name, inputs, outputs, count per step) of every weight product of a decode step."""
    e, f, v, layers = (config.hidden_size, config.intermediate_size, config.vocab_size,
                       config.num_hidden_layers)  # fmt: skip
    per_layer = [("qkv", e, 3 * e), ("attention out", e, e), ("mlp up", e, f), ("mlp down", f, e)]
    return [(n, i, o, layers) for n, i, o in per_layer] + [("output layer", e, v, 1)]


def _timed(fn, reps: int) -> tuple[float, float]:
    """(wall, CPU seconds of this process) of the fastest of ``reps`` calls."""
    fn()
    best = (float("inf"), float("inf"))
    for _ in range(reps):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        run = (time.perf_counter() - wall, time.process_time() - cpu)
        best = min(best, run)
    return best


def time_products(config, batch: int, reps: int, streamed: bool = False) -> list[dict]:
    """Per product shape, the fastest library and weight order; ``counted_s`` per step.

    ``streamed``: each of a step's ``count`` products of a shape gets its own weight (the
    layers' distinct matrices, as in a real step) and one jitted program runs them all in
    turn, so each weight comes from memory, not from the caches a repeated one sits in.
    """
    import jax
    import jax.numpy as jnp

    rows = []
    for name, inputs, outputs, count in weight_products(config):
        x = jax.random.normal(jax.random.key(0), (batch, inputs), jnp.float32)
        timings = {}
        for order, shape, spec in (("[in, out]", (inputs, outputs), "bi,io->bo"),
                                   ("[out, in]", (outputs, inputs), "bi,oi->bo")):  # fmt: skip
            n = count if streamed else 1
            ws = [jax.random.normal(jax.random.key(1 + i), shape, jnp.float32) for i in range(n)]
            for lib, options in JAX_OPTIONS.items():
                f = jax.jit(lambda a, bs, s=spec: [jnp.einsum(s, a, b) for b in bs],
                            compiler_options=options)  # fmt: skip
                wall, cpu = _timed(lambda f=f, x=x, ws=ws: jax.block_until_ready(f(x, ws)), reps)
                timings[f"{lib} {order}"] = {"wall_s": wall / n, "cpu_s": cpu / n,
                                             "counted_s": min(wall, cpu / 2) / n}  # fmt: skip
            del ws
        best = min(timings, key=lambda k: timings[k]["counted_s"])
        flops = 2 * batch * inputs * outputs
        rows.append({
            "product": f"{name} [{batch}, {inputs}] x [{inputs}, {outputs}]", "count": count,
            "best": best, "counted_s": timings[best]["counted_s"] * count,
            "gflops": flops / timings[best]["counted_s"] / 1e9, "all": timings,
        })  # fmt: skip
    return rows


def time_other_libraries(config, batch: int, reps: int) -> dict[str, dict[str, float]]:
    """Seconds per step of each product shape, streamed as ``time_products(streamed=True)``,
    with the BLAS of numpy (OpenBLAS) and of torch (all cores): not XLA:CPU's, so not part
    of the bound, but they say whether another library streams these few-row products
    faster on this machine."""
    import numpy as np

    libs = {"numpy": lambda x, w, order: x @ w if order == "[in, out]" else x @ w.T}
    try:
        import torch

        def torch_product(x, w, order):
            return x @ w if order == "[in, out]" else torch.nn.functional.linear(x, w)

        libs["torch"] = torch_product
    except ImportError:
        torch = None
    out = {}
    rng = np.random.default_rng(0)
    for name, inputs, outputs, count in weight_products(config):
        best = {}
        for order, shape in (("[in, out]", (inputs, outputs)), ("[out, in]", (outputs, inputs))):
            ws = [rng.standard_normal(shape, np.float32) for _ in range(count)]
            x = rng.standard_normal((batch, inputs), np.float32)
            for lib, product in libs.items():
                if lib == "torch":
                    xs, wl = torch.from_numpy(x), [torch.from_numpy(w) for w in ws]
                else:
                    xs, wl = x, ws
                wall, _ = _timed(lambda p=product, xs=xs, wl=wl, o=order: [p(xs, w, o) for w in wl],
                                 reps)  # fmt: skip
                best[f"{lib} {order}"] = wall  # the step's `count` products of this shape
            del ws
        out[name] = best
    return out


def best_bandwidth(reps: int) -> dict[str, float]:
    """GB/s of three probes over 256 MiB (every byte counted once per read or write)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = 64 * 2**20
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
    x = jnp.ones(n, jnp.float32)
    total, scale = jax.jit(jnp.sum), jax.jit(lambda a: a * 1.0001)
    return {
        "numpy copy": 2 * src.nbytes / _timed(lambda: np.copyto(dst, src), reps)[0] / 1e9,
        "xla read (sum)": x.nbytes / _timed(lambda: total(x).block_until_ready(), reps)[0] / 1e9,
        "xla scale": 2 * x.nbytes / _timed(lambda: scale(x).block_until_ready(), reps)[0] / 1e9,
    }


def bound(config, batch: int, prompt_len: int, new_tokens: int, rows, bandwidths) -> dict:
    step_products = sum(r["counted_s"] for r in rows)
    gb_s = max(bandwidths.values())
    word = 4  # fp32 cache
    # The step that makes token i (i = 1 .. new_tokens - 1; token 0 comes from the
    # prefill) attends over prompt_len + i positions.
    steps = range(1, new_tokens)
    kv_bytes = [2 * config.num_hidden_layers * batch * (prompt_len + i) * config.hidden_size
                * word for i in steps]  # fmt: skip
    seconds = len(steps) * step_products + sum(kv_bytes) / (gb_s * 1e9)
    return {
        "products_s_per_step": step_products,
        "kv_gb_per_step_mean": sum(kv_bytes) / len(kv_bytes) / 1e9,
        "best_bandwidth_gb_s": gb_s,
        "decode_s_lower_bound": seconds,
        # bench.py's convention (both decoders): batch x new_tokens over the decode steps.
        "tok_s_upper_bound": batch * new_tokens / seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pythia-160m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--streamed",
        action="store_true",
        help="each layer's product with its own weight, read from memory",
    )
    p.add_argument(
        "--other_libraries",
        action="store_true",
        help="also time the products (streamed) with numpy's and torch's BLAS",
    )
    p.add_argument("--results", default="", help="a bench.py report: both decoders' tokens/s")
    p.add_argument("--out", default="")
    args = p.parse_args()
    from neox_jax.model import ModelConfig

    config = ModelConfig.from_preset(args.model)
    report = {"model": args.model, "batch": args.batch, "streamed": args.streamed,
              "load_before": os.getloadavg()}  # fmt: skip
    rows = time_products(config, args.batch, args.reps, streamed=args.streamed)
    if args.other_libraries:
        other = time_other_libraries(config, args.batch, args.reps)
        report["other_libraries_s_per_step"] = other
        # Each shape at the fastest of every library, XLA:CPU's and the others.
        report["products_s_per_step_any_library"] = sum(
            min(r["counted_s"], *other[name].values())
            for r, (name, *_) in zip(rows, weight_products(config), strict=True)
        )
    bandwidths = best_bandwidth(args.reps)
    report |= {"rows": rows, "bandwidths_gb_s": bandwidths}
    report |= bound(config, args.batch, args.prompt_len, args.new_tokens, rows, bandwidths)
    report["load_after"] = os.getloadavg()
    print(f"{'product':44s} {'count':>5s} {'best library, weight order':>28s} {'s/step':>8s} "
          f"{'GFLOP/s':>8s}")  # fmt: skip
    for r in rows:
        print(f"{r['product']:44s} {r['count']:5d} {r['best']:>28s} {r['counted_s']:8.4f} "
              f"{r['gflops']:8.0f}")  # fmt: skip
    print(
        f"products: {report['products_s_per_step'] * 1e3:.1f} ms per step; cache "
        f"{report['kv_gb_per_step_mean']:.3f} GB per step at {report['best_bandwidth_gb_s']:.1f}"
        f" GB/s (best of {', '.join(f'{k} {v:.1f}' for k, v in bandwidths.items())})"
    )
    print(f"decode tokens/s upper bound, any XLA:CPU program: {report['tok_s_upper_bound']:.1f}")
    for name, libs in report.get("other_libraries_s_per_step", {}).items():
        best = min(libs, key=libs.get)
        print(f"  {name}: best other library {best} {libs[best]:.4f} s per step")
    if "products_s_per_step_any_library" in report:
        print(
            f"products at the fastest of every library: "
            f"{report['products_s_per_step_any_library'] * 1e3:.1f} ms per step"
        )
    if args.results:
        rows_b = json.loads(Path(args.results).read_text())["rows"]
        found = [r for r in rows_b if r["model"] == args.model and r["batch"] == args.batch]
        if not found:
            p.error(f"{args.results} has no row for {args.model} at batch {args.batch}")
        row = found[0]
        ours, hf = row["ours"]["decode_tok_s"], row["hf"]["decode_tok_s"]
        report["measured_decode_tok_s"] = {"neox_jax": ours, "transformers": hf}
        report["bound_vs_transformers"] = report["tok_s_upper_bound"] / hf
        print(f"measured decode-only tokens/s: neox_jax {ours:.1f}, transformers {hf:.1f} "
              f"({ours / hf:.2f}x); 2x needs {2 * hf:.1f}; the bound allows at most "
              f"{report['bound_vs_transformers']:.2f}x transformers")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""How fast can an XLA:CPU train step be on this machine? A lower bound from its parts.

Issue 19 asks for a pythia-70m train step (fp32, AdamW) at >= 1.2x transformers +
PyTorch on the same 2 cores. This bounds any XLA:CPU program of that step from below,
optimistically:

* **the products**: every matmul of the step (the 6 layers' QKV, attention output and
  MLP products, forward and both gradients; the attention's 6 batched products at half
  their full-square time, as a perfect causal kernel would; the head's forward, input
  gradient and weight gradient, each in the fastest of its dimension orders) timed
  alone, each with the fastest of XLA:CPU's three dot libraries for that product
  (YNNPACK, Eigen, oneDNN, chosen per compile through ``compiler_options``), summed;
* **the passes no product does**, each at its fewest bytes (``min_passes``: every input
  read once and every output written once, nothing recomputed or re-read): the cross
  entropy (logits in, their gradient out), AdamW (parameter, gradient and both moments in,
  three out), GELU and the attention softmax forward and backward (the softmax on the
  causal half), the layer norms, and the embedding's gradient, all at the best memory
  bandwidth measured here (any probe, JAX or torch). Residual adds, biases, rotary,
  masks, the clipping norm and the loss's reductions count zero.

Nothing overlaps in the bound: XLA:CPU ran no two ops of this step at once in the
profiles (``thread_use.py``), and a product that its fastest library spreads over both
cores leaves no core to overlap with. ``torch_step / bound`` is then the most any XLA:CPU
step can gain over torch with the dot libraries XLA has; the same sum over torch's own
product times is printed beside it. The torch (and JAX) step times come from a
``bench.py`` report of the same quiet window (``--results``).

    python experiments/train_bench/bench.py --variants=unroll --seq=256 --steps=2 \\
        --warmup=1 --out=/tmp/r256.json
    python experiments/train_bench/bound.py --results=/tmp/r256.json \\
        --out=experiments/train_bench/bound_256.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

from matmul_shapes import JAX_OPTIONS, _flops, best  # noqa: E402

# pythia-70m
E, F, V, HEADS, LAYERS = 512, 2048, 50304, 8, 6
# The head's three roles, each in any of the dimension orders a program could pick.
HEAD_ROLES = {
    "head forward": [("ne,ev->nv", "mm"), ("ne,ev->vn", None)],
    "head input gradient": [("nv,ev->ne", "mt"), ("nv,ve->ne", "mm"), ("ev,vn->en", "mm")],
    "head weight gradient": [("ne,nv->ev", "tm"), ("nv,ne->ve", "tm"), ("en,vn->ev", "mt")],
}


def _shapes(spec: str, sizes: dict) -> tuple[tuple, tuple]:
    lhs, rhs = spec.split("->")[0].split(",")
    return tuple(sizes[c] for c in lhs), tuple(sizes[c] for c in rhs)


def products(batch: int, seq: int) -> list[tuple[str, str, int, float, str | None]]:
    """(name, einsum spec, count per step, share of the measured time counted, torch form).

    Letters: n tokens, e width, f any layer's output width, v vocabulary; b batch x heads,
    t/s positions, d head width.
    """
    layer = []
    for name, out in (("qkv", 3 * E), ("attention out", E), ("mlp up", F), ("mlp down", E)):
        inp = F if name == "mlp down" else E
        layer.append((f"{name} forward", "ni,io->no", {"i": inp, "o": out}, "mm"))
        layer.append((f"{name} input grad", "no,io->ni", {"i": inp, "o": out}, "mt"))
        layer.append((f"{name} weight grad", "ni,no->io", {"i": inp, "o": out}, "tm"))
    for name, spec, form in (
        ("scores q.k", "btd,bsd->bts", "bmt"),
        ("context p.v", "bts,bsd->btd", "bmm"),
        ("grad p (do.v)", "btd,bsd->bts", "bmt"),
        ("grad v (p^T.do)", "bts,btd->bsd", "btm"),
        ("grad q (ds.k)", "bts,bsd->btd", "bmm"),
        ("grad k (ds^T.q)", "bts,btd->bsd", "btm"),
    ):
        layer.append((f"attention {name}", spec, {"b": batch * HEADS, "d": E // HEADS}, form))
    out = []
    for name, spec, sizes, form in layer:
        share = 0.5 if name.startswith("attention ") and "out" not in name else 1.0
        out.append((name, spec, LAYERS, share, form, sizes))
    for role, orders in HEAD_ROLES.items():
        for spec, form in orders:
            out.append((f"{role} [{spec}]", spec, 1, 1.0, form, {}))
    tokens = batch * seq
    base = {"n": tokens, "e": E, "v": V, "t": seq, "s": seq}
    return [(n, s, c, sh, f, base | z) for n, s, c, sh, f, z in out]


def time_jax(items, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    out = {}
    for lib, options in JAX_OPTIONS.items():
        for name, spec, _, _, _, sizes in items:
            a_shape, b_shape = _shapes(spec, sizes)
            a = jax.random.normal(jax.random.key(0), a_shape, jnp.float32)
            b = jax.random.normal(jax.random.key(1), b_shape, jnp.float32)
            f = jax.jit(lambda a, b, spec=spec: jnp.einsum(spec, a, b), compiler_options=options)
            run = lambda f=f, a=a, b=b: f(a, b).block_until_ready()  # noqa: E731
            out.setdefault(name, {})[lib] = best(run, reps)
    x = jnp.ones((64 * 1024 * 1024,), jnp.float32)
    y = x + 1
    scale, axpy = jax.jit(lambda x: x * 1.0001), jax.jit(lambda x, y: x + 0.5 * y)
    bw = {
        "jax scale": 2 * x.nbytes / best(lambda: scale(x).block_until_ready(), reps),
        "jax axpy": 3 * x.nbytes / best(lambda: axpy(x, y).block_until_ready(), reps),
    }
    return {"products": out, "bandwidth": bw}


def time_torch(items, reps: int) -> dict:
    import torch

    forms = {
        "mm": lambda a, b: a @ b,
        "mt": lambda a, b: a @ b.T,
        "tm": lambda a, b: a.T @ b,
        "bmm": lambda a, b: torch.bmm(a, b),
        "bmt": lambda a, b: torch.bmm(a, b.transpose(1, 2)),
        "btm": lambda a, b: torch.bmm(a.transpose(1, 2), b),
    }
    out = {}
    for name, spec, _, _, form, sizes in items:
        if form is None:
            continue
        a, b = (torch.randn(*shape) for shape in _shapes(spec, sizes))
        out[name] = best(lambda a=a, b=b, fn=forms[form]: fn(a, b), reps)
    x = torch.ones(64 * 1024 * 1024)
    bw = {"torch scale": 2 * x.nbytes / best(lambda: x * 1.0001, reps)}
    return {"products": out, "bandwidth": bw, "threads": torch.get_num_threads()}


def min_passes(batch: int, seq: int, params: int) -> dict[str, int]:
    """The fewest fp32 bytes each elementwise pass of the step must move (see the module
    docstring): inputs read once, outputs written once."""
    n, word = batch * seq, 4
    causal = batch * HEADS * seq * seq // 2  # attention probabilities a causal kernel keeps
    return {
        "cross entropy (logits in, gradient out)": 2 * n * V * word,
        "AdamW (4 in, 3 out per parameter)": 7 * params * word,
        "GELU (forward 1 in 1 out, backward 2 in 1 out)": LAYERS * 5 * n * F * word,
        "softmax (forward 1 in 1 out, backward 2 in 1 out)": LAYERS * 5 * causal * word,
        "layer norms (2 per layer + final; forward 2, backward 3 passes)": (2 * LAYERS + 1)
        * 5
        * n
        * E
        * word,
        "embedding gradient (written once)": V * E * word,
    }


def bound(items, jax_t: dict, torch_t: dict, batch: int, seq: int) -> dict:
    """Sum the products (fastest library per product, fastest order per head role) and
    the minimum bytes at the best bandwidth."""
    groups: dict[str, list[dict]] = {}
    for name, spec, count, share, _, sizes in items:
        libs = jax_t["products"][name]
        lib = min(libs, key=libs.get)
        flops = _flops(spec, *_shapes(spec, sizes)) * share * count
        torch_s = torch_t["products"].get(name)
        role = next((r for r in HEAD_ROLES if name.startswith(r)), name)
        groups.setdefault(role, []).append({
            "product": name, "count": count, "counted_share": share, "gflop": flops / 1e9,
            "xla_best_lib": lib, "xla_s": libs[lib] * share * count,
            "xla_gflops": flops / (libs[lib] * share * count) / 1e9,
            "torch_s": None if torch_s is None else torch_s * share * count,
        })  # fmt: skip
    rows = []
    for role, group in groups.items():
        row = min(group, key=lambda r: r["xla_s"])
        torch_times = [r["torch_s"] for r in group if r["torch_s"] is not None]
        if len(group) > 1:  # a head role: its fastest order in each engine
            row = {**row, "product": f"{role} ({row['product'].split(' [')[1][:-1]})",
                   "torch_s": min(torch_times)}  # fmt: skip
        rows.append(row)
    xla_total = sum(r["xla_s"] for r in rows)
    torch_total = sum(r["torch_s"] for r in rows)
    from neox_jax.model import ModelConfig
    from neox_jax.model.transformer import count_params

    params = count_params(ModelConfig.from_preset("pythia-70m"))
    passes = min_passes(batch, seq, params)
    min_bytes = sum(passes.values())
    bws = {**jax_t["bandwidth"], **torch_t["bandwidth"]}
    seconds = min_bytes / max(bws.values())
    return {
        "rows": rows,
        "products_s": {"xla_fastest_library": xla_total, "torch": torch_total},
        "passes": {
            "min_bytes": min_bytes,
            "bytes_by_pass": passes,
            "bandwidths_gb_s": {k: v / 1e9 for k, v in bws.items()},
            "best_gb_s": max(bws.values()) / 1e9,
            "s": seconds,
        },
        "xla_step_lower_bound_s": xla_total + seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--results", default="", help="a bench.py report: torch and JAX step times")
    p.add_argument("--out", default="")
    args = p.parse_args()
    items = products(args.batch, args.seq)
    report = {"batch": args.batch, "seq": args.seq, "load_before": os.getloadavg()}
    jax_t, torch_t = time_jax(items, args.reps), time_torch(items, args.reps)
    report |= bound(items, jax_t, torch_t, args.batch, args.seq)
    report["load_after"] = os.getloadavg()
    if args.results:
        summary = json.loads(Path(args.results).read_text())["summary"]
        steps = {k: v["step_s_median"] for k, v in summary.items()}
        torch_step = steps["torch"]
        report["measured_steps_s"] = steps
        report["target_step_s (torch / 1.2)"] = torch_step / 1.2
        report["best_possible_vs_torch"] = torch_step / report["xla_step_lower_bound_s"]
    head = ("GFLOP", "XLA s", "lib", "GFLOP/s", "torch s")
    print(f"{'product':58s} " + " ".join(f"{h:>8s}" for h in head))
    for r in report["rows"]:
        t = "" if r["torch_s"] is None else f"{r['torch_s']:.3f}"
        print(f"{r['product']:58s} {r['gflop']:8.1f} {r['xla_s']:8.3f} {r['xla_best_lib']:>8s} "
              f"{r['xla_gflops']:8.0f} {t:>8s}")  # fmt: skip
    ps = report["products_s"]
    print(f"products: XLA (fastest library each) {ps['xla_fastest_library']:.3f} s, "
          f"torch {ps['torch']:.3f} s")  # fmt: skip
    pa = report["passes"]
    print(f"passes: {pa['min_bytes'] / 1e9:.2f} GB at {pa['best_gb_s']:.1f} GB/s = {pa['s']:.3f} s")
    print(f"XLA:CPU step lower bound: {report['xla_step_lower_bound_s']:.3f} s")
    if args.results:
        print(f"measured steps (s): {report['measured_steps_s']}")
        print(
            f"1.2x torch needs a step of {report['target_step_s (torch / 1.2)']:.3f} s; "
            f"the bound allows at most {report['best_possible_vs_torch']:.2f}x torch"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

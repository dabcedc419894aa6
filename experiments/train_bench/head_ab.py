"""The output layer + cross entropy alone (``training.loss.head_loss`` and its gradient),
chunk sizes against each other in alternating rounds inside one process.

    python experiments/train_bench/head_ab.py --chunks=0,512,1024 --seq=256 \
        --out=/tmp/head_ab.json

Variant ``0`` is one chunk of the whole batch (the formulation before chunking); a
suffix ``y`` (``512y``) compiles that variant with YNNPACK given the dots and
elementwise fusions but not the reductions (``xla_cpu_experimental_ynn_fusion_type``,
set for that one jit, nothing global). Each
round times every variant once (best of ``--reps`` calls), with the process's CPU
seconds per call (all threads) and the load average beside; the best round counts.
Not a test: no assertion on time. The gradients of every variant are compared with
variant 0's (max relative difference), so a faster variant that is wrong shows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
YNN_NO_REDUCE = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"


def _time(fn, reps: int) -> tuple[float, float]:
    """Best wall seconds of ``reps`` calls, and the CPU seconds of that call."""
    best, cpu = float("inf"), 0.0
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        fn()
        w, c = time.perf_counter() - w, time.process_time() - c
        if w < best:
            best, cpu = w, c
    return best, cpu


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--chunks", default="0,512")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from neox_jax.training.loss import OutputHead, head_loss

    rng = np.random.default_rng(0)
    states = jnp.asarray(rng.standard_normal((args.batch, args.seq, args.hidden)), jnp.float32)
    kernel = jnp.asarray(0.02 * rng.standard_normal((args.hidden, args.vocab)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq)), jnp.int32)
    weights = jnp.ones(targets.shape, jnp.float32)
    chunks = args.chunks.split(",")
    fns = {}
    for c in chunks:

        def loss(s, k, c=int(c.rstrip("y"))):
            return head_loss(OutputHead(s, k), targets, weights, chunk_tokens=c)

        opts = {"xla_cpu_experimental_ynn_fusion_type": YNN_NO_REDUCE} if "y" in c else {}
        fns[c] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), compiler_options=opts)
    outs = {c: jax.block_until_ready(f(states, kernel)) for c, f in fns.items()}  # compile
    ref = outs[chunks[0]]
    diffs = {
        c: max(
            float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
            for a, b in zip(jax.tree.leaves(o), jax.tree.leaves(ref), strict=True)
        )
        for c, o in outs.items()
    }
    rounds = []
    for r in range(args.rounds):
        row = {}
        for c, f in fns.items():
            wall, cpu = _time(lambda f=f: jax.block_until_ready(f(states, kernel)), args.reps)
            row[c] = {"wall_s": wall, "cpu_s": cpu, "load": list(os.getloadavg())}
            print(f"round {r} chunk {c}: {wall * 1e3:.1f} ms wall, {cpu:.2f} CPU-s, "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
        rounds.append(row)
    best = {c: min(r[c]["wall_s"] for r in rounds) for c in chunks}
    report = {"settings": vars(args), "rounds": rounds, "best_wall_s": best, "max_rel_diff": diffs}
    print(json.dumps({"best_wall_s": best, "max_rel_diff": diffs}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

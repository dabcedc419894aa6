"""Time to trace and lower a model's programs (before XLA compiles them), A/B.

Every new program pays JAX's tracing (Python running the model to build a jaxpr) and
lowering (jaxpr to StableHLO) before XLA's compile; for small models on CPU, and for
every fresh process (a command-line run, a serving start-up, a test), that Python time
is most of the start-up. This measures it for the programs users start with: the
training step (AdamW, the trainer's loss), the forward pass, ``init_params`` and
``abstract_params``, on preset shapes, with nothing compiled.

Variants (each timed in a fresh process, alternating, best of ``--rounds``):

* ``now``: the code as it is;
* ``flax_check``: Flax's default ``nn.scan``, which traces the layer body once more to
  check that broadcast values are loop invariants (what the model did before
  2026-12-02);

plus, within one process, ``abstract_params`` called twice for the same config (the
second is a cache hit since 2026-12-02).

    python experiments/trace_bench/bench.py --out=experiments/trace_bench/results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _start() -> float:
    # A full collection first: otherwise where Python's collector happens to run (after
    # however many allocations the earlier traces made) moves time between the rows.
    gc.collect()
    return time.perf_counter()


def worker(preset: str, variant: str) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if variant == "flax_check":  # Flax's default: one more trace of the layer body
        import flax.core.axes_scan as axes_scan

        original = axes_scan.scan

        def scan(*args, **kwargs):
            kwargs["check_constancy_invariants"] = True
            return original(*args, **kwargs)

        axes_scan.scan = scan
    import jax
    import jax.numpy as jnp
    import optax

    from neox_jax.model import GPTNeoX, ModelConfig, abstract_params, init_params

    config = ModelConfig.from_preset(preset)
    out = {}
    t = _start()
    shapes = abstract_params(config)
    out["abstract_params_s"] = time.perf_counter() - t
    t = _start()
    abstract_params(config)
    out["abstract_params_again_s"] = time.perf_counter() - t

    t = _start()
    jax.jit(lambda key: init_params(config, key)).lower(jax.random.key(0))
    out["init_lower_s"] = time.perf_counter() - t

    ids = jax.ShapeDtypeStruct((8, 512), jnp.int32)

    def forward(params, ids):
        return GPTNeoX(config).apply({"params": params}, ids)

    t = _start()
    jax.jit(forward).lower(shapes, ids)
    out["forward_lower_s"] = time.perf_counter() - t

    tx = optax.adamw(1e-4)

    def step(params, opt_state, ids):
        def loss(p):
            logits = forward(p, ids)[:, :-1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_shapes = jax.eval_shape(tx.init, shapes)
    t = _start()
    jax.jit(step).lower(shapes, opt_shapes, ids)
    out["train_step_lower_s"] = time.perf_counter() - t
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="pythia-160m,pythia-1b,neox-20b")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("JSON" + json.dumps(worker(*args.worker)))
        return
    results = {"machine": os.uname().machine, "cpus": os.cpu_count(), "rows": {}}
    for preset in args.presets.split(","):
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for variant in ("now", "flax_check"):
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", preset, variant],
                    capture_output=True, text=True, cwd=REPO, check=True,
                )  # fmt: skip
                row = json.loads(proc.stdout.split("JSON", 1)[1])
                old = best.setdefault(variant, row)
                for k, v in row.items():
                    old[k] = min(old[k], v)
        results["rows"][preset] = best
        now, before = best["now"], best["flax_check"]
        print(f"{preset}: " + ", ".join(
            f"{k.removesuffix('_s')} {now[k]:.2f} s (flax check {before[k]:.2f} s)" for k in now
        ))  # fmt: skip
    results["loadavg"] = list(os.getloadavg())
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

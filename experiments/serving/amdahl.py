"""The arithmetic of continuous batching against one request at a time, in process.

On the issue's length mix (the loadgen's seeded workload: prompts 32-512, outputs
16-256), a one-slot server spends, per request, one prefill of the prompt's bucket and
one batch-1 decode step per output token; an ``N``-slot engine pays the same prefills
(compute-bound: batching prompts does not make a prompt token cheaper on CPU) and one
``N``-row step per ``N`` output tokens at best (every slot busy). Measured here, on
random weights of a preset's shape, with the engine's own programs:

* ``prefill(b)``: one prompt in bucket ``b`` (``prefill_batch.prefill``), and 4 prompts
  of 128 in one call (``prefill_many``) per prompt token;
* ``d(N, S)``: seconds per decode step of ``slots.generate`` with all ``N`` slots
  running, 16 steps per call, ``S`` cache columns per slot (the served ``max_len``).

From these: the one-slot time of the workload ``T1 = sum prefill + sum out * d(1)``,
the ``N``-slot time at full occupancy ``TN = sum prefill + sum out * d(N) / N``, and
``T1 / TN``, the bound on continuous / one at a time (the ramp and drain of a bounded
run, and partial occupancy, only lower it). Also the prefill share of ``T1`` and the
bound with prefill free (pure decode). Timings are wall seconds, best of ``--rounds``
rounds taken in turns; the load average is printed beside them.

  python experiments/serving/amdahl.py pythia-160m --slots=1,16,24,32 \
      --json=experiments/serving/amdahl_pythia-160m.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from neox_jax.inference import step
from neox_jax.inference.sampling import SamplingParams
from neox_jax.model import PRESETS, ModelConfig, init_params
from neox_jax.serving import prefill_batch
from neox_jax.serving import slots as dev
from neox_jax.serving.admission import request_controls

STEPS = 16


def best_of(fn, rounds: int) -> float:
    """Best wall seconds of ``fn()`` (run once first, untimed: it may compile)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def full_state(config, params, slots: int, columns: int):
    """``slots`` running slots (prompts of 32 tokens) in a state of ``columns`` columns.
    Attention runs over every column whatever a slot's length (static shapes), so the
    step's cost does not depend on how far the prompts reach."""
    state = dev.init_state(config, slots, columns, 8, steps=STEPS)
    prompts = np.random.default_rng(0).integers(2, 1000, (slots, 32)).astype(np.int32)
    pre = prefill_batch.prefill_many(config, params, prompts, np.full(slots, 32, np.int32))
    sp = SamplingParams(max_new_tokens=columns - 40, ignore_eos=True)
    c = [request_controls(sp, (), 8) for _ in range(slots)]
    knobs = {k: np.stack([x[0][k] for x in c]) for k in c[0][0]}
    rows = [np.stack([x[i] for x in c]) for i in (1, 2, 3)]
    keys = jax.random.split(jax.random.key(0), slots)
    ids = np.arange(slots, dtype=np.int32)
    return prefill_batch.insert_many(pre, state, ids, knobs, *rows, keys)


def decode_seconds(config, params, slots: int, columns: int):
    """A closure timing one call of ``STEPS`` steps on ``slots`` running slots; returns
    seconds per step when called."""
    state = [full_state(config, params, slots, columns)]

    def call():
        # Reset the write index so every timed call runs all STEPS steps at the same
        # cost (the slots never end: max_new_tokens is far away).
        state[0], out = dev.generate(config, params, state[0], mode=dev.GREEDY, steps=STEPS)
        return out

    return call


def bucket(n: int, buckets) -> int:
    return next(b for b in buckets if b >= n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("preset", nargs="?", default="pythia-160m")
    ap.add_argument("--slots", default="1,16,24,32")
    ap.add_argument("--columns", default="768", help="cache columns per slot (max_len)")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--buckets", default="32,64,128,256,512", help="prefill buckets")
    ap.add_argument("--serial", type=int, default=8, help="requests the one-slot run serves")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    config = ModelConfig(**PRESETS[args.preset])
    params = jax.device_put(step.split_params(init_params(config, jax.random.key(0)), config))
    # The loadgen's workload, same seed: lengths drawn in the same order.
    rng = np.random.default_rng(args.seed)
    rng.exponential(1.0, args.requests)
    p_lens = rng.integers(32, 513, args.requests)
    for k in p_lens:
        rng.integers(2, config.vocab_size, int(k))
    o_lens = rng.integers(16, 257, args.requests)
    buckets = tuple(int(b) for b in args.buckets.split(","))
    tokens = np.random.default_rng(1).integers(2, 1000, buckets[-1]).astype(np.int32)
    slot_counts = [int(s) for s in args.slots.split(",")]
    columns = [int(c) for c in args.columns.split(",")]

    timers = {}
    for b in buckets:
        timers[("prefill", b)] = lambda b=b: prefill_batch.prefill(
            config, params, tokens[:b], np.int32(b)
        )
    many = np.stack([tokens[:128]] * 4)
    timers[("prefill4x", 128)] = lambda: prefill_batch.prefill_many(
        config, params, many, np.full(4, 128, np.int32)
    )
    for s in columns:
        for n in slot_counts:
            timers[("decode", n, s)] = decode_seconds(config, params, n, s)
    for fn in timers.values():  # compile everything before any timing
        jax.block_until_ready(fn())
    best = {k: float("inf") for k in timers}
    loads = []
    for _ in range(args.rounds):  # A, B, C, A, B, C, ...: each sees the same machine
        for key, fn in timers.items():
            best[key] = min(best[key], best_of(fn, 1))
        loads.append(os.getloadavg()[0])
    prefill = {b: best[("prefill", b)] for b in buckets}
    d = {(n, s): best[("decode", n, s)] / STEPS for n in slot_counts for s in columns}
    pre_each = np.array([prefill[bucket(int(p), buckets)] for p in p_lens])
    pre_total, out_total = float(pre_each.sum()), int(o_lens.sum())
    # The benchmark's one-slot run serves only the first ``--serial`` requests: its
    # tokens/s on those, at the same costs, against the whole workload's.
    k, d1 = args.serial, d[(1, columns[0])]
    serial = {
        f"first_{k}_tok_per_s": float(
            o_lens[:k].sum() / (pre_each[:k].sum() + o_lens[:k].sum() * d1)
        ),
        "all_tok_per_s": out_total / (pre_total + out_total * d1),
    }
    report = {
        "preset": args.preset,
        "requests": args.requests,
        "prompt_tokens": int(p_lens.sum()),
        "output_tokens": out_total,
        "prefill_s": prefill,
        "prefill_per_token_ms": {b: 1e3 * prefill[b] / b for b in buckets},
        "prefill_4x128_per_token_ms": 1e3 * best[("prefill4x", 128)] / 512,
        "decode_step_s": {f"{n}x{s}": v for (n, s), v in d.items()},
        "decode_tok_per_s": {f"{n}x{s}": n / v for (n, s), v in d.items()},
        "load_avg": loads,
        "one_slot_subset": serial,
        "bounds": {},
    }
    for s in columns:
        t1 = pre_total + out_total * d[(1, s)]
        for n in slot_counts:
            tn = pre_total + out_total * d[(n, s)] / n
            report["bounds"][f"{n}x{s}"] = {
                "one_slot_s": t1,
                "prefill_share_of_one_slot": pre_total / t1,
                "n_slot_s": tn,
                "bound": t1 / tn,
                "decode_only_ratio": n * d[(1, s)] / d[(n, s)],
            }
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

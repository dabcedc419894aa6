"""The arithmetic of continuous batching against one request at a time, in process.

On the issue's length mix (the loadgen's seeded workload: prompts 32-512, outputs
16-256), a one-slot server spends, per request, one prefill of the prompt's bucket and
one batch-1 decode step per output token; an ``N``-slot engine pays the same prefills
(compute-bound on CPU: a prompt token costs about the same alone or batched) and one
``N``-row step per ``N`` output tokens at best (every slot busy). Measured here, on
random weights of a preset's shape, with the engine's own programs and weight layouts
(``step.split_params(..., batch=N)``, as ``Engine`` builds them for ``N`` slots):

* ``prefill(layout, b)``: one prompt in bucket ``b`` (``prefill_batch.prefill``), in the
  one-slot layout and in the ``N``-slot layout;
* ``d(N)``: seconds per decode step of ``slots.generate`` with all ``N`` slots running,
  16 steps per call, ``--columns`` cache columns per slot (the served ``max_len``).

From these, per bucket set: the one-slot time ``T1 = sum prefill + sum out * d(1)``,
the ``N``-slot time at full occupancy ``TN = sum prefill + sum out * d(N) / N``, and
``T1 / TN``, an upper bound on continuous / one at a time (a bounded run's ramp and
drain and partial occupancy only lower it); the prefill share of ``T1``; the ratio of
decode alone (prefill free); and the batch-``N`` decode rate that 4x would need
(``None`` where even free decoding cannot reach 4x: the prefills alone take more than
a quarter of ``T1``); and ``T1`` over the time an ideal ``N``-slot engine (no host or
HTTP time) takes for the bounded run, its ramp and drain included (``simulate``, with
the measured step cost of every slot bucket). Also the one-slot rate on the first
``--serial`` requests (what ``full_mix.sh`` serves one at a time) against all of them.
Wall seconds, best of
``--rounds`` rounds taken in turns (A, B, C, A, B, C); the load average after each round.

  python experiments/serving/amdahl.py pythia-160m \
      --json=experiments/serving/amdahl_pythia-160m.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from neox_jax.inference import fused, step
from neox_jax.inference.sampling import SamplingParams
from neox_jax.model import PRESETS, ModelConfig, init_params
from neox_jax.serving import prefill_batch
from neox_jax.serving import slots as dev
from neox_jax.serving.admission import request_controls

STEPS = 16
TARGET = 4.0


def timed(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


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


def decode_call(config, params, slots: int, columns: int):
    """A closure running one call of ``STEPS`` steps on ``slots`` running slots (they
    never end within the run: ``max_new_tokens`` is far away)."""
    state = [full_state(config, params, slots, columns)]

    def call():
        state[0], out = dev.generate(config, params, state[0], mode=dev.GREEDY, steps=STEPS)
        return out

    return call


def workload(requests: int, seed: int, vocab: int):
    """Prompt and output lengths of ``loadgen.make_workload`` on the issue's mix (the
    same draws in the same order)."""
    rng = np.random.default_rng(seed)
    rng.exponential(1.0, requests)
    p_lens = rng.integers(32, 513, requests)
    for k in p_lens:
        rng.integers(2, vocab, int(k))
    return p_lens, rng.integers(16, 257, requests)


def slot_buckets(n: int) -> list[int]:
    """``Engine``'s default slot buckets for ``n`` slots: powers of two from 4, and n."""
    return sorted({b for b in (4, 8, 16, 32, 64) if b < n} | {n})


def simulate(p_lens, o_lens, pre, d, n: int) -> float:
    """Seconds for an ideal ``n``-slot engine to serve the whole bounded workload, every
    request waiting from the start (48 at 32 req/s arrive within ~1.5 s): before each
    decode step up to 4 waiting requests are admitted into free slots (their prefills,
    ``pre`` seconds each, in that step's gap), then one step of the smallest slot bucket
    holding the running requests (``d[bucket]``). No host time, no HTTP: what is left of
    the bound's gap is the ramp and drain of a bounded run, and partial buckets."""
    waiting = list(range(len(p_lens)))
    running: list[int] = []  # remaining output tokens per busy slot
    total = 0.0
    while waiting or running:
        admit = waiting[: min(4, n - len(running))]
        waiting = waiting[len(admit) :]
        total += sum(pre[i] for i in admit)
        running += [int(o_lens[i]) for i in admit]
        total += d[next(b for b in slot_buckets(n) if b >= len(running))]
        running = [r - 1 for r in running if r > 1]
    return total


def bounds(p_lens, o_lens, prefill, d, slot_counts, buckets, serial):
    """The arithmetic of the module docstring for one bucket set."""
    fit = lambda n: next(b for b in buckets if b >= n)  # noqa: E731
    out_total = int(o_lens.sum())

    def prefills(n):  # seconds of prefill per request, in the n-slot layout
        return np.array([prefill[(fused.block_columns(n), fit(int(p)))] for p in p_lens])

    pre1 = prefills(1)
    t1 = float(pre1.sum() + out_total * d[1])
    rows = {}
    for n in slot_counts:
        pre_n = float(prefills(n).sum())
        tn = pre_n + out_total * d[n] / n
        room = t1 / TARGET - pre_n  # seconds left for decoding at 4x
        simulated = simulate(p_lens, o_lens, prefills(n), d, n) if n > 1 else t1
        rows[n] = {
            "simulated_run_ratio": t1 / simulated,
            "one_slot_s": t1,
            "prefill_share_of_one_slot": float(pre1.sum()) / t1,
            "n_slot_s": tn,
            "bound": t1 / tn,
            "decode_only_ratio": n * d[1] / d[n],
            "decode_tok_per_s_for_4x": out_total / room if room > 0 else None,
            "decode_tok_per_s": n / d[n],
        }
    k = serial
    rate = lambda s: float(o_lens[s].sum() / (pre1[s].sum() + o_lens[s].sum() * d[1]))  # noqa: E731
    return {
        "buckets": list(buckets),
        "padded_prompt_tokens": int(sum(fit(int(p)) for p in p_lens)),
        "slots": rows,
        f"one_slot_tok_per_s_first_{k}": rate(slice(0, k)),
        "one_slot_tok_per_s_all": rate(slice(None)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("preset", nargs="?", default="pythia-160m")
    ap.add_argument("--slots", default="1,16,24,32", help="slot counts (1 is always added)")
    ap.add_argument("--columns", type=int, default=768, help="cache columns per slot")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--bucket-sets", default="32,64,128,256,512;32,64,128,192,256,384,512",
        help="prefill bucket sets to compare, ';'-separated",
    )  # fmt: skip
    ap.add_argument("--serial", type=int, default=8, help="requests served one at a time")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    config = ModelConfig(**PRESETS[args.preset])
    base = step.split_params(init_params(config, jax.random.key(0)), config)
    top_counts = sorted({1} | {int(s) for s in args.slots.split(",")})
    # Every slot bucket those engines compute (for the simulation of partial occupancy).
    slot_counts = sorted({b for n in top_counts if n > 1 for b in slot_buckets(n)} | {1})
    layouts = {}  # block columns -> params in that layout (as Engine builds them)
    for n in top_counts:
        cols = fused.block_columns(n)
        if cols not in layouts:
            layouts[cols] = jax.device_put(step.split_params(base, config, batch=n))
    bucket_sets = [tuple(int(b) for b in s.split(",")) for s in args.bucket_sets.split(";")]
    all_buckets = sorted({b for s in bucket_sets for b in s})
    p_lens, o_lens = workload(args.requests, args.seed, config.vocab_size)
    tokens = np.random.default_rng(1).integers(2, 1000, all_buckets[-1]).astype(np.int32)

    timers = {}
    for cols, params in layouts.items():
        for b in all_buckets:
            timers[("prefill", cols, b)] = lambda p=params, b=b: prefill_batch.prefill(
                config, p, tokens[:b], np.int32(b)
            )
    for n in slot_counts:
        params = layouts[fused.block_columns(n)]
        timers[("decode", n)] = decode_call(config, params, n, args.columns)
    start = time.perf_counter()
    for fn in timers.values():  # compile everything before any timing
        timed(fn)
    print(f"compiled {len(timers)} programs in {time.perf_counter() - start:.0f}s", flush=True)
    best = {k: float("inf") for k in timers}
    loads = []
    for _ in range(args.rounds):  # A, B, C, A, B, C: every program sees the same machine
        for key, fn in timers.items():
            best[key] = min(best[key], timed(fn))
        loads.append(round(os.getloadavg()[0], 2))
    prefill = {k[1:]: v for k, v in best.items() if k[0] == "prefill"}
    d = {n: best[("decode", n)] / STEPS for n in slot_counts}
    report = {
        "preset": args.preset,
        "columns": args.columns,
        "requests": args.requests,
        "prompt_tokens": int(p_lens.sum()),
        "output_tokens": int(o_lens.sum()),
        "prefill_ms_per_token": {
            f"{'one-block' if c == 0 else f'{c}-col-blocks'}@{b}": 1e3 * v / b
            for (c, b), v in prefill.items()
        },
        "decode_step_ms": {n: 1e3 * v for n, v in d.items()},
        "decode_tok_per_s": {n: n / v for n, v in d.items()},
        "load_avg_after_each_round": loads,
        "bucket_sets": [
            bounds(p_lens, o_lens, prefill, d, top_counts, s, args.serial) for s in bucket_sets
        ],
    }
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    summary(report)


def summary(r: dict) -> None:
    """The README's table."""
    print(f"\n{r['preset']}, {r['columns']} cache columns, load {r['load_avg_after_each_round']}")
    print("| prefill buckets | slots | decode tok/s | prefill share of T1 | decode-only ratio "
          "| bound T1/TN | simulated 48-request run | decode tok/s needed for 4x |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in r["bucket_sets"]:
        for n, row in s["slots"].items():
            if n == 1:
                continue
            need = row["decode_tok_per_s_for_4x"]
            print(
                f"| {','.join(map(str, s['buckets']))} | {n} | {row['decode_tok_per_s']:.1f} "
                f"| {row['prefill_share_of_one_slot']:.1%} | {row['decode_only_ratio']:.2f}x "
                f"| {row['bound']:.2f}x | {row['simulated_run_ratio']:.2f}x "
                f"| {'unreachable' if need is None else f'{need:.1f}'} |"
            )
    s = r["bucket_sets"][0]
    first = next(v for k, v in s.items() if k.startswith("one_slot_tok_per_s_first"))
    print(f"one slot: {r['decode_tok_per_s'][1]:.1f} decode tok/s; the workload's tok/s on "
          f"the first requests {first:.2f}, on all {s['one_slot_tok_per_s_all']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()

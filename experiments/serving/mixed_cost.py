"""What a prompt chunk costs inside a decode call (``serving.mixed``) against a call of
its own, per device call, at the engine's batch and cache length.

16 running slots of 192 cache columns (prompts of 32 random tokens prefilled) on random
weights of a preset's shape, greedy, the engine's device calls:

* ``decode``: ``slots.generate``, one step of the 16 slots;
* ``decode + chunk C``: ``mixed.generate``, that step with a C-token prompt chunk into a
  free slot in the same products;
* ``decode, then chunk C alone``: the step and ``slots.prefill_chunk`` of the chunk, two
  calls (the engine without mixing);

CPU and wall ms per call, best of ``--rounds`` alternating rounds, and the large
copies, transposes and scatters in the optimized HLO of the mixed call (``--hlo``).

  python experiments/serving/mixed_cost.py pythia-70m --chunks=32,64,128 --hlo \
      --json=experiments/serving/mixed_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np

from neox_jax.inference import step
from neox_jax.inference.sampling import SamplingParams
from neox_jax.model import ModelConfig, init_params
from neox_jax.serving import mixed, prefill_batch
from neox_jax.serving import slots as dev
from neox_jax.serving.admission import request_controls

sys.path.insert(0, str(Path(__file__).parent))
from step_cost import big_ops, timed  # noqa: E402

N, P, CACHE, CALLS = 16, 32, 192, 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("preset", nargs="?", default="pythia-70m")
    ap.add_argument("--chunks", default="32,64,128")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hlo", action="store_true")
    ap.add_argument("--json", default="", help="write the per-call figures here")
    args = ap.parse_args()
    config = ModelConfig.from_preset(args.preset)
    params = jax.device_put(step.split_params(init_params(config, jax.random.key(0)), config))
    rng = np.random.default_rng(0)
    prompts = rng.integers(2, 1000, (N, P)).astype(np.int32)
    sp = [SamplingParams(max_new_tokens=CACHE - P - 8, ignore_eos=True)] * N

    def fresh_state():  # slots 0 .. N-2 running, slot N-1 free for the chunk
        state = dev.init_state(config, N, CACHE, 8, steps=16)
        pre = prefill_batch.prefill_many(config, params, prompts, np.full(N, P, np.int32))
        c = [request_controls(p, (), 8) for p in sp]
        knobs = {k: np.stack([x[0][k] for x in c]) for k in c[0][0]}
        rows = [np.stack([x[i] for x in c]) for i in (1, 2, 3)]
        keys = jax.random.split(jax.random.key(0), N)
        state = prefill_batch.insert_many(
            pre, state, np.arange(N, dtype=np.int32), knobs, *rows, keys
        )
        return dev.release(state, np.int32(N - 1))

    chunk_slot, length = np.int32(N - 1), np.int32(CACHE - 8)

    def decode(state):
        return dev.generate(config, params, state, mode=dev.GREEDY, steps=16, until=np.int32(1))

    def mix(state, c):
        tokens = rng.integers(2, 1000, c).astype(np.int32)
        return mixed.generate(
            config, params, state, chunk_slot, tokens, np.int32(0), length, mode=dev.GREEDY
        )

    def apart(state, c):
        tokens = rng.integers(2, 1000, c).astype(np.int32)
        state, out = decode(state)
        state = dev.prefill_chunk(config, params, state, chunk_slot, tokens, np.int32(0), length)
        return state, out

    chunks = [int(c) for c in args.chunks.split(",")]
    runs = {"decode": decode}
    for c in chunks:
        runs[f"decode + chunk {c}"] = lambda s, c=c: mix(s, c)
        runs[f"decode, then chunk {c} alone"] = lambda s, c=c: apart(s, c)
    states = {name: fn(fresh_state())[0] for name, fn in runs.items()}  # compiled here
    if args.hlo:
        for c in chunks:
            lowered = mixed.generate.lower(
                config, params, fresh_state(), chunk_slot, np.zeros(c, np.int32), np.int32(0),
                length, mode=dev.GREEDY,
            )  # fmt: skip
            print(f"mixed, chunk {c}: f32 ops >= 1 MB:", big_ops(lowered.compile().as_text()))
    best = {}
    for _ in range(args.rounds):
        for name, fn in runs.items():

            def calls(name=name, fn=fn):
                for _ in range(CALLS):
                    states[name], out = fn(states[name])
                return out

            c, w = timed(calls)
            best[name] = min(best.get(name, (c, w)), (c, w))
    for name, (c, w) in best.items():
        print(f"{name:30s} {1e3 * c / CALLS:7.1f} CPU-ms {1e3 * w / CALLS:7.1f} wall-ms per call")
    load = os.getloadavg()[0]
    print(f"load average: {load:.2f}")
    if args.json:
        rows = {
            n: {"cpu_ms": 1e3 * c / CALLS, "wall_ms": 1e3 * w / CALLS} for n, (c, w) in best.items()
        }
        Path(args.json).write_text(
            json.dumps({"preset": args.preset, "load_avg": load, **rows}, indent=1)
        )


if __name__ == "__main__":
    main()

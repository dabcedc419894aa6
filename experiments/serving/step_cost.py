"""The engine's device calls against ``Generator``'s, at the same batch and cache length.

16 prompts of 128 random tokens on random weights of a preset's shape, greedy:

* decode, CPU and wall ms per step: ``generate.decode`` (``Generator``'s while loop) of
  16 steps from a prefilled batch, against ``slots.generate`` of 16 running slots, 1 or
  4 steps per call (16 steps in all), in alternating rounds (best of 3);
* the large copies, transposes and scatters in the optimized HLO of both (``--hlo``);
* prefill, CPU and wall ms: one prompt of 32 / 64 / 128 tokens, 2 and 4 prompts of 128
  batched (the engine's), 16 of 128 (``Generator``'s).

Weights are put on the device first, as the engine does.

  python experiments/serving/step_cost.py pythia-70m --cache=192 --hlo
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.inference import generate as gen
from neox_jax.inference import step
from neox_jax.inference.sampling import SamplingParams
from neox_jax.model import ModelConfig, init_params
from neox_jax.serving import prefill_batch
from neox_jax.serving import slots as dev
from neox_jax.serving.admission import request_controls

N, P, STEPS = 16, 128, 16


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn) -> tuple[float, float]:
    """(CPU s, wall s) of ``fn()`` until its result is ready."""
    c0, t0 = cpu(), time.perf_counter()
    jax.block_until_ready(fn())
    return cpu() - c0, time.perf_counter() - t0


def big_ops(hlo: str, min_bytes: float = 1e6) -> dict:
    """Counts of copies, transposes and scatters of f32 buffers of at least ``min_bytes``."""
    counts: dict = {}
    for m in re.finditer(r"= f32\[([\d,]+)\]\S* (copy|transpose|scatter)\(", hlo):
        if 4 * np.prod([int(d) for d in m.group(1).split(",")]) >= min_bytes:
            counts[m.group(2)] = counts.get(m.group(2), 0) + 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("preset", nargs="?", default="pythia-70m")
    ap.add_argument("--cache", type=int, default=192, help="cache columns per row")
    ap.add_argument("--hlo", action="store_true", help="count big copies in the HLO")
    args = ap.parse_args()
    config = ModelConfig.from_preset(args.preset)
    params = jax.device_put(step.split_params(init_params(config, jax.random.key(0)), config))
    prompts = np.random.default_rng(0).integers(2, 1000, (N, P)).astype(np.int32)
    sp = [SamplingParams(max_new_tokens=args.cache - P, ignore_eos=True)] * N
    controls, mode = gen.make_controls(sp)

    def gen_state():
        keys = gen.row_keys([0] * N)
        return gen.prefill(config, params, prompts, np.ones_like(prompts), keys,
                           cache_len=args.cache)  # fmt: skip

    def eng_state():
        state = dev.init_state(config, N, args.cache, 8, steps=4)
        pre = prefill_batch.prefill_many(config, params, prompts, np.full(N, P, np.int32))
        c = [request_controls(p, (), 8) for p in sp]
        knobs = {k: np.stack([x[0][k] for x in c]) for k in c[0][0]}
        rows = [np.stack([x[i] for x in c]) for i in (1, 2, 3)]
        keys = jax.random.split(jax.random.key(0), N)
        return prefill_batch.insert_many(pre, state, np.arange(N, dtype=np.int32), knobs,
                                         *rows, keys)  # fmt: skip

    def run_gen():
        s = gen.decode(config, params, gen_state(), controls, jnp.int32(2), mode=mode)
        jax.block_until_ready(s)
        return timed(lambda: gen.decode(config, params, s, controls, jnp.int32(2 + STEPS),
                                        mode=mode))  # fmt: skip

    def run_eng(per_call):
        s, _ = dev.generate(config, params, eng_state(), mode=dev.GREEDY, steps=per_call)
        jax.block_until_ready(s)

        def calls():
            nonlocal s
            for _ in range(STEPS // per_call):
                s, out = dev.generate(config, params, s, mode=dev.GREEDY, steps=per_call)
            return out

        return timed(calls)

    if args.hlo:
        lowered = {
            "generator decode": gen.decode.lower(
                config, params, gen_state(), controls, jnp.int32(STEPS), mode=mode
            ),
            "engine generate (4 steps)": dev.generate.lower(
                config, params, eng_state(), mode=dev.GREEDY, steps=4
            ),
        }
        for name, lo in lowered.items():
            print(
                f"{name}: f32 ops of >= 1 MB in the optimized HLO:",
                big_ops(lo.compile().as_text()),
            )
    runs = {"generator decode": run_gen, "engine, 1 step/call": lambda: run_eng(1),
            "engine, 4 steps/call": lambda: run_eng(4)}  # fmt: skip
    best = {}
    for _ in range(3):
        for name, fn in runs.items():
            c, w = fn()
            best[name] = min(best.get(name, (c, w)), (c, w))
    for name, (c, w) in best.items():
        print(f"{name:22s} {1e3 * c / STEPS:6.1f} CPU-ms / step  {1e3 * w / STEPS:6.1f} wall-ms"
              f" / step (16 rows, {args.cache} columns)")  # fmt: skip
    shapes = [(1, 32), (1, 64), (1, 128), (2, 128), (4, 128)]
    for rows, n in shapes:
        tokens = prompts[:rows, :n]
        if rows == 1:
            fn = lambda t=tokens[0], n=n: prefill_batch.prefill(config, params, t, np.int32(n))  # noqa: E731
        else:
            fn = lambda t=tokens, r=rows: prefill_batch.prefill_many(  # noqa: E731
                config, params, t, np.full(r, P, np.int32)
            )
        fn()
        c, w = min(timed(fn) for _ in range(3))
        print(f"engine prefill {rows} x {n}: {1e3 * c:6.0f} CPU-ms {1e3 * w:6.0f} wall-ms")
    gen_state()
    c, w = min(timed(gen_state) for _ in range(3))
    print(f"generator prefill {N} x {P}: {1e3 * c:6.0f} CPU-ms {1e3 * w:6.0f} wall-ms")
    print(f"load average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""Decode cost per token: the serving engine's step against ``Generator``'s decode loop.

The same 16 prompts of 32 random tokens and 48 new tokens each (greedy, ignore_eos) on
random weights of a preset's shape, cache ``--max-len`` columns per row on both sides:

* ``generator``: ``Generator.generate`` of the 16 at once (prefill + one while_loop);
  best of two timed runs after a warm-up;
* ``engine step``: ``slots.generate`` (decode steps for 16 running slots), 20 steps, one
  or four per device call (``steps_per_call``);
* ``engine loop``: the same 16 requests through ``Engine.step`` to the end (prefill one
  by one, host-side delivery of every token), twice.

Reported as output tokens per CPU-second of this process (the figure that depends least
on other load on a shared machine) and wall time.

  python experiments/serving/decode_step.py pythia-70m --max-len=128
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import numpy as np

from neox_jax.inference import Generator, SamplingParams
from neox_jax.model import ModelConfig, init_params
from neox_jax.serving import Engine, Request
from neox_jax.serving import slots as dev

SLOTS, PROMPT, NEW = 16, 32, 48


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("preset", nargs="?", default="pythia-70m")
    ap.add_argument("--max-len", type=int, default=128)
    args = ap.parse_args()
    config = ModelConfig.from_preset(args.preset)
    params = init_params(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(2, 1000, PROMPT)] for _ in range(SLOTS)]
    sp = SamplingParams(max_new_tokens=NEW, ignore_eos=True)

    gen = Generator(config, params, None, max_cache_len=args.max_len)
    gen.generate(prompts, sp)
    runs = []
    for _ in range(2):
        c0, t0 = cpu(), time.perf_counter()
        gen.generate(prompts, sp)
        runs.append((cpu() - c0, time.perf_counter() - t0))
    c, t = min(runs)
    print(f"generator:   {SLOTS * NEW / c:6.1f} tok/CPU-s  (cpu {c:.2f}s, wall {t:.2f}s)")
    del gen

    eng = Engine(config, params, None, num_slots=SLOTS, max_len=args.max_len,
                 prefill_buckets=(PROMPT,), steps_per_call=4)  # fmt: skip
    eng.warmup(progress=lambda line: None)
    for p in prompts:
        eng.submit(Request(p, sp, lambda e: None))
    while eng.queue_length:
        eng.step()
    state, steps = eng.state, 20
    for per_call in (1, 4):  # decode steps per device call
        calls = steps // per_call
        for i in range(calls + 1):
            if i == 1:
                c0, t0 = cpu(), time.perf_counter()
            state, out = dev.generate(config, eng.params, state, mode=dev.GREEDY, steps=per_call)
            jax.block_until_ready(out)
        c, t = cpu() - c0, time.perf_counter() - t0
        rate, cpu_ms, wall_ms = SLOTS * steps / c, c / steps * 1e3, t / steps * 1e3
        print(f"engine step ({per_call}/call): {rate:6.1f} tok/CPU-s  "
              f"(cpu {cpu_ms:.1f} ms/step, wall {wall_ms:.1f} ms/step)")  # fmt: skip
    eng.state = state
    for p_slot in range(SLOTS):  # end the timed-step requests
        eng.slots[p_slot].cancel()
    eng.step()
    for _ in range(2):
        reqs = [Request(p, sp, lambda e: None) for p in prompts]
        c0, t0 = cpu(), time.perf_counter()
        for r in reqs:
            eng.submit(r)
        while eng.queue_length or eng.free_slots < eng.num_slots:
            eng.step()
        c, t = cpu() - c0, time.perf_counter() - t0
        n = sum(len(r.output_ids) for r in reqs)
        print(f"engine loop: {n / c:6.1f} tok/CPU-s  ({n} tokens, cpu {c:.2f}s, wall {t:.2f}s)")


if __name__ == "__main__":
    main()

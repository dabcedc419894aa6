"""Prefill mixed into decode calls, in-process: the engine with and without it against
static batches, on the quarter-length workload at saturation (every request waiting
from the start).

Random weights of a preset's shape; ``--requests`` greedy requests (prompts of 32-128
random tokens, exactly 16-64 new tokens, ``ignore_eos``), the seeded workload of
``loadgen.py``, all submitted at once, run to the end, in turns (``--rounds``):

* ``engine``: ``Engine`` as served before mixing (16 slots of 192 tokens, prompt
  buckets 32/64/128 prefilled in calls of their own, up to 4 per call);
* ``engine+mixed-C``: the same with ``prefill_chunk=C`` (``--chunks``): while requests
  decode, every prompt goes in chunks of ``C`` tokens inside the decode calls;
* ``static``: ``Generator.generate`` on batches of 16 in arrival order (every prompt
  bucket and batch size compiled first; cache as long as the workload needs).

Reported per run: output tokens per second (wall) and per CPU-second of this process,
the load average beside it, and whether every engine's tokens equal the first
engine's. JSON lines to ``--json``.

  python experiments/serving/mixed_ab.py pythia-70m --requests=48 --rounds=2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import jax
import numpy as np

from neox_jax.inference import Generator, SamplingParams
from neox_jax.model import PRESETS, ModelConfig, init_params
from neox_jax.serving import Engine


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def workload(n: int, seed: int, vocab: int):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(2, vocab, int(k)).tolist() for k in rng.integers(32, 129, n)]
    samplings = [
        SamplingParams(max_new_tokens=int(m), ignore_eos=True) for m in rng.integers(16, 65, n)
    ]
    return prompts, samplings


def static(generator: Generator, prompts, samplings, batch: int = 16) -> list[list[int]]:
    out = []
    for i in range(0, len(prompts), batch):
        results = generator.generate(prompts[i : i + batch], samplings[i : i + batch])
        out += [r.token_ids for r in results]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("preset", nargs="?", default="pythia-70m")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--chunks", default="64", help="mixed prefill chunk sizes, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    config = ModelConfig(**PRESETS[args.preset])
    params = init_params(config, jax.random.key(0))
    prompts, samplings = workload(args.requests, args.seed, config.vocab_size)
    common = dict(num_slots=16, max_len=192, max_queue=args.requests)
    runners = {"engine": Engine(config, params, prefill_buckets=(32, 64, 128), **common)}
    for c in (int(c) for c in args.chunks.split(",")):
        engine = Engine(config, params, prefill_buckets=(32, 64, 128), prefill_chunk=c, **common)
        runners[f"engine+mixed-{c}"] = engine
    start = time.perf_counter()
    for engine in runners.values():
        engine.warmup(progress=lambda _: None)
    generator = Generator(config, params, max_cache_len=128 + 64, max_batch_size=16)
    for b in (1, 2, 4, 8, 16):  # the static baseline's shapes, compiled untimed
        for n in (32, 64, 128):
            generator.generate([[1] * n] * b, SamplingParams(max_new_tokens=2, ignore_eos=True))
    print(f"compiled in {time.perf_counter() - start:.0f}s")
    tokens = sum(s.max_new_tokens for s in samplings)
    reference, rows = None, []
    for round_ in range(args.rounds):
        for name, engine in [*runners.items(), ("static", None)]:
            c0, t0 = cpu(), time.perf_counter()
            if engine is None:
                ids = static(generator, prompts, samplings)
            else:
                ids = [r[0] for r in engine.generate(prompts, samplings)]
            wall, used = time.perf_counter() - t0, cpu() - c0
            reference = ids if reference is None else reference
            row = {
                "mode": name, "round": round_, "requests": args.requests, "tokens": tokens,
                "tok_per_s": tokens / wall, "tok_per_cpu_s": tokens / used,
                "same_tokens_as_engine": ids == reference, "load_avg": os.getloadavg()[0],
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print("\n| mode | best tok/s | best tok per CPU-s | vs static (wall / CPU) |")
    print("| --- | ---: | ---: | --- |")
    best = {
        m: (max(r["tok_per_s"] for r in rows if r["mode"] == m),
            max(r["tok_per_cpu_s"] for r in rows if r["mode"] == m))
        for m in dict.fromkeys(r["mode"] for r in rows)
    }  # fmt: skip
    s_wall, s_cpu = best["static"]
    for m, (w, c) in best.items():
        print(f"| {m} | {w:.1f} | {c:.1f} | {w / s_wall:.2f}x / {c / s_cpu:.2f}x |")


if __name__ == "__main__":
    main()

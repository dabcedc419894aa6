"""Prefill mixed into decode calls, in-process: the engine with and without it against
static batches, at saturation (every request waiting from the start).

Random weights of a preset's shape; ``--requests`` greedy requests (prompts of
``--prompt-len`` random tokens, exactly ``--output-len`` new tokens, ``ignore_eos``;
default the quarter-length workload 32-128 / 16-64), all submitted at once, run to
the end, in turns (``--rounds``):

* ``engine``: 16 slots of the longest prompt's bucket + the longest output, every
  prompt bucketed (powers of two from 32) and prefilled in calls of their own, up to 4
  per call;
* ``engine+chunked-C`` (``--chunks``): prompts longer than ``C`` prefilled in chunks of
  ``C`` tokens, one call per chunk between decode steps (``mix_prefill=False``);
* ``engine+mixed-C``: the same chunks inside the decode calls' products;
* ``static``: ``Generator.generate`` on batches of 16 in arrival order (every prompt
  bucket and batch size compiled first; cache as long as the workload needs).

Reported per run: output tokens per second (wall) and per CPU-second of this process,
the load average beside it, and whether every engine's tokens equal the first
engine's. JSON lines to ``--json``.

  python experiments/serving/mixed_ab.py pythia-70m --requests=48 --rounds=2
  python experiments/serving/mixed_ab.py pythia-70m --prompt-len=32,512 --output-len=16,256 \
      --chunks=128 --rounds=1                     # the issue's length mix
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import jax
import numpy as np

from neox_jax.inference import Generator, SamplingParams, bucket_length
from neox_jax.model import PRESETS, ModelConfig, init_params
from neox_jax.serving import Engine


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def workload(n: int, seed: int, vocab: int, prompt_len, output_len):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_len[0], prompt_len[1] + 1, n)
    prompts = [rng.integers(2, vocab, int(k)).tolist() for k in lengths]
    news = rng.integers(output_len[0], output_len[1] + 1, n)
    samplings = [SamplingParams(max_new_tokens=int(m), ignore_eos=True) for m in news]
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
    pair = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    ap.add_argument("--prompt-len", type=pair, default=(32, 128))
    ap.add_argument("--output-len", type=pair, default=(16, 64))
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    config = ModelConfig(**PRESETS[args.preset])
    params = init_params(config, jax.random.key(0))
    prompts, samplings = workload(
        args.requests, args.seed, config.vocab_size, args.prompt_len, args.output_len
    )
    top = bucket_length(args.prompt_len[1])
    buckets = tuple(b for b in (32, 64, 128, 256, 512, 1024) if b <= top)
    common = dict(num_slots=16, max_len=top + args.output_len[1], max_queue=args.requests)
    runners = {"engine": Engine(config, params, prefill_buckets=buckets, **common)}
    for c in (int(c) for c in args.chunks.split(",")):
        for mix in (False, True):
            engine = Engine(
                config, params, prefill_buckets=buckets, prefill_chunk=c, mix_prefill=mix,
                **common,
            )  # fmt: skip
            runners[f"engine+{'mixed' if mix else 'chunked'}-{c}"] = engine
    start = time.perf_counter()
    for engine in runners.values():
        engine.warmup(progress=lambda _: None)
    generator = Generator(config, params, max_cache_len=common["max_len"], max_batch_size=16)
    for b in (1, 2, 4, 8, 16):  # the static baseline's shapes, compiled untimed
        for n in sorted({bucket_length(k) for k in range(args.prompt_len[0], top + 1)}):
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

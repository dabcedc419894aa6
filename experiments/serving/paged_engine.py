"""Concurrent requests in the same KV memory, measured on the running engine:
``Engine(kv_cache="slots")`` vs ``Engine(kv_cache="paged")``.

Both engines get the same KV-cache memory, ``TOKENS`` token columns per layer: the slot
engine as ``TOKENS / max_len`` contiguous slots, the paged one as ``TOKENS / page_size``
pages shared by up to ``--paged-slots`` slots. The same batch of mixed-length greedy
requests (the issue's workload: prompts 32-512, outputs 16-256 tokens, all submitted at
once) runs to the end on each; per decode step the script records how many requests were
running. Reported: the peak and mean running requests, decode steps (device calls) to
finish the batch, and that every request's tokens agree between the two engines.
A small random model (the counts depend on lengths and memory, not on the weights);
``paged_capacity.py`` does the same accounting without a device, for 20B-size cases.

  python experiments/serving/paged_engine.py --json=experiments/serving/paged_engine.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from neox_jax.inference import SamplingParams
from neox_jax.model import ModelConfig, init_params
from neox_jax.serving import Collector, Engine, Request


def run(engine: Engine, prompts, samplings) -> dict:
    collectors = [Collector() for _ in prompts]
    pending = [Request(p, s, c) for p, s, c in zip(prompts, samplings, collectors, strict=True)]
    running, start = [], time.perf_counter()
    while pending or engine.queue_length or engine.free_slots < engine.num_slots:
        while pending and engine.queue_length < engine.max_queue:
            engine.submit(pending.pop(0))
        engine.step()
        running.append(engine.num_slots - engine.free_slots - len(engine._prefilling))
    outputs = [c.result(timeout=0)[0] for c in collectors]
    return {
        "peak_running": max(running),
        "mean_running": round(float(np.mean(running)), 2),
        "steps": len(running),
        "seconds": round(time.perf_counter() - start, 1),
        "outputs": outputs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--slots", type=int, default=8, help="contiguous slots (sets the memory)")
    ap.add_argument("--paged-slots", type=int, default=48)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=768, help="512 prompt + 256 output")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    config = ModelConfig.from_preset(
        "pythia-70m", hidden_size=64, num_attention_heads=4, intermediate_size=256,
        num_hidden_layers=2, vocab_size=512,
    )  # fmt: skip
    params = init_params(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    n_prompt = rng.integers(32, 513, args.requests)
    n_out = rng.integers(16, 257, args.requests)
    prompts = [[int(t) for t in rng.integers(2, 512, n)] for n in n_prompt]
    samplings = [SamplingParams(max_new_tokens=int(m), ignore_eos=True) for m in n_out]
    tokens = args.slots * args.max_len
    common = dict(max_len=args.max_len, prefill_buckets=(512,), max_queue=args.requests)
    rows = []
    for name, kw in [
        ("slots", dict(num_slots=args.slots)),
        ("paged", dict(num_slots=args.paged_slots, kv_cache="paged",
                       page_size=args.page_size, num_pages=tokens // args.page_size)),
    ]:  # fmt: skip
        engine = Engine(config, params, None, **common, **kw)
        engine.warmup(progress=lambda line: None)
        result = run(engine, prompts, samplings)
        rows.append({"cache": name, "kv_tokens": tokens, **kw, **result})
        print({k: v for k, v in rows[-1].items() if k != "outputs"}, flush=True)
    same = rows[0].pop("outputs") == rows[1].pop("outputs")
    report = {
        "workload": f"{args.requests} greedy requests at once, prompts 32-512, outputs 16-256",
        "model": "random, hidden 64, 2 layers, vocab 512",
        "outputs_identical": same,
        "rows": rows,
    }
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

"""How many requests fit in the same KV-cache memory: contiguous slots vs a paged pool.

Memory accounting, no device needed. A contiguous cache (the engine's today) gives each
of its slots ``max_len`` token columns, so ``memory / (max_len x bytes per token)``
requests run at once whatever their lengths. A paged cache (``neox_jax.serving.paged``,
``kernels.paged_attention``) gives a request ``ceil((prompt + max_tokens) / page_size)``
pages of a shared pool, reserved at admission (so none runs dry mid-generation). For a
workload of varied lengths this script fills the same memory with requests drawn in
arrival order until the next one does not fit, over many draws, and reports how many
run concurrently.

  python experiments/serving/paged_capacity.py            # prints a Markdown table
  python experiments/serving/paged_capacity.py --json=experiments/serving/paged_capacity.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from neox_jax.model import PRESETS, ModelConfig
from neox_jax.model.transformer import count_params
from neox_jax.serving.paged import PagePool, kv_bytes_per_token

GIB = 2**30


# The longest request of each workload: the least max_len a contiguous cache can use.
LONGEST = {"uniform": 512 + 256, "long-tail": 2048}


def lengths(kind: str, rng, n: int) -> np.ndarray:
    """Prompt + max_tokens of ``n`` requests, capped at 2048 (the Pythia context)."""
    if kind == "uniform":  # the benchmark: prompts 32-512, outputs 16-256
        total = rng.integers(32, 513, n) + rng.integers(16, 257, n)
    else:  # chat-like long tail: lognormal prompts (median 200), outputs 16-512
        total = np.exp(rng.normal(np.log(200), 1.0, n)).astype(int) + rng.integers(16, 513, n)
    return np.minimum(total, 2048)


def concurrent(pool_tokens: int, page_size: int, max_len: int, total: np.ndarray) -> int:
    """Requests admitted in order into a fresh pool before the first that does not fit."""
    pool = PagePool(pool_tokens // page_size, page_size, len(total), max_len)
    for slot, t in enumerate(total):
        if not pool.fits(int(t)):
            return slot
        pool.allocate(slot, int(t))
    return len(total)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    max_len = 2048
    cases = []
    # (name, preset, dtype bytes, KV memory in bytes): the CPU benchmark's 16 x 1024-token
    # cache, and what neox-20b in bf16 leaves on an 80 GiB GPU (README, "Serving").
    cfg20 = ModelConfig(**PRESETS["neox-20b"])
    weights20 = count_params(cfg20) * 2  # bf16
    for name, preset, nbytes, memory in (
        ("pythia-70m fp32, 16 x 2048-token slots", "pythia-70m", 4, None),
        ("neox-20b bf16 on 80 GiB", "neox-20b", 2, 80 * GIB - weights20),
    ):
        cfg = cfg20 if preset == "neox-20b" else ModelConfig(**PRESETS[preset])
        per_token = kv_bytes_per_token(cfg.num_hidden_layers, cfg.hidden_size, nbytes)
        memory = memory or 16 * max_len * per_token
        tokens = memory // per_token
        slots = tokens // max_len
        for kind in ("uniform", "long-tail"):
            fits = [
                concurrent(tokens, args.page_size, max_len, lengths(kind, rng, 4 * tokens // 48))
                for _ in range(args.trials)
            ]
            cases.append({
                "case": name, "workload": kind, "kv_bytes_per_token": per_token,
                "kv_memory_gib": memory / GIB, "cache_tokens": int(tokens),
                "contiguous_requests": int(slots),
                "contiguous_requests_tight": int(tokens // LONGEST[kind]),
                "page_size": args.page_size,
                "paged_requests_mean": float(np.mean(fits)),
                "paged_requests_min": int(np.min(fits)),
                "ratio": float(np.mean(fits)) / slots,
                "ratio_tight": float(np.mean(fits)) / (tokens // LONGEST[kind]),
            })  # fmt: skip
    print(
        "| case | workload | KV memory | contiguous, 2048-token slots | contiguous, slots "
        "of the longest request | paged, mean (min) | paged / contiguous |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for c in cases:
        print(
            f"| {c['case']} | {c['workload']} | {c['kv_memory_gib']:.2f} GiB | "
            f"{c['contiguous_requests']} | {c['contiguous_requests_tight']} | "
            f"{c['paged_requests_mean']:.1f} ({c['paged_requests_min']}) | "
            f"{c['ratio']:.1f}x / {c['ratio_tight']:.1f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(cases, f, indent=1)


if __name__ == "__main__":
    main()

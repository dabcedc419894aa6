"""Time and memory of the three expert computations (``moe_impl``) on this CPU.

    python experiments/moe/bench.py [--out experiments/moe/results_cpu.json]

A small Qwen3-MoE-shaped model (8 experts, top-2) runs a jitted forward and a jitted
forward + backward (the training step's gradient) on one batch, for each of
``ragged`` (dropless, ``jax.lax.ragged_dot``), ``capacity`` (factor 1.25 and 2.0) and
``dense`` (every expert on every token). Time is the median of ``--repeats`` runs
after one warm-up; memory is XLA's own accounting of the compiled program
(``memory_analysis()``: the temporary buffers it allocates beyond arguments and
outputs, i.e. the activation and dispatch memory the implementation costs).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax

from neox_jax.model import GPTNeoX, ModelConfig, count_params, init_params
from neox_jax.training.step import token_losses

IMPLS = (("ragged", 1.25), ("capacity", 1.25), ("capacity", 2.0), ("dense", 1.25))


def model_config(args) -> ModelConfig:
    return ModelConfig(
        model_type="qwen3_moe", vocab_size=4096, hidden_size=args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
        intermediate_size=4 * args.hidden, norm_type="rmsnorm", gated_mlp=True,
        mlp_bias=False, fused_qkv=False, use_parallel_residual=False, attention_bias=False,
        hidden_act="silu", rotary_pct=1.0, qk_norm=True, num_experts=args.experts,
        num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_width,
        norm_topk_prob=True,
    )  # fmt: skip


def measure(fn, args_, repeats: int) -> dict:
    compiled = jax.jit(fn).lower(*args_).compile()
    memory = compiled.memory_analysis()
    jax.block_until_ready(compiled(*args_))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args_))
        times.append(time.perf_counter() - start)
    return {
        "ms": 1e3 * statistics.median(times),
        "temp_mib": memory.temp_size_in_bytes / 2**20 if memory else None,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--expert_width", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="")
    args = p.parse_args()
    base = model_config(args)
    params = init_params(base, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, base.vocab_size)
    rows = []
    for impl, factor in IMPLS:
        config = base.replace(moe_impl=impl, capacity_factor=factor)
        model = GPTNeoX(config)

        def forward(params, ids, model=model):
            return model.apply({"params": params}, ids[:, :-1])

        def loss(params, ids, model=model):
            logits = model.apply({"params": params}, ids[:, :-1])
            return token_losses(logits, ids[:, 1:]).mean()

        fwd = measure(forward, (params, ids), args.repeats)
        grad = measure(jax.grad(loss), (params, ids), args.repeats)
        row = {"impl": impl, "capacity_factor": factor if impl == "capacity" else None,
               "forward_ms": fwd["ms"], "forward_temp_mib": fwd["temp_mib"],
               "train_ms": grad["ms"], "train_temp_mib": grad["temp_mib"]}  # fmt: skip
        rows.append(row)
        print(json.dumps(row))
    result = {
        "model": {
            k: getattr(base, k)
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_experts",
                "num_experts_per_tok",
                "moe_intermediate_size",
            )
        },  # fmt: skip
        "params": count_params(base),
        "active_params": count_params(base, active=True),
        "tokens_per_batch": args.batch * args.seq,
        "backend": jax.default_backend(),
        "cpu": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()

"""A/B of decode-loop variants in alternating rounds: wall and CPU time per step, load.

For changes to the decode step that the benchmark cannot switch at run time: each
variant is a context manager that patches the code while its loop is traced (every
variant gets its own jitted copy of ``generate.decode``, so the patches never share a
compiled program), then the variants run A, B, A, B, ... on the same prompts and
weights. Reports the best wall time and the best process CPU time (all threads,
``getrusage``) per step: on a shared machine the CPU time is the work done, the wall
time also the waiting for a core. Also counts the copies in the optimized HLO.

  python experiments/decode_bench/ab_step.py --model=pythia-160m --batch=1

Variants (``VARIANTS``): ``base`` = the step before 2026-12-01 (attention over the
written cache, per-layer weights); ``attn`` = with ``grouped.step_attention``; ``fused``
= that and ``inference.fused``'s two products per layer; the batch-16 candidates of
``variants16.py`` (``unblocked``: fused weights as one block each). ``name+option``
compiles the variant's loop with the XLA options ``OPTIONS[option]`` (``fused+conc``).
``--profile`` prints the per-op table and ``thread_use.py``'s view by thread.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import resource
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/op_profile.py
import op_profile  # noqa: E402
import thread_use  # noqa: E402
import variants16  # noqa: E402

if "--profile" in sys.argv:  # XLA:CPU's per-op trace events; read when JAX starts
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {op_profile.XPROF_FLAG}"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from neox_jax.inference import SamplingParams  # noqa: E402
from neox_jax.inference import generate as gen  # noqa: E402
from neox_jax.inference.step import split_params  # noqa: E402
from neox_jax.model import ModelConfig, init_params, layers  # noqa: E402


def _old_attention(cfg, q, k, v, layer_cache, q_segment_ids, cache_info):
    """``layers.cached_attention`` before 2026-12-01: write, then attend over the
    written cache (the rolling-window case never reaches the decode loops timed here)."""
    index = cache_info["index"]
    write = lambda c, t: jax.lax.dynamic_update_slice(  # noqa: E731
        c, t.swapaxes(1, 2).astype(c.dtype), (0, 0, index, 0)
    )
    k_all, v_all = write(layer_cache["k"], k), write(layer_cache["v"], v)
    out = layers.attend(
        cfg, q, k_all.astype(q.dtype), v_all.astype(q.dtype), q_segment_ids,
        cache_info["segment_ids"], q_offset=index, cached=True, length=index + q.shape[1],
    )  # fmt: skip
    return out, {"k": k_all, "v": v_all}


def _old_patch():
    return mock.patch.object(layers, "cached_attention", _old_attention)


# name: (patch while tracing, params from (config, params))
VARIANTS = {
    "base": (_old_patch, lambda c, p: split_params(p)),  # the step before this session
    "attn": (contextlib.nullcontext, lambda c, p: split_params(p)),  # + step_attention
    "fused": (contextlib.nullcontext, lambda c, p: split_params(p, c)),  # + fused layers
    **variants16.VARIANTS,  # batch-16 candidates
}

# ``variant+option``: the variant's loop compiled with these XLA options (jit's
# ``compiler_options``, for this program only), e.g. ``fused+eigen``.
OPTIONS = {
    "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},  # XLA's own dots, not YNNPACK
    "conc": {"xla_cpu_enable_concurrency_optimized_scheduler": True},
    "xnn": {"xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    "ynndot": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    # oneDNN's matmuls (bound.py found them fastest for 3 of the 5 batch-16 products).
    "onednn": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_use_onednn": True},
}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Loop:
    """One variant's compiled decode loop on a fixed batch."""

    def __init__(self, name, config, params, batch, prompt_len, new_tokens):
        base, *opts = name.split("+")
        patch, make_params = VARIANTS[base]
        options = {k: v for o in opts for k, v in OPTIONS[o].items()}
        self.name, self.config, self.params = name, config, make_params(config, params)
        self.new_tokens = new_tokens
        sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        rng = np.random.default_rng(batch)
        prompts = rng.integers(2, config.vocab_size - 1, (batch, prompt_len)).tolist()
        plen, self.cache_len = gen.plan_cache(config, prompt_len, new_tokens)
        self.ids, self.mask = gen.left_pad(prompts, plen)
        self.keys = gen.row_keys([0] * batch)
        self.controls, mode = gen.make_controls([sampling] * batch)
        raw = gen.decode.__wrapped__  # a fresh jit per variant: no shared trace cache
        decode = jax.jit(
            functools.partial(raw, config, mode=mode),
            donate_argnames=("state",),
            compiler_options=options or None,
        )
        with patch():
            state = self._prefill()
            self.compiled = decode.lower(self.params, state, self.controls, new_tokens).compile()
        self.tokens = np.asarray(self.run()[2])

    def _prefill(self):
        state = gen.prefill(
            self.config, self.params, self.ids, self.mask, self.keys, cache_len=self.cache_len
        )
        return jax.block_until_ready(state)

    def run(self) -> tuple[float, float, np.ndarray]:
        state = self._prefill()
        wall, cpu = time.perf_counter(), cpu_seconds()
        state = self.compiled(self.params, state, self.controls, self.new_tokens)
        jax.block_until_ready(state.tokens)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        return wall / self.new_tokens, cpu / self.new_tokens, state.tokens

    def profile(self, steps: int = 2) -> dict:
        """``op_profile.xla_op_table`` of this loop, per step."""
        states = [self._prefill() for _ in range(steps)]

        def run():
            out = self.compiled(self.params, states.pop(), self.controls, self.new_tokens)
            jax.block_until_ready(out)

        table = op_profile.xla_op_table(self.compiled, run, steps, per=self.new_tokens)
        states = [self._prefill()]
        names = set(op_profile.op_costs(self.compiled.as_text()))
        table["thread_use"] = thread_use.thread_use(run, names, 1, per=self.new_tokens)
        return table

    def copies(self) -> dict[str, int]:
        """Copy instructions of the optimized program (the loop body's run every step)."""
        text = self.compiled.as_text()
        return {
            "copy": len(re.findall(r"= \S+ copy\(", text)),
            "copy_fusions": len(re.findall(r"%\S*copy\S*fusion\S* = ", text)),
            "transpose": len(re.findall(r"= \S+ transpose\(", text)),
        }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="pythia-160m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--variants", default="base,attn,fused")
    parser.add_argument("--profile", action="store_true", help="per-op table of each variant")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    config = ModelConfig.from_preset(args.model)
    params = init_params(config, jax.random.key(0))
    names = args.variants.split(",")
    loops = [Loop(n, config, params, args.batch, args.prompt_len, args.new_tokens) for n in names]
    times = {n: {"wall": [], "cpu": [], "load": []} for n in names}
    for _ in range(args.rounds):
        for loop in loops:
            wall, cpu, _ = loop.run()
            times[loop.name]["wall"].append(wall)
            times[loop.name]["cpu"].append(cpu)
            times[loop.name]["load"].append(os.getloadavg()[0])
    report = {"args": vars(args), "variants": {}}
    for loop in loops:
        t = times[loop.name]
        report["variants"][loop.name] = {
            "wall_ms_per_step": 1e3 * min(t["wall"]),
            "cpu_ms_per_step": 1e3 * min(t["cpu"]),
            "tok_s": args.batch / min(t["wall"]),
            "load_1min": t["load"],
            "same_tokens_as_first": bool((loop.tokens == loops[0].tokens).all()),
            "hlo": loop.copies(),
        }
    if args.profile:
        for loop in loops:
            table = loop.profile()
            report["variants"][loop.name]["op_profile"] = table
            print(f"\n{loop.name}, per step:\n\n{op_profile.xla_markdown(table, top=25)}")
            print(thread_use.markdown(table["thread_use"]))
    brief = {
        n: {k: x for k, x in v.items() if k != "op_profile"} for n, v in report["variants"].items()
    }
    print(json.dumps(brief, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

"""Greedy decode throughput: neox_jax vs transformers' generate, against the bandwidth roofline.

CPU (the default): pythia-70m and pythia-160m shapes with random weights (identical
on both sides: ours are saved as a Hugging Face folder that torch loads), batch 1 and
16, a 128-token prompt and 128 new tokens, fp32, both frameworks on the same cores.

  python experiments/decode_bench/bench.py --out=experiments/decode_bench/results_cpu.json

GPU (not run on CPU machines): pythia-1.4b in bf16, batch 1 and 16, against the
GPU's measured memory bandwidth.

  python experiments/decode_bench/bench.py --gpu --out=results_gpu.json

What is timed: the best of ``--rounds`` rounds after a compile/warm-up run. A round
runs every measurement of ours and of transformers (at 1 and at all threads) back to
back, and measures the host bandwidth, so both sides see the same load on a shared
machine; the best, not the median, because contention only ever adds time.
  ours prefill:  ``generate.prefill`` of the prompt, until ready.
  ours decode:   ``generate.decode`` of all new tokens (one while_loop), until ready.
  ours e2e:      ``Generator.generate`` on token ids (prefill + decode + host work).
  HF prefill:    ``model(ids, logits_to_keep=1)``, as generate's first step.
  HF e2e:        ``model.generate(do_sample=False, min_new_tokens=max_new_tokens)``;
                 HF decode = e2e - prefill.
Roofline (batch 1): a decode step must read every weight except the input embedding
(a row gather) plus the K/V cache it attends over, so tokens/s <= bandwidth / bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/op_profile.py
import op_profile  # noqa: E402

if "--profile" in sys.argv:  # XLA:CPU's per-op trace events; read when JAX starts
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {op_profile.XPROF_FLAG}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from roofline import (  # noqa: E402
    best_time,
    decode_bytes,
    decode_flops,
    device_bandwidth,
    host_bandwidth,
    matmul_peak,
)

from neox_jax.inference import Generator, SamplingParams, fused, step  # noqa: E402
from neox_jax.inference import generate as gen  # noqa: E402
from neox_jax.inference.fused import FUSED_LAYERS  # noqa: E402
from neox_jax.inference.step import VOCAB_MAJOR_HEAD, split_params  # noqa: E402
from neox_jax.model import ModelConfig, init_params  # noqa: E402


# ------------------------------------------------------------------- ours
class Ours:
    """neox_jax on one batch of prompts: compiled and warmed up on construction."""

    def __init__(self, config, params, prompts: np.ndarray, new_tokens: int, split: bool = True):
        self.batch, self.plen = prompts.shape
        self.new_tokens = new_tokens
        self.sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        self.generator = Generator(config, params, max_batch_size=self.batch, split_layers=split)
        self.rows = [list(map(int, p)) for p in prompts]
        self.tokens = [r.token_ids for r in self.generator.generate(self.rows, self.sampling)]
        # The Generator's own weights for this batch size (with the config: fused layers
        # on CPU, laid out for this batch size, step.BatchLayouts).
        self.config = config
        self.params = self.generator._layouts(self.batch)
        # The same weights as per-layer model trees, not fused (``--ab_fused``).
        self.unfused = split_params(params) if split else params
        # The fused weights in another layout (``--ab_layout``): blocks of K_BLOCK input
        # columns at batch 1; at more rows one block per weight, or, for input-major
        # weights (fused.INPUT_MAJOR_ROWS rows on), the blocked output-major layout.
        self.other_layout = None
        if FUSED_LAYERS in self.params and step.uses_xla_dots(self.params):
            self.other_layout = split_params(params, config, batch=self.batch)
        elif FUSED_LAYERS in self.params:
            other = fused.K_BLOCK if fused.block_columns(self.batch) == 0 else 0
            layers = fused.reblock(self.params[FUSED_LAYERS], other)
            self.other_layout = {**self.params, FUSED_LAYERS: layers}
        # The same split params with the output head only as stored ([E, V]): the
        # before/after of split_params' vocabulary-major head copy (``--ab_head``).
        self.ev_head = {k: v for k, v in self.params.items() if k != VOCAB_MAJOR_HEAD}
        p, self.cache_len = gen.plan_cache(config, self.plen, new_tokens)
        self.ids, self.mask = gen.left_pad(self.rows, p)
        self.keys = gen.row_keys([0] * self.batch)
        self.controls, self.mode = gen.make_controls([self.sampling] * self.batch)
        self.decode_s()  # compiles prefill and decode (shared with the generator's)

    def _prefill(self):
        return jax.block_until_ready(
            gen.prefill(
                self.config, self.params, self.ids, self.mask, self.keys, cache_len=self.cache_len
            )
        )

    def prefill_s(self) -> float:
        return best_time(self._prefill, 1)

    def decode_s(self, params=None) -> float:
        params = self.params if params is None else params
        state = self._prefill()
        start = time.perf_counter()
        state = gen.decode_program(params)(
            self.config, params, state, self.controls, self.new_tokens, mode=self.mode
        )
        jax.block_until_ready(state.tokens)
        return time.perf_counter() - start

    def e2e_s(self) -> float:
        return best_time(lambda: self.generator.generate(self.rows, self.sampling), 1)

    def op_profile(self, steps: int = 2) -> dict:
        """The per-op table of the decode loop (``op_profile.xla_op_table``), per token.
        The prefills run before the trace, so only the loop's ops are in it."""
        decode = gen.decode_program(self.params).lower(
            self.config, self.params, self._prefill(), self.controls, self.new_tokens,
            mode=self.mode,
        ).compile()  # fmt: skip
        states = [self._prefill() for _ in range(steps)]

        def run():  # the compiled call takes the non-static arguments only
            out = decode(self.params, states.pop(), self.controls, self.new_tokens)
            jax.block_until_ready(out)

        return op_profile.xla_op_table(decode, run, steps, per=self.new_tokens)


def cache_sweep(config, params, batch: int, lengths=(256, 1024), steps=32, repeats=5) -> dict:
    """Decode-step time against cache slots: the slope is what each cached slot costs."""
    params = split_params(params)
    sampling = SamplingParams(max_new_tokens=steps, ignore_eos=True)
    controls, mode = gen.make_controls([sampling] * batch)
    ids, mask = gen.left_pad([[7] * 16] * batch, 16)
    keys = gen.row_keys([0] * batch)
    out = {}
    for cache_len in lengths:
        times = []
        for _ in range(repeats + 1):  # the first run compiles
            state = gen.prefill(config, params, ids, mask, keys, cache_len=cache_len)
            state = jax.block_until_ready(state)
            start = time.perf_counter()
            state = gen.decode(config, params, state, controls, steps, mode=mode)
            jax.block_until_ready(state.tokens)
            times.append(time.perf_counter() - start)
        out[cache_len] = min(times[1:]) / steps
    (s0, t0), (s1, t1) = list(out.items())[0], list(out.items())[-1]
    itemsize = jnp.dtype(config.compute_dtype).itemsize
    slot_bytes = 2 * config.num_hidden_layers * batch * config.hidden_size * itemsize
    return {
        "step_s_by_cache_len": out,
        "s_per_slot": (t1 - t0) / (s1 - s0),
        "kv_bytes_per_slot": slot_bytes,
    }


# ------------------------------------------------------------------ transformers
class HF:
    """transformers' GPTNeoXForCausalLM on the same prompts and weights, in a worker
    process: torch's OpenMP threads and XLA's thread pool spin-wait, and sharing one
    process made torch at 2 threads ~7x slower than at 1. Both processes stay alive;
    the idle one blocks on a pipe while the other is timed."""

    def __init__(self, hf_dir: Path, prompts: np.ndarray, new_tokens: int, threads):
        np.save(hf_dir / "prompts.npy", prompts)
        cmd = [
            sys.executable,
            __file__,
            "--hf_worker",
            str(hf_dir),
            "--new_tokens",
            str(new_tokens),
        ]
        cmd += ["--threads", ",".join(map(str, threads))]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.tokens = self._read()["tokens"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the transformers worker died; run it alone to see why")
        return json.loads(line)

    def _ask(self, what: str, threads: int) -> float:
        self.proc.stdin.write(f"{what} {threads}\n")
        self.proc.stdin.flush()
        return self._read()["s"]

    def e2e_s(self, threads: int) -> float:
        return self._ask("e2e", threads)

    def prefill_s(self, threads: int) -> float:
        return self._ask("prefill", threads)

    def op_profile(self, threads: int) -> dict:
        self.proc.stdin.write(f"profile {threads}\n")
        self.proc.stdin.flush()
        return self._read()["profile"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def hf_worker(hf_dir: Path, new_tokens: int, threads) -> None:
    """The worker side of ``HF``: warm up, then time what stdin asks for."""
    import torch
    import transformers

    model = transformers.GPTNeoXForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompts = np.load(hf_dir / "prompts.npy")
    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)
    run = {
        "e2e": lambda: model.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, pad_token_id=0,
        ),
        "prefill": lambda: model(ids, attention_mask=mask, logits_to_keep=1),
    }  # fmt: skip
    with torch.inference_mode():
        for n in threads:  # warm up every thread count
            torch.set_num_threads(n)
            out = run["e2e"]()
        print(json.dumps({"tokens": out[:, prompts.shape[1] :].tolist()}), flush=True)
        for line in sys.stdin:
            what, n = line.split()
            torch.set_num_threads(int(n))
            if what == "profile":  # per-op table of generate, per new token
                table = op_profile.torch_op_table(run["e2e"], steps=1, per=new_tokens)
                print(json.dumps({"profile": table}), flush=True)
                continue
            print(json.dumps({"s": best_time(run[what])}), flush=True)


def interleaved(ours: Ours, hf: HF, rounds: int, threads, ab_head=False, ab_fused=False,
                ab_layout=False):  # fmt: skip
    """Best time of each measurement over ``rounds`` rounds that alternate ours and HF
    (and torch thread counts), so both see the same load on a shared machine; the
    host bandwidth is measured in every round too (its best is used)."""
    times: dict[str, list[float]] = {}
    add = lambda key, value: times.setdefault(key, []).append(value)  # noqa: E731
    for _ in range(rounds):
        add("ours_prefill", ours.prefill_s())
        add("ours_decode", ours.decode_s())
        if ab_head:  # the head as stored, [E, V], in the same rounds (compiled once first)
            add("ours_decode_ev_head", ours.decode_s(ours.ev_head))
        if ab_fused:  # the layers unfused (inference.fused), in the same rounds
            add("ours_decode_unfused", ours.decode_s(ours.unfused))
        if ab_layout:  # the other batch size's weight layout, in the same rounds
            add("ours_decode_other_layout", ours.decode_s(ours.other_layout))
        add("ours_e2e", ours.e2e_s())
        for n in threads:
            add(f"hf_prefill_{n}", hf.prefill_s(n))
            add(f"hf_e2e_{n}", hf.e2e_s(n))
        add("bandwidth", -max(host_bandwidth(mib=512, repeats=3).values()))
        if ours.batch > 1:  # the compute roofline's matmul rate, in the same rounds
            add("matmul_peak", -matmul_peak(ours.config, ours.batch)["peak_gflops"])
    return {k: min(v) for k, v in times.items()}


# ------------------------------------------------------------------------ main
def run_cpu(args) -> dict:
    from neox_jax.convert import save_hf

    report = {"bandwidth": host_bandwidth(), "rows": []}
    threads = sorted({int(args.threads), 1}, reverse=True)
    for name in args.models.split(","):
        config = ModelConfig.from_preset(name)
        params = init_params(config, jax.random.key(0))
        with tempfile.TemporaryDirectory() as tmp:
            save_hf(config, params, Path(tmp) / "hf")
            for batch in map(int, args.batches.split(",")):
                rng = np.random.default_rng(batch)
                prompts = rng.integers(2, 50000, (batch, args.prompt_len)).astype(np.int32)
                ours = Ours(config, params, prompts, args.new_tokens)
                hf = HF(Path(tmp) / "hf", prompts, args.new_tokens, threads)
                if args.ab_head:
                    ours.decode_s(ours.ev_head)  # compile the [E, V]-head loop
                if args.ab_fused:
                    ours.decode_s(ours.unfused)  # compile the unfused loop
                if args.ab_layout:
                    ours.decode_s(ours.other_layout)  # compile the other layout's loop
                best = interleaved(
                    ours, hf, args.rounds, threads, args.ab_head, args.ab_fused, args.ab_layout
                )
                profiles = None
                if args.profile:
                    profiles = {"ours": ours.op_profile(), "hf": hf.op_profile(max(threads))}
                hf.close()
                row = _row(name, batch, config, params, (ours, hf, prompts), best, threads, args)
                if profiles:
                    row["op_profile"] = profiles
                    print(f"\n{name} batch {batch}, ours per token:\n")
                    print(op_profile.xla_markdown(profiles["ours"]))
                    print(f"{name} batch {batch}, transformers per token:\n")
                    print(op_profile.torch_markdown(profiles["hf"]), flush=True)
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
    return report


def _row(name, batch, config, params, runners, best, threads, args) -> dict:
    ours, hf, prompts = runners
    plen, new = args.prompt_len, args.new_tokens
    hf_threads = min(threads, key=lambda n: best[f"hf_e2e_{n}"])
    hf_e2e, hf_prefill = best[f"hf_e2e_{hf_threads}"], best[f"hf_prefill_{hf_threads}"]
    bandwidth = -best["bandwidth"]
    nbytes = decode_bytes(config, params, batch, ours.cache_len)
    roofline = bandwidth * 1e9 / (nbytes["weights"] + nbytes["kv_cache"]) * batch
    row = {
        "model": name,
        "batch": batch,
        "ours": {
            "prefill_tok_s": batch * plen / best["ours_prefill"],
            "decode_tok_s": batch * new / best["ours_decode"],
            "e2e_tok_s": batch * new / best["ours_e2e"],
            "cache_len": ours.cache_len,
        },
        "hf": {
            "prefill_tok_s": batch * plen / hf_prefill,
            "decode_tok_s": batch * new / (hf_e2e - hf_prefill),
            "e2e_tok_s": batch * new / hf_e2e,
            "threads": hf_threads,
            "e2e_tok_s_by_threads": {n: batch * new / best[f"hf_e2e_{n}"] for n in threads},
        },
        "bandwidth_gbps": bandwidth,
        "bytes": nbytes,
        "roofline_tok_s": roofline,
        "best_times_s": best,
        "same_tokens_as_hf": float(
            np.mean([a == b for a, b in zip(ours.tokens, hf.tokens, strict=True)])
        ),
        "loadavg": os.getloadavg(),
    }
    if args.ab_head:  # before/after of the [V, E] head copy, decode-only
        row["ours"]["decode_tok_s_ev_head"] = batch * new / best["ours_decode_ev_head"]
        row["head_vocab_major_speedup"] = best["ours_decode_ev_head"] / best["ours_decode"]
    if args.ab_fused:  # before/after of the fused layers, decode-only
        row["ours"]["decode_tok_s_unfused"] = batch * new / best["ours_decode_unfused"]
        row["fused_layers_speedup"] = best["ours_decode_unfused"] / best["ours_decode"]
    if args.ab_layout:  # this batch's weight layout against the other one, decode-only
        other = best["ours_decode_other_layout"]
        row["weight_columns"] = fused.block_columns(batch)  # 0: one block per weight
        row["ours"]["decode_tok_s_other_layout"] = batch * new / other
        row["layout_speedup"] = other / best["ours_decode"]
    row["speedup_e2e"] = row["ours"]["e2e_tok_s"] / row["hf"]["e2e_tok_s"]
    row["speedup_decode"] = row["ours"]["decode_tok_s"] / row["hf"]["decode_tok_s"]
    row["roofline_fraction"] = row["ours"]["decode_tok_s"] / roofline
    if batch > 1:  # compute roofline: FLOPs per token at the measured matmul rate
        flops = decode_flops(config, params, ours.cache_len)
        row["flops_per_token"] = flops
        row["matmul_peak_gflops"] = -best["matmul_peak"]
        row["compute_roofline_tok_s"] = -best["matmul_peak"] * 1e9 / flops
        row["compute_roofline_fraction"] = (
            row["ours"]["decode_tok_s"] / row["compute_roofline_tok_s"]
        )
    if args.profile:  # the same loop reading stacked weights, and the cache-length sweep
        stacked = Ours(config, params, prompts, new, split=False)
        row["ours_stacked_decode_tok_s"] = batch * new / min(stacked.decode_s() for _ in range(3))
        sweep = cache_sweep(config, params, batch)
        sweep["kv_passes_per_step"] = (
            sweep["s_per_slot"] * bandwidth * 1e9 / sweep["kv_bytes_per_slot"]
        )
        row["cache_sweep"] = sweep
    return row


def run_gpu(args) -> dict:
    bandwidth = device_bandwidth()
    config = ModelConfig.from_preset(args.gpu_model, dtype="bfloat16", param_dtype="bfloat16")
    config = config.replace(attention_impl=args.attention_impl)
    params = init_params(config, jax.random.key(0))
    report = {"bandwidth_gbps": bandwidth, "rows": []}
    for batch in map(int, args.batches.split(",")):
        prompts = np.random.default_rng(batch).integers(2, 50000, (batch, args.prompt_len))
        ours = Ours(config, params, prompts.astype(np.int32), args.new_tokens, args.split_layers)
        decode = min(ours.decode_s() for _ in range(args.rounds))
        prefill = min(ours.prefill_s() for _ in range(args.rounds))
        nbytes = decode_bytes(config, params, batch, ours.cache_len)
        roofline = bandwidth * 1e9 / (nbytes["weights"] + nbytes["kv_cache"]) * batch
        row = {
            "model": args.gpu_model,
            "batch": batch,
            "decode_tok_s": batch * args.new_tokens / decode,
            "prefill_tok_s": batch * args.prompt_len / prefill,
            "bytes": nbytes,
            "roofline_tok_s": roofline,
        }
        row["roofline_fraction"] = row["decode_tok_s"] / roofline
        if args.profile:
            try:  # a failed profile must not cost the timings above
                row["op_profile"] = ours.op_profile()
                print(op_profile.xla_markdown(row["op_profile"]), flush=True)
            except Exception as e:  # noqa: BLE001 - recorded in the report
                row["op_profile_error"] = f"{type(e).__name__}: {e}"[:500]
        report["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "op_profile"}), flush=True)
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="pythia-1.4b bf16 on the accelerator")
    parser.add_argument("--models", default="pythia-70m,pythia-160m")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--threads", default=str(os.cpu_count()), help="torch threads")
    parser.add_argument("--attention_impl", default="xla", help="GPU mode: xla or pallas")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="per-op tables of both decoders, stacked weights, a cache sweep",
    )
    parser.add_argument(
        "--ab_head",
        action="store_true",
        help="also time the decode loop with the output head as stored ([E, V])",
    )
    parser.add_argument(
        "--ab_fused",
        action="store_true",
        help="also time the decode loop with the layers unfused (inference.fused)",
    )
    parser.add_argument(
        "--ab_layout",
        action="store_true",
        help="also time the decode loop with the fused weights in the other batch size's "
        "layout (fused.block_columns: one block per weight at batch 1, K_BLOCK columns above)",
    )
    parser.add_argument(
        "--split_layers", type=int, default=1, help="GPU mode: 1 = per-layer weight copy"
    )
    parser.add_argument("--gpu_model", default="pythia-1.4b", help="GPU mode: the preset")
    parser.add_argument("--allow_cpu", action="store_true", help="let --gpu run on CPU (smoke)")
    parser.add_argument("--out", default="")
    parser.add_argument("--hf_worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_worker:
        threads = [int(n) for n in str(args.threads).split(",")]
        return hf_worker(Path(args.hf_worker), args.new_tokens, threads)
    if args.gpu and jax.default_backend() == "cpu" and not args.allow_cpu:
        parser.error("--gpu needs an accelerator; jax sees only the CPU.")
    start_load = os.getloadavg()
    report = run_gpu(args) if args.gpu else run_cpu(args)
    if not args.gpu:  # bandwidth again at the end; rows used the first measurement
        report["bandwidth_end"] = host_bandwidth()
    report["machine"] = {
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_start": start_load,
        "loadavg_end": os.getloadavg(),
        "jax": jax.__version__,
        "args": vars(args),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

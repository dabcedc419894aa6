"""Train-step throughput and MFU: neox_jax against transformers + PyTorch, same model.

CPU (default): a pythia-70m-shaped model in fp32 trained by neox_jax's own train step
(``build_train_step``, the trainer's jitted step with its AdamW, clipping and schedule, with
donated state) and, in the same run, by Hugging Face ``GPTNeoXForCausalLM`` with
``torch.optim.AdamW``, same batch and sequence length; plus the machine's measured
fp32 matmul peak (JAX and torch, several sizes), which MFU is relative to.

    python experiments/train_bench/bench.py --out=experiments/train_bench/results.json
    python experiments/train_bench/bench.py --profile    # + per-op tables, XLA and torch
    python experiments/train_bench/bench.py --gpu --out=gpu.json   # pythia-1b, bf16

Each engine (and each JAX variant: XLA flags, remat, dtype) runs in its own process,
``--rounds`` times alternating, and the best round counts: the engines see the same
machine load. MFU uses one FLOPs formula for both engines
(``neox_jax.training.metrics.flops_per_token``: 6N + attention, PaLM appendix B).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))  # op_profile
import op_profile  # noqa: E402
from report import markdown, summarize  # noqa: E402
from variants import VARIANTS  # noqa: E402


def _best_time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ------------------------------------------------------------------------ workers
def peak_worker(args) -> dict:
    """fp32 matmul FLOP/s (best of ``reps``) for several sizes, in JAX and torch."""
    import jax
    import jax.numpy as jnp

    from neox_jax.training.metrics import measure_matmul_peak

    out = {"jax": {}, "torch": {}}
    for n in args.peak_sizes:
        a = jnp.ones((n, n), jnp.float32)
        f = jax.jit(lambda x: x @ x)
        out["jax"][n] = 2 * n**3 / _best_time(lambda a=a, f=f: f(a).block_until_ready(), 5)
    out["measure_matmul_peak_default"] = measure_matmul_peak()
    if not args.skip_torch:
        import torch

        out["torch_threads"] = torch.get_num_threads()
        for n in args.peak_sizes:
            a = torch.ones(n, n)
            out["torch"][n] = 2 * n**3 / _best_time(lambda a=a: a @ a, 5)
    return out


def _config(args, model_overrides):
    from configs.pretrain import get_config

    c = get_config(args.model)
    c.model.update(dtype=args.dtype, remat=args.remat, attention_impl=args.attention_impl)
    c.model.update(model_overrides)
    c.data.update(global_batch_size=args.batch, seq_len=args.seq)
    c.train.steps = 10_000  # only shapes the schedule; nothing here runs that long
    return c


def jax_worker(args) -> dict:
    """Time the product's train step (and, with --breakdown, its parts)."""
    import flax.linen as nn
    import jax
    import numpy as np

    from neox_jax.model import ModelConfig, abstract_params, init_params, param_logical_axes
    from neox_jax.parallel.mesh import create_mesh
    from neox_jax.parallel.rules import RULES, batch_sharding
    from neox_jax.training import step as step_lib
    from neox_jax.training.metrics import flops_per_token
    from neox_jax.training.optimizer import optimizer_from_config
    from neox_jax.training.state import abstract_train_state, init_train_state

    overrides = json.loads(args.model_overrides)
    if "loss_chunk_tokens" in overrides:  # not a model field: the head's chunking
        from neox_jax.training import loss as loss_lib

        loss_lib.CHUNK_TOKENS = overrides.pop("loss_chunk_tokens")
    # Not model fields: a mesh over the process's (CPU) devices, one per core.
    axes = {a: overrides.pop(f"mesh_{a}") for a in ("data", "tensor") if f"mesh_{a}" in overrides}
    config = _config(args, overrides)
    mc = ModelConfig.from_dict(config.model.to_dict())
    mesh = (
        create_mesh(axes, devices=jax.devices())
        if axes
        else create_mesh({"data": 1}, devices=jax.devices()[:1])
    )
    tx, schedule = optimizer_from_config(config)
    _, shardings = abstract_train_state(tx, abstract_params(mc), param_logical_axes(mc), mesh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, mc.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "config": mc.to_dict()}
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        state = init_train_state(lambda r: init_params(mc, r), tx, shardings, 0)
        batch = {"tokens": jax.device_put(tokens, batch_sharding(mesh))}
        apply_fn = step_lib.model_apply_fn(mc)
        step = step_lib.build_train_step(  # the trainer's own jitted step
            config, mc, tx, schedule, shardings, {"tokens": batch_sharding(mesh)}, apply_fn
        )
        t = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        out["compile_s"] = time.perf_counter() - t
        cost = compiled.cost_analysis()
        out["xla_flops"] = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0))
        # Bytes the executed ops read and write (optimized HLO; a loop body counted once):
        # a measure of the step that contention cannot blur.
        out["hlo_bytes"] = sum(c["bytes"] for c in op_profile.op_costs(compiled.as_text()).values())
        times, cpu = [], []
        for i in range(args.warmup + args.steps):
            t, c = time.perf_counter(), time.process_time()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics["loss"])
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
        out["loss"] = float(metrics["loss"])
        if args.breakdown:
            out["breakdown_s"] = _jax_breakdown(args, mc, state, batch, apply_fn, tx)
        if args.profile:
            try:  # a failed profile must not cost the timings above
                out["profile"] = _jax_profile(compiled, state, batch)
            except Exception as e:  # noqa: BLE001 - recorded in the report
                out["profile_error"] = f"{type(e).__name__}: {e}"[:500]
    out.update(_rates(times, args, flops_per_token(mc, args.seq), cpu))
    return out


def _jax_breakdown(args, mc, state, batch, apply_fn, tx) -> dict:
    """Forward, forward+backward, the optimizer and the output layer, each jitted alone."""
    import jax
    import jax.numpy as jnp
    import optax

    from neox_jax.training import step as step_lib
    from neox_jax.training.loss import OutputHead, head_loss

    key = jax.random.key(0)
    fwd = jax.jit(lambda p, b: step_lib._sum_loss(p, None, b, key, apply_fn)[0])
    fwd_bwd = jax.jit(lambda p, b: step_lib.loss_and_grads(p, None, b, key, apply_fn))
    grads = fwd_bwd(state.params, batch)[2]
    opt = jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0]), donate_argnums=())
    # The output layer alone: [B*T, E] @ [E, V] logits in fp32, cross entropy, and its
    # gradient, as the step runs it (training.loss.head_loss).
    x = jnp.ones((args.batch, args.seq, mc.hidden_size), mc.compute_dtype)
    w = state.params["embed_out"]["kernel"]
    targets = batch["tokens"][:, 1:]
    weights = jnp.ones(targets.shape, jnp.float32)

    def head(x, w):
        return head_loss(OutputHead(x, w), targets, weights)

    head_grad = jax.jit(jax.grad(head, argnums=(0, 1)))
    reps = max(2, args.steps // 2)
    return {
        "forward": _best_time(lambda: fwd(state.params, batch).block_until_ready(), reps),
        "forward_backward": _best_time(
            lambda: jax.block_until_ready(fwd_bwd(state.params, batch)), reps
        ),
        "optimizer": _best_time(
            lambda: jax.block_until_ready(opt(grads, state.opt_state, state.params)), reps
        ),
        "output_layer_fwd_bwd": _best_time(lambda: jax.block_until_ready(head_grad(x, w)), reps),
    }


def _jax_profile(compiled, state, batch, steps: int = 2) -> dict:
    """The per-op table of the compiled step (``experiments/op_profile.py``): each HLO
    op's time from a ``jax.profiler`` trace, its FLOPs and bytes from the optimized HLO."""
    import jax

    holder = {"state": state}

    def run():  # the step donates its state: thread it through
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    return op_profile.xla_op_table(compiled, run, steps)


def torch_worker(args) -> dict:
    """transformers' GPTNeoXForCausalLM + torch.optim.AdamW on the same shapes."""
    import numpy as np
    import torch
    import transformers

    from neox_jax.model import ModelConfig
    from neox_jax.training.metrics import flops_per_token

    config = _config(args, {})
    mc = ModelConfig.from_dict(config.model.to_dict())
    torch.manual_seed(0)
    hf_config = transformers.GPTNeoXConfig(
        vocab_size=mc.vocab_size,
        hidden_size=mc.hidden_size,
        num_hidden_layers=mc.num_hidden_layers,
        num_attention_heads=mc.num_attention_heads,
        intermediate_size=mc.intermediate_size,
        hidden_act=mc.hidden_act,
        rotary_pct=mc.rotary_pct,
        rotary_emb_base=mc.rotary_emb_base,
        max_position_embeddings=mc.max_position_embeddings,
        layer_norm_eps=mc.layer_norm_eps,
        use_parallel_residual=mc.use_parallel_residual,
        tie_word_embeddings=mc.tie_word_embeddings,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )
    model = transformers.GPTNeoXForCausalLM(hf_config).train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=config.optimizer.lr,
        betas=(config.optimizer.b1, config.optimizer.b2),
        eps=config.optimizer.eps,
        weight_decay=config.optimizer.weight_decay,
    )
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(
        rng.integers(0, mc.vocab_size, (args.batch, args.seq + 1)).astype(np.int64)
    )
    inputs, targets = tokens[:, :-1], tokens[:, 1:].reshape(-1)

    def forward():
        logits = model(input_ids=inputs).logits  # [B, T, V]
        return torch.nn.functional.cross_entropy(logits.float().view(-1, mc.vocab_size), targets)

    def step():
        loss = forward()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times, cpu = [], []
    for i in range(args.warmup + args.steps):
        t, c = time.perf_counter(), time.process_time()
        loss = step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    out = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "loss": float(loss),
    }
    if args.breakdown:
        reps = max(2, args.steps // 2)

        def fwd_bwd():
            opt.zero_grad(set_to_none=True)
            forward().backward()

        def optimizer():
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip)
            opt.step()

        with torch.no_grad():
            no_grad_fwd = _best_time(forward, reps)
        out["breakdown_s"] = {
            "forward": _best_time(forward, reps),
            "forward_no_grad": no_grad_fwd,
            "forward_backward": _best_time(fwd_bwd, reps),
            "optimizer": _best_time(optimizer, reps),  # the gradients of fwd_bwd's last call
        }
    if args.profile:
        out["profile"] = op_profile.torch_op_table(step)
    out.update(_rates(times, args, flops_per_token(mc, args.seq), cpu))
    return out


def _rates(times, args, flops_per_tok, cpu=()) -> dict:
    """Rates from the timed steps' wall times; ``cpu`` (the process's CPU seconds per
    step, all threads) is recorded beside them: on a shared machine it shows the work a
    step does, which contention inflates far less than the wall time (spin-waiting
    thread pools count in it too, so it is a guide, not a rate)."""
    tokens = args.batch * args.seq
    best, median = min(times), statistics.median(times)
    return {
        "step_s_best": best,
        "step_s_median": median,
        "step_s_all": times,
        "cpu_s_per_step_median": statistics.median(cpu) if cpu else None,
        "load_average": load_average(),
        "tokens_per_s": tokens / median,
        "tokens_per_s_best": tokens / best,
        "model_flops_per_token": flops_per_tok,
        "achieved_flops": flops_per_tok * tokens / median,
    }


# -------------------------------------------------------------------- orchestration
def spawn(
    kind: str, args, xla_flags: str = "", model_overrides: dict | None = None, repo: str = ""
) -> dict:
    """Run one worker in a fresh process (its own XLA flags) and return its JSON.

    ``repo``: another checkout of neox_jax (``--baseline_repo``) whose bench and code the
    worker runs instead of this one's, for a before/after in one alternation.
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    script = str(Path(repo) / "experiments/train_bench/bench.py") if repo else __file__
    cmd = [sys.executable, script, f"--worker={kind}", f"--worker_out={out}"]
    cmd += [a for a in sys.argv[1:] if not a.startswith(("--worker", "--out", "--baseline"))]
    cmd += [f"--model_overrides={json.dumps(model_overrides or {})}"]
    env = dict(os.environ)
    if repo:
        env["PYTHONPATH"] = str(Path(repo).resolve())
    flags = " ".join(filter(None, [env.get("XLA_FLAGS", ""), xla_flags]))
    if kind == "jax" and args.profile:
        flags += f" {op_profile.XPROF_FLAG}"  # per-op events in the trace
    env["XLA_FLAGS"] = flags.strip()
    if not args.gpu:
        env["JAX_PLATFORMS"] = "cpu"  # never probe for accelerators (libtpu is installed)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    result = json.loads(out.read_text())
    out.unlink()
    return result


def load_average() -> list[float]:
    try:
        return list(os.getloadavg())
    except OSError:
        return []


def run_cpu(args) -> dict:
    report = {
        "mode": "cpu",
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_before": load_average(),
        },
        "settings": {
            k: getattr(args, k)
            for k in ("model", "batch", "seq", "dtype", "remat", "steps", "warmup", "rounds")
        },
        "peaks": [],
        "rounds": [],
    }
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    for r in range(args.rounds):
        # The peak is measured every round too: on a shared machine the best of all
        # measurements is the closest to what the cores can do.
        report["peaks"].append(spawn("peak", args))
        results = {}
        for name in variants:
            # "base:<variant>": the variant run by the --baseline_repo checkout.
            base = name.startswith("base:")
            flags, overrides = VARIANTS[name.removeprefix("base:")]
            print(f"[round {r}] jax {name}", flush=True)
            repo = args.baseline_repo if base else ""
            results[f"jax:{name}"] = spawn("jax", args, flags, overrides, repo)
        if not args.skip_torch:
            print(f"[round {r}] torch", flush=True)
            results["torch"] = spawn("torch", args)
        report["rounds"].append(results)
    report["machine"]["load_average_after"] = load_average()
    rates = [v for p in report["peaks"] for k in ("jax", "torch") for v in p.get(k, {}).values()]
    report["peak_flops"] = max(rates)
    report["summary"] = summarize(report)
    return report


def run_gpu(args) -> dict:
    """pythia-1b in bf16 on one accelerator: the product's step, MFU from the datasheet."""
    import jax

    from neox_jax.training.metrics import device_peak_flops

    device = jax.devices()[0]
    if device.platform == "cpu" and not args.allow_cpu:
        sys.exit("--gpu needs an accelerator (jax.devices() is CPU); --allow_cpu to smoke-test.")
    result = jax_worker(args)
    peak = args.peak_flops or device_peak_flops(device)
    result["peak_flops"] = peak
    result["mfu"] = None if not peak else result["achieved_flops"] / peak
    return {"mode": "gpu", "settings": vars(args), "result": result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="pythia-1b bf16 MFU on one accelerator")
    p.add_argument("--model", default=None, help="preset (cpu: pythia-70m, gpu: pythia-1b)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--dtype", default=None, help="compute dtype (cpu: float32, gpu: bfloat16)")
    p.add_argument("--remat", default="none")
    p.add_argument("--attention_impl", default="xla")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternating repeats (cpu)")
    p.add_argument("--variants", default="", help=f"comma-separated of {list(VARIANTS)}")
    p.add_argument("--breakdown", action="store_true", help="time forward/backward/optimizer")
    p.add_argument(
        "--profile", action="store_true", help="per-op tables (experiments/op_profile.py)"
    )
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--peak_sizes", default="512,1024,2048,4096")
    p.add_argument("--peak_flops", type=float, default=0.0, help="gpu: override datasheet peak")
    p.add_argument("--allow_cpu", action="store_true", help="let --gpu run on CPU (smoke test)")
    p.add_argument("--out", default="", help="write the JSON report here")
    p.add_argument(
        "--baseline_repo",
        default="",
        help="another neox_jax checkout; variants named base:<variant> run its code",
    )
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker_out", default="", help=argparse.SUPPRESS)
    p.add_argument("--model_overrides", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args()
    gpu = args.gpu
    args.model = args.model or ("pythia-1b" if gpu else "pythia-70m")
    args.batch = args.batch or (8 if gpu else 8)
    args.seq = args.seq or (2048 if gpu else 256)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.peak_sizes = [int(s) for s in str(args.peak_sizes).split(",")]
    if args.worker:
        fn = {"peak": peak_worker, "jax": jax_worker, "torch": torch_worker}[args.worker]
        Path(args.worker_out).write_text(json.dumps(fn(args)))
        return
    if gpu and args.profile:  # in this process: XLA:CPU's per-op events for --allow_cpu
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {op_profile.XPROF_FLAG}"
    report = run_gpu(args) if gpu else run_cpu(args)
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if gpu:
        r = report["result"]
        mfu = "n/a (unknown peak; pass --peak_flops)" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(
            f"{args.model} {args.dtype} batch {args.batch} x {args.seq} on {r['device']}: "
            f"{r['tokens_per_s']:.0f} tokens/s, step {r['step_s_median']:.3f} s, MFU {mfu}"
        )
        if r.get("profile"):
            print(op_profile.xla_markdown(r["profile"]), end="")
    else:
        print(markdown(report), end="")


if __name__ == "__main__":
    main()

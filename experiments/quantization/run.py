"""Post-training quantization of a small GPT-NeoX: quality, size and decode speed per format.

    .venv/bin/python experiments/quantization/run.py                 # CPU, ~15 minutes
    .venv/bin/python experiments/quantization/run.py --gpu           # on a GPU: bf16, Pallas

1. Corpus: the Python standard library's source (``*.py`` outside test folders); one
   file in ten (by a hash of its path) is held out. A 4096-piece byte-fallback
   sentencepiece BPE is trained on the training files.
2. Model: 4 layers, width 256, 4 heads, MLP 1024, vocabulary 4096 (5.3M parameters),
   trained from scratch on 256-token windows with AdamW for ``--train_minutes``.
3. Formats: fp32; int8 (per output channel); int4 in groups of 128, round-to-nearest
   and GPTQ (calibrated on 128 training windows), symmetric and asymmetric. All
   Linear layers of the blocks are quantized; embeddings and the output layer stay
   fp32 as in GPTQ (§5). Each quantized model is saved and loaded back
   (``save_quantized`` / ``load_quantized``) before it is measured.
4. Quality on held-out windows: perplexity, agreement of the next-token argmax with
   fp32 at every position, and identical 32-token greedy continuations of 128 prompts.
5. Size: bytes of this model's weights, and of ``neox-20b`` (``jax.eval_shape``).
6. Speed (``speed.py``): batch-1 greedy decoding of a ``pythia-160m``-shaped model
   (random weights: speed does not depend on values), the per-token time taken as the
   difference between 72 and 8 new tokens so prefill and dispatch cancel; chains of
   quantized matvecs by the op feeding them; decoding with one kernel type in int8.

Writes ``<workdir>/results.json`` and copies it next to this file.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import shutil
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from speed import WEIGHT_FORMATS, decode_speed, greedy, kernel_bisection, log, matvec_chain

from neox_jax.convert import save_checkpoint
from neox_jax.data.spm_training import train_sentencepiece
from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.model import GPTNeoX, ModelConfig, abstract_params, init_params
from neox_jax.quant import (
    QuantConfig,
    abstract_quantized_params,
    load_quantized,
    quantize_params,
    save_quantized,
    weight_bytes,
)

HERE = Path(__file__).parent
SEQ = 256
PROMPTS = 128  # greedy continuations compared with fp32
MODEL = ModelConfig(
    vocab_size=4096,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=1024,
    max_position_embeddings=SEQ,
)
FORMATS = {  # name -> QuantConfig (None: the float model)
    "fp32": None,
    "int8": QuantConfig(bits=8),
    "int8 +embed_out": QuantConfig(bits=8, embed_out=True),
    "int4-RTN": QuantConfig(bits=4, group_size=128),
    "int4-GPTQ": QuantConfig(bits=4, group_size=128, method="gptq"),
    "int4-GPTQ-act-order": QuantConfig(bits=4, group_size=128, method="gptq", gptq_act_order=True),
    "int4-RTN-asym": QuantConfig(bits=4, group_size=128, symmetric=False),
    "int4-GPTQ-asym": QuantConfig(bits=4, group_size=128, symmetric=False, method="gptq"),
}


# ---------------------------------------------------------------------- data
def corpus(workdir: Path, max_train_mb: float):
    """Train/held-out token streams of the stdlib source, and the tokenizer."""
    cache = workdir / "tokens.npz"
    tok_path = workdir / "tokenizer" / "tokenizer.model"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        f
        for f in stdlib.rglob("*.py")
        if not {"test", "tests", "idle_test", "site-packages"} & set(f.parts)
    )
    held = lambda f: int(hashlib.md5(str(f.relative_to(stdlib)).encode()).hexdigest(), 16) % 10 == 0
    train_files, test_files, size = [], [f for f in files if held(f)], 0
    for f in files:
        if not held(f) and size < max_train_mb * 1e6:
            train_files.append(f)
            size += f.stat().st_size
    if not tok_path.exists():
        log(f"training sentencepiece on {len(train_files)} files ({size / 1e6:.1f} MB)")
        train_sentencepiece(train_files, 4096, tok_path, input_sentence_size=200_000)
    tok = load_tokenizer(tok_path)
    if not cache.exists():

        def stream(fs):
            ids = []
            for f in fs:
                ids += tok.encode(f.read_text(encoding="utf-8", errors="replace")) + [tok.eos_id]
            return np.asarray(ids, np.int32)

        np.savez(cache, train=stream(train_files), test=stream(test_files))
    data = np.load(cache)
    return data["train"], data["test"], tok_path.parent


# ------------------------------------------------------------------ training
def train(train_ids: np.ndarray, minutes: float, max_steps: int, seed: int, batch: int = 8):
    """AdamW on random 256-token windows for ``minutes`` (or ``max_steps``).

    The learning rate follows the *elapsed time* (5% warmup, cosine to 10% of the
    peak), so the run ends annealed however fast the (shared) CPU happens to be.
    """
    rng = np.random.default_rng(seed)
    params = init_params(MODEL, jax.random.key(seed))
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=0.01),
    )
    state = opt.init(params)

    def lr_at(frac: float, peak: float = 2e-3) -> float:
        if frac < 0.05:
            return peak * frac / 0.05
        return peak * (0.1 + 0.45 * (1 + np.cos(np.pi * min(1.0, (frac - 0.05) / 0.95))))

    @jax.jit
    def step(params, state, batch, lr):
        def loss_fn(p):
            logits = GPTNeoX(MODEL).apply({"params": p}, batch[:, :-1])
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], -1))

        state[1].hyperparams["learning_rate"] = lr
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    start, steps, losses = time.perf_counter(), 0, []
    while steps < max_steps:
        frac = (time.perf_counter() - start) / (minutes * 60)
        if frac >= 1:
            break
        starts = rng.integers(0, len(train_ids) - SEQ - 1, batch)
        tokens = jnp.asarray(np.stack([train_ids[s : s + SEQ + 1] for s in starts]))
        params, state, loss = step(params, state, tokens, jnp.float32(lr_at(frac)))
        steps += 1
        if steps % 25 == 0:
            losses.append((steps, round(float(loss), 4)))
            log(f"step {steps}: loss {float(loss):.3f} (lr {lr_at(frac):.2e})")
    seconds = time.perf_counter() - start
    return params, {"steps": steps, "batch": [batch, SEQ], "seconds": seconds, "loss": losses}


# ---------------------------------------------------------------- evaluation
@functools.partial(jax.jit, static_argnames="config")
def _nll_and_argmax(config, params, batch):
    logits = GPTNeoX(config).apply({"params": params}, batch[:, :-1])
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch[:, 1:, None], -1)[..., 0]
    return nll, jnp.argmax(logits, -1)


def evaluate(params, windows, prompts, reference=None):
    parts = [_nll_and_argmax(MODEL, params, windows[i : i + 8]) for i in range(0, len(windows), 8)]
    nll = np.concatenate([p[0] for p in parts])
    argmax = np.concatenate([p[1] for p in parts])
    cont = np.asarray(greedy(MODEL, params, jnp.asarray(prompts), 32))
    out = {"perplexity": float(np.exp(nll.mean())), "bytes": weight_bytes(params)}
    if reference is not None:
        out["next_token_agreement"] = float(np.mean(argmax == reference["argmax"]))
        out["identical_32_token_continuations"] = float(
            np.mean(np.all(cont == reference["cont"], 1))
        )
        out["mean_matching_prefix"] = float(np.mean(np.argmin(np.concatenate(
            [cont == reference["cont"], np.zeros((len(cont), 1), bool)], 1), 1)))  # fmt: skip
    return out, {"argmax": argmax, "cont": cont}


def quality(workdir, params, tokenizer_dir, train_ids, test_ids):
    n = min(64, (len(test_ids) - 1) // (SEQ + 1))
    windows = jnp.asarray(test_ids[: n * (SEQ + 1)].reshape(n, SEQ + 1))
    step = (len(test_ids) - 32) // PROMPTS
    prompts = np.stack([test_ids[i * step : i * step + 32] for i in range(PROMPTS)])
    calib = np.stack(
        [
            train_ids[s : s + SEQ]
            for s in np.random.default_rng(1).integers(0, len(train_ids) - SEQ, 128)
        ]
    )
    results, reference = {}, None
    for name, qconfig in FORMATS.items():
        start = time.perf_counter()
        p = params
        if qconfig is not None:
            p = quantize_params(
                MODEL, params, qconfig, calib if qconfig.method == "gptq" else None, log=log
            )
            save_quantized(
                MODEL, qconfig, p, workdir / name, tokenizer_dir=tokenizer_dir, overwrite=True
            )
            _, _, p = load_quantized(workdir / name)
        seconds = time.perf_counter() - start
        res, ref = evaluate(p, windows, prompts, reference)
        reference = reference or ref
        res["quantize_seconds"] = round(seconds, 1)
        results[name] = res
        log(f"{name}: {res}")
    base = results["fp32"]["perplexity"]
    for res in results.values():
        res["perplexity_change_pct"] = 100 * (res["perplexity"] / base - 1)
    return results, {
        "eval_tokens": int(n * SEQ),
        "prompts": PROMPTS,
        "calibration": list(calib.shape),
    }


# --------------------------------------------------------------------- sizes
def neox20b_bytes():
    """Weight bytes of ``neox-20b`` per format, with the unquantized leaves (embeddings,
    LayerNorms, biases) in fp32 and in bf16; from ``jax.eval_shape``, nothing allocated."""
    out = {}
    for rest in ("float32", "bfloat16"):
        config = ModelConfig.from_preset("neox-20b", param_dtype=rest)
        for name, qc in WEIGHT_FORMATS.items():
            tree = abstract_params(config) if qc is None else abstract_quantized_params(config, qc)
            out.setdefault(name, {})[f"rest {rest}"] = weight_bytes(tree)
    return out


def markdown(results) -> str:
    """The README tables from a results dict."""
    lines = [
        "| format | weight bytes | perplexity | vs fp32 | next-token agreement "
        "| identical 32-token continuations |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results["quality"].items():
        agree = r.get("next_token_agreement", 1.0)
        same = r.get("identical_32_token_continuations", 1.0)
        lines.append(
            f"| {name} | {r['bytes']:,} | {r['perplexity']:.3f} | "
            f"{r['perplexity_change_pct']:+.2f}% | {100 * agree:.2f}% | {100 * same:.1f}% |"
        )
    lines += ["", "| neox-20b | rest fp32 | rest bf16 |", "| --- | --- | --- |"]
    for name, r in results["neox20b_weight_bytes"].items():
        lines.append(
            f"| {name} | {r['rest float32'] / 1e9:.2f} GB | {r['rest bfloat16'] / 1e9:.2f} GB |"
        )
    speed = results.get("decode_speed", {})
    if speed:
        lines += [
            "",
            "| decode, batch 1 | ms/token | tokens/s | vs float |",
            "| --- | --- | --- | --- |",
        ]
        for name, r in speed.items():
            if isinstance(r, dict):
                lines.append(
                    f"| {name} | {r['ms_per_token']:.1f} | {r['tokens_per_s']:.1f} "
                    f"| {r['speedup_vs_float']:.2f}x |"
                )
    chain = results.get("matvec_chain", {})
    if chain:
        lines += ["", "| matvec chain (per step) | ms |", "| --- | --- |"]
        lines += [f"| {name} | {r['ms_per_step']:.2f} |" for name, r in chain.items()]
    bisection = results.get("kernel_bisection", {})
    if bisection:
        lines += ["", "| pythia-160m decode, int8 kernels | ms/token |", "| --- | --- |"]
        lines += [f"| {name} | {r['ms_per_token']:.1f} |" for name, r in bisection.items()]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/neox_quant_exp")
    parser.add_argument("--train_minutes", type=float, default=12.0)
    parser.add_argument("--max_steps", type=int, default=100_000)
    parser.add_argument("--max_train_mb", type=float, default=6.0)
    parser.add_argument("--speed_preset", default="pythia-160m")
    parser.add_argument("--gpu", action="store_true", help="bf16 and the Pallas kernel too")
    parser.add_argument("--skip_speed", action="store_true")
    parser.add_argument(
        "--keep_speed", action="store_true", help="with --skip_speed: keep earlier speed results"
    )
    parser.add_argument(
        "--speed_only", action="store_true", help="rerun the speed part into results JSON"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    name = "results_gpu.json" if args.gpu else "results.json"
    if args.speed_only:
        results = json.loads((workdir / name).read_text())
        results["env"]["speed_load_average_at_start"] = os.getloadavg()
        results["decode_speed"] = decode_speed(args.speed_preset, args.gpu)
        results["matvec_chain"] = matvec_chain()
        results["kernel_bisection"] = kernel_bisection(args.speed_preset)
    else:
        results = {
            "env": {
                "jax": jax.__version__,
                "backend": jax.default_backend(),
                "cpus": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
                "load_average_at_start": os.getloadavg(),
            },
            "model": MODEL.to_dict(),
        }
        train_ids, test_ids, tokenizer_dir = corpus(workdir, args.max_train_mb)
        results["data"] = {
            "train_tokens": int(len(train_ids)),
            "heldout_tokens": int(len(test_ids)),
        }
        params, results["training"] = train(
            train_ids, args.train_minutes, args.max_steps, args.seed
        )
        save_checkpoint(
            MODEL, params, workdir / "float", tokenizer_dir=tokenizer_dir, overwrite=True
        )
        results["quality"], results["eval"] = quality(
            workdir, params, tokenizer_dir, train_ids, test_ids
        )
        results["neox20b_weight_bytes"] = neox20b_bytes()
        if not args.skip_speed:
            results["decode_speed"] = decode_speed(args.speed_preset, args.gpu)
            results["matvec_chain"] = matvec_chain()
            results["kernel_bisection"] = kernel_bisection(args.speed_preset)
        elif args.keep_speed and (workdir / name).exists():
            old = json.loads((workdir / name).read_text())
            for key in ("decode_speed", "matvec_chain", "kernel_bisection"):
                if key in old:
                    results[key] = old[key]
            results["env"]["speed_measured_under_load_average"] = old["env"].get(
                "speed_load_average_at_start"
            )
    results["env"]["load_average_at_end"] = os.getloadavg()
    (workdir / name).write_text(json.dumps(results, indent=2))
    shutil.copy(workdir / name, HERE / name)
    log(f"wrote {HERE / name}\n{markdown(results)}")


if __name__ == "__main__":
    main()

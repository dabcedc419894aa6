"""Fine-tune a small model on a small instruction set, with LoRA and in full; compare answers.

    python experiments/finetune/run.py --workdir=/tmp/ft_experiment
    python experiments/finetune/run.py --workdir=/tmp/ft_pythia --base=/models/pythia-70m

Without ``--base`` it first pretrains ``configs/pretrain.py:tiny`` on the Python standard
library (the README's main job, shortened) and writes it as a Hugging Face folder, so
fine-tuning starts from a Hugging Face directory exactly as it would from Pythia. Both
fine-tuning runs go through the real command line (``python -m neox_jax.train
--config=configs/finetune.py:sft-lora|sft-full``); the LoRA run is exported with
``neox_jax.finetune.export``. Greedy answers (temperature 0) to the chat-formatted
questions are scored by exact match, on the trained questions and on held-out ones.
Writes ``results.json`` and ``results.md`` into the workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(HERE)]

import instructions  # noqa: E402


def pretrain_base(workdir: Path, steps: int) -> Path:
    """A tiny model pretrained on stdlib source, saved as a Hugging Face folder."""
    import jax

    from configs.pretrain import get_config
    from neox_jax.convert import save_hf
    from neox_jax.training.trainer import train_and_evaluate

    out = workdir / "base_hf"
    if (out / "config.json").is_file():
        return out
    c = get_config("tiny")
    # Smaller than tiny (1.2M parameters) so that pretraining takes a few CPU minutes.
    c.model.update(
        vocab_size=1024,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
    )
    c.data.update(
        corpus_dir=str(workdir / "corpus"),
        stdlib_max_mb=4.0,
        tokenizer_vocab_size=1024,
        seq_len=128,
        global_batch_size=8,
    )
    c.train.update(steps=steps, save_every=steps, eval_every=steps, log_every=50)
    c.sample.prompt = ""
    result = train_and_evaluate(c, workdir / "base_run")
    params = jax.device_get(result["state"].params)
    save_hf(result["model_config"], params, out, tokenizer_dir=workdir / "base_run" / "tokenizer")
    return out


def finetune(method: str, base: Path, data: dict[str, Path], workdir: Path, args) -> float:
    """``python -m neox_jax.train --config=configs/finetune.py:sft-<method>``; seconds taken."""
    run = workdir / f"sft_{method}"
    for old in (run, workdir / "sft_lora_merged_hf", workdir / "sft_lora_adapter"):
        if method in old.name and old.exists():  # a rerun starts fine-tuning over
            shutil.rmtree(old)
    lora = method == "lora"
    flags = {
        "train.init_from": base,
        "data.sft_path": data["train"],
        "data.sft_eval_path": data["test"],
        "data.seq_len": 128,
        "data.global_batch_size": 8,
        "data.eval_batch_size": 16,
        "train.steps": args.steps,
        "train.log_every": 25,
        "train.eval_every": args.steps,
        "train.eval_batches": 2,
        "train.save_every": args.steps,
        "model.dtype": "float32",
        "model.remat": "none",
        "optimizer.lr": args.lora_lr if lora else args.full_lr,
        "optimizer.warmup_steps": 20,
        "lora.targets": "query_key_value,dense,dense_h_to_4h,dense_4h_to_h",
        "lora.rank": 16,
        "lora.alpha": 32.0,
        "lora.dropout": 0.0,
    }
    cmd = [
        sys.executable,
        "-m",
        "neox_jax.train",
        f"--config={REPO / 'configs' / 'finetune.py'}:sft-{method}",
        f"--workdir={run}",
        *(f"--config.{k}={v}" for k, v in flags.items()),
    ]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    start = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    return time.time() - start


def load_finetuned(method: str, workdir: Path):
    from neox_jax.finetune.export import export_run
    from neox_jax.loading import load_model

    run = workdir / f"sft_{method}"
    if method == "full":
        return load_model(run)
    merged = workdir / "sft_lora_merged_hf"
    if not merged.is_dir():
        export_run(run, hf_out=str(merged), peft_out=str(workdir / "sft_lora_adapter"))
    return load_model(merged)


def greedy(config, params, tokenizer, items) -> list[str]:
    from neox_jax.finetune.chat import encode_chat
    from neox_jax.inference import Generator, SamplingParams

    prompts = [encode_chat([{"role": "user", "content": q}], tokenizer) for _, q, _ in items]
    gen = Generator(config, params, tokenizer)
    return [r.text for r in gen.generate(prompts, SamplingParams(max_new_tokens=16))]


def report(items: dict, answers: dict, seconds: dict) -> str:
    models = list(answers)
    lines = [
        "| split | task | n | " + " | ".join(models) + " |",
        "| --- | --- | --- |" + " --- |" * len(models),
    ]
    for split, rows in items.items():
        by_kind = defaultdict(list)
        for i, (kind, _, _) in enumerate(rows):
            by_kind[kind].append(i)
        for kind, idx in by_kind.items():
            acc = [sum(answers[m][split][i] == rows[i][2] for i in idx) for m in models]
            cells = " | ".join(f"{a}/{len(idx)}" for a in acc)
            lines.append(f"| {split} | {kind} | {len(idx)} | {cells} |")
    lines += [
        "",
        "| split | question | expected | " + " | ".join(models) + " |",
        "| --- | --- | --- |" + " --- |" * len(models),
    ]
    for split, rows in items.items():
        shown = defaultdict(int)
        for i, (kind, q, a) in enumerate(rows):
            if shown[kind] < 2:
                shown[kind] += 1
                cells = " | ".join(f"`{answers[m][split][i]!r}`" for m in models)
                lines.append(f"| {split} | {q} | `{a!r}` | {cells} |")
    lines += ["", "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--base", default="", help="a Hugging Face GPT-NeoX folder")
    parser.add_argument("--pretrain_steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    parser.add_argument("--lora_lr", type=float, default=1e-2)
    parser.add_argument("--full_lr", type=float, default=1e-3)
    args = parser.parse_args()
    workdir = Path(args.workdir).absolute()
    data = instructions.write(workdir / "data")
    items = instructions.questions()

    from neox_jax.data.tokenizer import load_tokenizer
    from neox_jax.loading import find_tokenizer, load_model

    seconds = {}
    start = time.time()
    base = Path(args.base) if args.base else pretrain_base(workdir, args.pretrain_steps)
    seconds["base"] = time.time() - start
    tokenizer = load_tokenizer(find_tokenizer(base))
    answers = {}
    config, params = load_model(base)
    answers["base"] = {s: greedy(config, params, tokenizer, rows) for s, rows in items.items()}
    for method in ("lora", "full"):
        seconds[method] = finetune(method, base, data, workdir, args)
        config, params = load_finetuned(method, workdir)
        answers[method] = {s: greedy(config, params, tokenizer, rows) for s, rows in items.items()}
    record = json.loads((workdir / "sft_lora" / "lora.json").read_text())
    table = report(items, answers, seconds)
    table += (
        f"\n\nLoRA trains {record['trainable_params']:,} of {record['base_params']:,} "
        f"parameters ({100 * record['trainable_params'] / record['base_params']:.2f}%)."
    )
    (workdir / "results.md").write_text(table + "\n")
    (workdir / "results.json").write_text(
        json.dumps({"answers": answers, "seconds": seconds, "args": vars(args)}, indent=1)
    )
    print(table)


if __name__ == "__main__":
    main()

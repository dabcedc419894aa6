"""Perplexity (and a pass@k smoke run) of a small trained model; see README.md.

    python -m neox_jax.train --config=configs/pretrain.py:tiny --workdir=/tmp/tiny \
        --config.train.steps=100
    python experiments/evaluation/run.py --run_dir=/tmp/tiny --out_dir=/tmp/tiny_eval

Writes ``held_out.txt`` (the text scored), ``results.json`` (every number in the README)
into ``--out_dir``. Held-out text: the standard library's own test modules, which the
``stdlib`` training corpus skips: Python source like the training text, never trained on.
"""

import argparse
import json
import platform
import sysconfig
import time
from pathlib import Path

import jax

from neox_jax.data.corpus import stdlib_files
from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.evaluation import LogLikelihoodScorer, passk, perplexity_of_text_file
from neox_jax.evaluation.perplexity import perplexity_of_indexed_dataset
from neox_jax.inference import Generator
from neox_jax.loading import find_tokenizer, load_model


def held_out_text(max_bytes: int) -> tuple[str, list[str]]:
    """Stdlib test modules (``Lib/test``; the training corpus skips test folders), in
    sorted order, up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    training = set(stdlib_files())
    parts, names, total = [], [], 0
    for path in sorted((root / "test").rglob("*.py")):
        assert path not in training
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        parts.append(text)
        names.append(str(path.relative_to(root)))
        total += len(text.encode())
        if total >= max_bytes:
            break
    return "\n\n".join(parts), names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run_dir", required=True, help="training run directory")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--held_out_kb", type=int, default=128)
    parser.add_argument("--passk_samples", type=int, default=4)
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text, files = held_out_text(args.held_out_kb * 1024)
    (out / "held_out.txt").write_text(text, encoding="utf-8")
    tok = load_tokenizer(find_tokenizer(args.run_dir))
    eos = tok.eos_id
    results = {
        "run_dir": args.run_dir,
        "held_out_files": files,
        "held_out_bytes": len(text.encode()),
        "device": str(jax.devices()[0]),
        "python": platform.python_version(),
        "perplexity": [],
    }

    def score(name, rope, max_length, stride, dataset=None):
        config, params = load_model(args.run_dir, rope_scaling=rope)
        scorer = LogLikelihoodScorer(config, params, batch_size=8, max_length=max_length)
        start = time.perf_counter()
        if dataset:
            res = perplexity_of_indexed_dataset(
                scorer, dataset, stride=stride, prefix_token_id=eos, max_sequences=200
            )
        else:
            res = perplexity_of_text_file(
                scorer, tok, out / "held_out.txt", stride=stride, prefix_token_id=eos
            )
        row = {"name": name, "rope_scaling": rope, "max_length": max_length, "stride": stride,
               **res.to_dict(), "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
        print(json.dumps(row))
        results["perplexity"].append(row)

    score("held-out, trained length", None, 256, 256)
    score("held-out, trained length, overlapping windows", None, 256, 128)
    score("held-out, 2x trained length, no scaling", None, 512, 512)
    score("held-out, 2x trained length, linear x2", {"type": "linear", "factor": 2.0}, 512, 512)
    score("held-out, 2x trained length, ntk x2", {"type": "ntk", "factor": 2.0}, 512, 512)
    score("training data (200 sequences)", None, 256, 256,
          dataset=str(Path(args.run_dir) / "data" / "stdlib"))  # fmt: skip

    config, params = load_model(args.run_dir)
    generator = Generator(config, params, tok)
    completions = passk.generate_completions(
        generator, passk.PROBLEMS, n=args.passk_samples, temperature=0.8, max_new_tokens=96
    )
    report = passk.evaluate(passk.PROBLEMS, completions, ks=(1, args.passk_samples))
    results["passk"] = {**report.to_dict(), "samples": completions}
    print(json.dumps(report.to_dict()["pass_at_k"]))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

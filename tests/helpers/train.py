"""Small configs and datasets for the training tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from .xla import xla_flags

REPO = Path(__file__).resolve().parents[2]


def write_dataset(prefix, vocab=64, docs=200, seed=0):
    """An indexed dataset of learnable documents: counting runs modulo the vocabulary."""
    from neox_jax.data.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    with IndexedDatasetBuilder(str(prefix), np.uint16) as builder:
        for _ in range(docs):
            start, length = rng.integers(2, vocab), rng.integers(8, 60)
            builder.add_document((start + np.arange(length)) % (vocab - 2) + 2)
    return str(prefix)


def tiny_config(data_prefix, **overrides):
    """configs/pretrain.py:tiny shrunk to seconds; overrides as dotted keys."""
    sys.path.insert(0, str(REPO))
    from configs.pretrain import get_config

    c = get_config("tiny")
    c.model.update(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    c.data.update(
        source="indexed",
        paths=str(data_prefix),
        seq_len=16,
        global_batch_size=8,
        eval_batch_size=8,
        eval_fraction=0.1,
    )
    c.optimizer.update(lr=1e-2, warmup_steps=2)
    c.train.update(
        steps=12, log_every=1, eval_every=6, eval_batches=1, save_every=6, async_checkpoint=False
    )
    c.sample.prompt = ""
    c.update_from_flattened_dict(overrides)
    return c


def config_flags(config) -> list[str]:
    """The ``--config.x=y`` flags that reproduce ``config`` from tiny on the command line."""
    flat = []

    def walk(node, prefix):
        for k, v in node.items():
            if hasattr(v, "items"):
                walk(v, f"{prefix}{k}.")
            elif v is not None:
                flat.append(f"--config.{prefix}{k}={v}")

    walk(config, "")
    return flat


def train_command(config, workdir) -> list[str]:
    """The ``python -m neox_jax.train`` command line reproducing ``config``."""
    return [
        sys.executable,
        "-m",
        "neox_jax.train",
        f"--config={REPO / 'configs' / 'pretrain.py'}:tiny",
        f"--workdir={workdir}",
        *config_flags(config),
    ]


def run_train(config, workdir, *, env=None, devices=1, wait=True, **popen):
    """``python -m neox_jax.train`` in a subprocess (its own fake device count)."""
    cmd = train_command(config, workdir)
    environ = {
        **os.environ,
        "XLA_FLAGS": xla_flags(devices),
        "JAX_PLATFORMS": "cpu",
        **(env or {}),
    }
    if not wait:
        return subprocess.Popen(cmd, env=environ, cwd=REPO, **popen)
    return subprocess.run(cmd, env=environ, cwd=REPO, capture_output=True, text=True, timeout=600)


def logged(workdir, split="train", key="loss"):
    """{step: value} from the run's metrics.jsonl."""
    out = {}
    path = Path(workdir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["split"] == split and key in rec:
                out[rec["step"]] = rec[key]
    return out


def run_json_script(script: str, *args: str, timeout: int = 900) -> dict:
    """Run Python ``script`` in a fresh CPU process (so it can set its own fake device
    count before JAX starts) and return the JSON it prints on a line starting "JSON"."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("JSON"))
    return json.loads(line[4:])

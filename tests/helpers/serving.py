"""The serving tests' model: a tiny GPT-NeoX HF folder with a byte-level BPE trained on
the given texts (so stop strings and multi-byte characters decode as in production);
and ``Server``, a real ``python -m neox_jax.serve`` process to drive over HTTP."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers.hf_reference import make_hf_model, train_byte_level_bpe
from neox_jax.convert import load_hf

ROOT = Path(__file__).resolve().parents[2]


def serving_model(path, texts):
    """``(config, params, tokenizer)`` of a model written to ``path``."""
    tok = train_byte_level_bpe(path, list(texts) * 20, 120, {"eos_token": "<|endoftext|>"})
    make_hf_model(path, vocab_size=tok.vocab_size, max_position_embeddings=96)
    config, params = load_hf(path)
    return config, params, tok


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``python -m neox_jax.serve`` process on a free loopback port (``flags``: more
    ``--config.`` options), serving ``model_dir``; ready when its /health answers."""

    def __init__(self, model_dir: Path, log: Path, flags: list[str]):
        self.port = _free_port()
        self.name = model_dir.name
        env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
        cmd = [
            sys.executable, "-m", "neox_jax.serve", f"--config={ROOT / 'configs/serve.py'}",
            f"--config.checkpoint={model_dir}", f"--config.port={self.port}", *flags,
        ]  # fmt: skip
        self.log = log
        self.proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.5)
        self.proc.kill()
        raise RuntimeError(f"server did not start: {log.read_text()[-3000:]}")

    def request(self, method, path, body=None, raw: bytes | None = None, headers=None):
        """``(status, text)``; ``headers``: instead of ``Content-Type: application/json``."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, data, headers or {"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read().decode()
        self.last_headers = dict(resp.getheaders())  # of the last response (one thread)
        conn.close()
        return resp.status, text

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, body=None, raw=None):
        status, text = self.request("POST", path, body, raw)
        return status, json.loads(text)

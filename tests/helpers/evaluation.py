"""Shared helpers for the retrieval / RAG / evaluation / long-context tests (no tests here).

``tiny_model()`` is cached per process, so every test module that uses it shares one
``ModelConfig``; jitted programs are cached by config and shape, so modules reuse each
other's compilations instead of compiling the same tiny model again.
"""

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from helpers.hf_reference import make_hf_model, train_byte_level_bpe
from neox_jax.convert import load_hf

# fmt: off
WORDS = (
    "alpha", "beta", "gamma", "delta", "river", "mountain", "forest", "ocean", "python",
    "compiler", "tensor", "matrix", "kernel", "gradient", "token", "window", "budget", "answer",
    "question", "passage", "library", "harbor", "castle", "def", "return", "class", "import",
    "print", "value", "list", "string",
)
# fmt: on


def corpus_lines(n: int, seed: int = 0) -> list[str]:
    """Random sentences over ``WORDS`` (tokenizer training data and test documents)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 14)))) for _ in range(n)]


def train_tokenizer(directory: Path, vocab_size: int = 320):
    """A GPT-NeoX-style byte-level BPE (<|endoftext|> = 0 is eos, <|padding|> = 1)."""
    config = {"eos_token": "<|endoftext|>", "pad_token": "<|padding|>"}
    return train_byte_level_bpe(directory, corpus_lines(400), vocab_size, config)


def make_model_dir(path: Path, **overrides):
    """A Hugging Face folder with a random tiny model and its tokenizer beside it.

    Returns ``(torch reference model, tokenizer)``.
    """
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(path)
    ref = make_hf_model(path, vocab_size=tok.vocab_size, **overrides)
    return ref, tok


@functools.cache
def tiny_model():
    """``(path, torch model, config, params, tokenizer)``: one per test process."""
    path = Path(tempfile.mkdtemp(prefix="neox_eval_model_"))
    atexit.register(shutil.rmtree, path, True)  # the process owns it; leave nothing behind
    ref, tok = make_model_dir(path)
    config, params = load_hf(path)
    return path, ref, config, params, tok


def hf_token_logprobs(ref, ids) -> np.ndarray:
    """``log p(ids[t] | ids[:t])`` for t >= 1 from the torch model (float64)."""
    with torch.no_grad():
        logits = ref(torch.tensor([list(ids)], dtype=torch.long)).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1).numpy()
    return logp[np.arange(len(ids) - 1), np.asarray(ids[1:])]


def load_config(name: str, arg=None):
    """``configs/<name>.py``'s ``get_config(arg)`` (configs/ is not a package)."""
    import importlib.util

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location(f"{name}_config", root / f"configs/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)

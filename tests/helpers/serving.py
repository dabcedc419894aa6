"""The serving tests' model: a tiny GPT-NeoX HF folder with a byte-level BPE trained on
the given texts (so stop strings and multi-byte characters decode as in production)."""

from __future__ import annotations

from helpers.hf_reference import make_hf_model, train_byte_level_bpe
from neox_jax.convert import load_hf


def serving_model(path, texts):
    """``(config, params, tokenizer)`` of a model written to ``path``."""
    tok = train_byte_level_bpe(path, list(texts) * 20, 120, {"eos_token": "<|endoftext|>"})
    make_hf_model(path, vocab_size=tok.vocab_size, max_position_embeddings=96)
    config, params = load_hf(path)
    return config, params, tok

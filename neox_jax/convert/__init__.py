"""Conversion between Hugging Face GPT-NeoX checkpoints and neox_jax checkpoints."""

from neox_jax.convert.checkpoint import (
    find_tokenizer,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from neox_jax.convert.hf import ConversionError, config_from_hf, config_to_hf, load_hf, save_hf

__all__ = [
    "ConversionError",
    "config_from_hf",
    "config_to_hf",
    "find_tokenizer",
    "load_checkpoint",
    "load_hf",
    "load_model",
    "save_checkpoint",
    "save_hf",
]

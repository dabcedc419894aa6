"""The two model formats of ``convert``: Hugging Face folders and our orbax checkpoints.

Loading any kind of model folder is ``neox_jax.loading.load_model``.
"""

from neox_jax.convert.checkpoint import load_checkpoint, save_checkpoint
from neox_jax.convert.hf import (
    ConversionError,
    config_from_hf,
    config_to_hf,
    is_hf_folder,
    load_hf,
    save_hf,
)

# Moved to the one artifact loader; a clear error instead of a bare ImportError (no import
# of neox_jax.loading here: it sits above this package).
_MOVED = ("load_model", "find_tokenizer", "load_model_and_tokenizer", "peek_config")


def __getattr__(name: str):
    if name in _MOVED:
        raise ImportError(
            f"neox_jax.convert.{name} moved to neox_jax.loading.{name}: "
            f"use `from neox_jax.loading import {name}`."
        )
    raise AttributeError(f"module 'neox_jax.convert' has no attribute {name!r}")


__all__ = [
    "ConversionError",
    "config_from_hf",
    "config_to_hf",
    "is_hf_folder",
    "load_checkpoint",
    "load_hf",
    "save_checkpoint",
    "save_hf",
]

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

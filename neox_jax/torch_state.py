"""State dicts in PyTorch pickles (``pytorch_model.bin``, PEFT's older ``adapter_model.bin``),
read without unpickling arbitrary objects and turned into numpy arrays.

``torch.load(..., weights_only=True)`` refuses any global that is not a tensor or a plain
container, so a checkpoint cannot run code here; a file that cannot be read that way is an
error of the caller's type naming the file and the fix (convert it to safetensors where
you trust it).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from neox_jax.errors import UserError
from neox_jax.optional import require


def load_torch_state(
    file: Path, *, what: str, safetensors_name: str, error: type[UserError] = UserError
) -> dict[str, Any]:
    """The state dict (name -> torch tensor) in ``file``, read with ``weights_only=True``.

    Args:
      file: the pickle.
      what: what needs it, for the message when torch is not installed.
      safetensors_name: the file to convert it to, named in the message on an unsafe file.
      error: the ``UserError`` subclass raised on a file that cannot be read.
    """
    torch = require("torch", what)
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        detail = f"e.g. {found[1]}" if found else str(e).splitlines()[0][:160]
        raise error(
            f"{file} holds objects other than tensors ({detail}), which "
            "neox_jax does not unpickle (torch.load weights_only=True); where you trust the "
            f"file, convert it to {safetensors_name} with transformers/peft first."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise error(
            f"{file} is truncated or not a PyTorch checkpoint ({str(e).split('. ')[0][:160]}); "
            "download or copy it again."
        ) from None
    if not isinstance(state, dict):
        raise error(f"{file} holds a {type(state).__name__}, not a state dict.")
    return state


def torch_to_numpy(tensor) -> np.ndarray:
    """A CPU torch tensor as numpy (bfloat16 as ``ml_dtypes.bfloat16``, bit for bit)."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()

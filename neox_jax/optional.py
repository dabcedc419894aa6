"""Optional dependencies: one line naming the extra to install instead of a raw import error.

    torch = optional.require("torch", "reading pytorch_model.bin")

raises ``MissingDependency`` (a ``UserError``, so entry points print it as one line) with
``pip install "neox_jax[hf]"`` when torch is absent. The table below is the one place that
says which extra of ``setup.cfg`` brings which module.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from neox_jax.errors import UserError

# import name -> (pip package, extra of setup.cfg that installs it)
EXTRAS = {
    "torch": ("torch", "hf"),
    "transformers": ("transformers", "hf"),
    "peft": ("peft", "hf"),
    "datasets": ("datasets", "datasets"),
    "faiss": ("faiss-cpu", "retrieval"),
    "lm_eval": ("lm-eval", "eval"),
    "tensorflow_datasets": ("tensorflow-datasets", "tfds"),
    "wandb": ("wandb", "wandb"),
    "nbclient": ("nbclient", "notebook"),
    "nbformat": ("nbformat", "notebook"),
}


class MissingDependency(UserError):
    """An optional package is not installed; the message names the extra that brings it."""


def install_hint(module: str) -> str:
    """``pip install ...`` for the optional module ``module``."""
    package, extra = EXTRAS.get(module.split(".")[0], (module.split(".")[0], None))
    return f'pip install "neox_jax[{extra}]"' if extra else f"pip install {package}"


def require(module: str, purpose: str) -> ModuleType:
    """Imports ``module``, or raises ``MissingDependency`` saying what to install.

    Args:
      module: the import name (``"torch"``, ``"tensorflow_datasets"``, ...).
      purpose: what needs it, for the message ("reading pytorch_model.bin").

    Returns:
      The module.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is None or e.name.split(".")[0] != top:
            raise  # the package is there but one of *its* dependencies is missing
        raise MissingDependency(
            f"{purpose} needs the {top} package, which is not installed: {install_hint(top)}"
        ) from None

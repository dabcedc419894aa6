"""Our own checkpoint format (orbax), and nothing else: one of the format modules.

A neox_jax model checkpoint is an orbax composite with two items, ``params`` (the
parameter tree) and ``model_config`` (``ModelConfig`` as JSON). Every step directory
written by the trainer has the same two items (plus the optimizer state and data
position), so a step directory *is* a model checkpoint. Tokenizer files, when known,
sit beside the items in ``tokenizer/``. A training run directory holds its steps in
``checkpoints/<step>/``.

Loading any kind of model folder (this one, Hugging Face, quantized, LoRA run) is
``neox_jax.loading.load_model``; this module knows only its own layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from neox_jax.atomic import atomic_directory
from neox_jax.data.tokenizer import copy_tokenizer
from neox_jax.errors import UserError
from neox_jax.model import ModelConfig, abstract_params
from neox_jax.model.shapes import check_params

PARAMS = "params"
MODEL_CONFIG = "model_config"
TOKENIZER_DIR = "tokenizer"


def save_checkpoint(
    config: ModelConfig,
    params: dict[str, Any],
    path: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``params`` and ``config`` as a model checkpoint at ``path`` (atomically)."""
    check_params(config, params, what="params to save")
    items = {
        PARAMS: ocp.args.StandardSave(params),
        MODEL_CONFIG: ocp.args.JsonSave(config.to_dict()),
    }
    return save_items(items, path, tokenizer_dir=tokenizer_dir, overwrite=overwrite)


def save_items(
    items: dict[str, Any],
    path: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write orbax composite ``items`` (name -> ``ocp.args``) as the folder ``path``,
    atomically, with the tokenizer files of ``tokenizer_dir`` in ``<path>/tokenizer``."""
    with atomic_directory(path, overwrite=overwrite) as tmp:
        ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
        ckptr.save(tmp / "ckpt", args=ocp.args.Composite(**items), force=True)
        for item in (tmp / "ckpt").iterdir():  # orbax writes a fresh folder: move its items up
            os.replace(item, tmp / item.name)
        (tmp / "ckpt").rmdir()
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp / TOKENIZER_DIR)
    return Path(path).absolute()


def is_model_checkpoint(path: Path) -> bool:
    return (path / PARAMS).is_dir() and (path / MODEL_CONFIG).is_dir()


def latest_step_dir(run_dir: Path) -> Path | None:
    """The newest *complete* step under ``run_dir/checkpoints`` (orbax marks completion)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted((int(p.name), p) for p in root.iterdir() if p.name.isdigit() and p.is_dir())
    for _, step_dir in reversed(steps):
        if is_model_checkpoint(step_dir) and _is_complete(step_dir):
            return step_dir
    return None


def _is_complete(step_dir: Path) -> bool:
    # orbax writes to a temporary name and renames when the save is finalised; a
    # directory with a numeric name is therefore complete unless marked otherwise.
    return not any(p.name.endswith(".orbax-checkpoint-tmp") for p in step_dir.iterdir())


def read_model_config(ckpt_dir: Path) -> ModelConfig:
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    restored = ckptr.restore(
        ckpt_dir, args=ocp.args.Composite(**{MODEL_CONFIG: ocp.args.JsonRestore()})
    )
    return ModelConfig.from_dict(restored[MODEL_CONFIG])


def load_checkpoint(
    path: str | os.PathLike, *, shardings: Any = None, **config_overrides
) -> tuple[ModelConfig, dict[str, Any]]:
    """Read a model checkpoint or a trainer step directory.

    Args:
      path: the checkpoint directory.
      shardings: optional tree of ``jax.sharding.Sharding`` matching the params, to
        restore each array straight onto its devices; default: the first device.
      **config_overrides: ModelConfig fields to change (e.g. ``attention_impl``). Fields
        that change parameter shapes are rejected by the shape check.
    """
    path = Path(path).absolute()
    if not is_model_checkpoint(path):
        raise UserError(
            f"{path} is not a neox_jax checkpoint (expected {PARAMS}/ and {MODEL_CONFIG}/)."
        )
    config = read_model_config(path)
    if config_overrides:
        config = config.replace(**config_overrides)
    abstract = abstract_params(config)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        restored = ckptr.restore(
            path, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)})
        )
    except (ValueError, KeyError) as e:
        raise UserError(f"Cannot restore parameters from {path}: {e}") from None
    return config, restored[PARAMS]

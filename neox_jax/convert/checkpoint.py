"""Our own checkpoints (orbax) and one loader for every kind of model directory.

A neox_jax model checkpoint is an orbax composite with two items, ``params`` (the
parameter tree) and ``model_config`` (``ModelConfig`` as JSON). Every step directory
written by the trainer has the same two items (plus the optimizer state and data
position), so a step directory *is* a model checkpoint. Tokenizer files, when known,
sit beside the items in ``tokenizer/``.

``load_model(path)`` accepts any of:
  * a Hugging Face GPT-NeoX folder (``config.json`` with ``model_type: gpt_neox``);
  * a model checkpoint or a trainer step directory (has ``params/`` and ``model_config/``);
  * a training run directory (``checkpoints/<step>/...``): the latest complete step.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from neox_jax import hub
from neox_jax.atomic import atomic_directory
from neox_jax.convert.hf import ConversionError, load_hf
from neox_jax.errors import load_json
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


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy tokenizer files (a file, or the tokenizer files of a folder) into ``dst``."""
    from neox_jax.convert.hf import TOKENIZER_FILES

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    files = [src] if src.is_file() else [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    if src.is_dir():
        files += [f for f in src.glob("*.model") if f not in files]
    for f in files:
        shutil.copy2(f, dst / f.name)


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
        raise ConversionError(
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
        raise ConversionError(f"Cannot restore parameters from {path}: {e}") from None
    return config, restored[PARAMS]


def load_model(path: str | os.PathLike, **kwargs) -> tuple[ModelConfig, dict[str, Any]]:
    """``(config, params)`` from a Hugging Face folder, a checkpoint or a run directory.

    A quantized checkpoint (``python -m neox_jax.quantize``) gives its quantized params,
    which ``GPTNeoX`` and the ``Generator`` run as they are; a LoRA run gives its base with
    the latest adapters merged in. ``kwargs``: ``ModelConfig`` overrides (and
    ``shardings`` for our float checkpoints). ``path`` may be a Hugging Face Hub model id
    (``EleutherAI/pythia-70m``, ``...@step3000``; see ``neox_jax.hub``).
    """
    path = Path(hub.resolve(path))
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if (path / "config.json").is_file():
        cfg = load_json(path / "config.json", "model config")
        if "model_type" in cfg:
            kwargs.pop("shardings", None)
            return load_hf(path, **kwargs)
    from neox_jax.quant.checkpoint import is_quantized_checkpoint  # quant imports this module

    if is_quantized_checkpoint(path):  # int8/int4 weights: the model dequantizes on the fly
        from neox_jax.quant.checkpoint import load_quantized, read_configs

        kwargs.pop("shardings", None)
        config = read_configs(path)[0]
        config, _, params = load_quantized(path, config=config.replace(**kwargs))
        return config, params
    if is_model_checkpoint(path):
        return load_checkpoint(path, **kwargs)
    if (path / "lora.json").is_file():  # a LoRA run holds adapters: merge them into the base
        from neox_jax.finetune.export import load_lora_run, merged_params

        config, base, adapters, lora, _ = load_lora_run(path)
        kwargs.pop("shardings", None)
        return config.replace(**kwargs) if kwargs else config, merged_params(base, adapters, lora)
    step_dir = latest_step_dir(path)
    if step_dir is not None:
        return load_checkpoint(step_dir, **kwargs)
    raise ConversionError(
        f"{path} is neither a Hugging Face GPT-NeoX folder (config.json + weights), a "
        f"neox_jax checkpoint ({PARAMS}/ + {MODEL_CONFIG}/), nor a run directory with "
        "complete checkpoints/<step>/ folders."
    )


def find_tokenizer(path: str | os.PathLike) -> Path | None:
    """Where the tokenizer of a model directory (or Hub model id) lives, if anywhere."""
    path = Path(hub.resolve(path))
    candidates = [path, path / TOKENIZER_DIR]
    step_dir = latest_step_dir(path) if path.is_dir() else None
    if step_dir is not None:
        candidates += [step_dir / TOKENIZER_DIR]
    candidates += [path.parent / TOKENIZER_DIR, path.parent.parent / TOKENIZER_DIR]
    for c in candidates:
        if c.is_dir() and ((c / "tokenizer.json").is_file() or any(c.glob("*.model"))):
            return c
    return None

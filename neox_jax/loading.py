"""The one artifact loader: any kind of model folder, on any mesh, with its tokenizer.

The format modules below know only their own layout (``convert/hf.py``: Hugging Face
safetensors; ``convert/checkpoint.py``: our orbax checkpoints and run directories;
``quant/checkpoint.py``: quantized checkpoints; ``finetune/lora.py``: LoRA adapters;
``finetune/peft_format.py``: PEFT adapter folders). This module is the one place that tells
them apart (``artifact_kind``) and composes them:

==============  ==========================================  ==============================
kind            how it is recognised                        what ``load_model`` returns
==============  ==========================================  ==============================
``hf``          ``config.json`` naming a ``model_type``      float params (``param_dtype``)
``peft``        ``adapter_config.json``, no model weights    its base (any float kind, from
                                                            ``base_model_name_or_path``) with
                                                            the adapter merged
``quantized``   ``params/ model_config/ quant_config/``      ``QuantizedWeight`` leaves
``checkpoint``  ``params/ model_config/`` (also a step dir)  float params
``lora_run``    a run directory with ``lora.json``           base with the adapters merged
``run``         ``checkpoints/<step>/`` (latest complete)    that step's float params
``neox``        GPT-NeoX ``layer_00-model_00-model_states``  float params, TP ranks merged
                (or ``mp_rank_00_model_states``)
==============  ==========================================  ==============================

Every kind can be placed on a mesh as it is read: ``load_model(path, mesh=mesh)`` shards
the params by the logical-axis rules table (``neox_jax.parallel.param_shardings``);
``shardings=`` gives the placement leaf by leaf instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from neox_jax import hub
from neox_jax.convert.checkpoint import (
    PARAMS,
    TOKENIZER_DIR,
    is_model_checkpoint,
    latest_step_dir,
    load_checkpoint,
    read_model_config,
)
from neox_jax.convert.hf import (
    config_from_hf,
    has_hf_weights,
    is_hf_folder,
    load_hf,
    read_hf_config,
)
from neox_jax.data.generation_config import GenerationDefaults, read_generation_config
from neox_jax.data.tokenizer import Tokenizer, load_tokenizer
from neox_jax.errors import UserError, load_json
from neox_jax.finetune.lora import LoraConfig, LoraError, abstract_adapters, adapter_logical_axes
from neox_jax.finetune.lora import merge as merge_adapters
from neox_jax.finetune.peft_format import ADAPTER_CONFIG, load_peft_adapter
from neox_jax.model import ModelConfig, abstract_params, init_params
from neox_jax.neox_compat.checkpoint import (
    is_neox_checkpoint,
    load_neox_checkpoint,
    read_neox_model_config,
)
from neox_jax.parallel.mesh import AXES
from neox_jax.parallel.placement import param_shardings
from neox_jax.parallel.rules import logical_to_sharding
from neox_jax.quant.checkpoint import is_quantized_checkpoint, load_quantized, read_configs
from neox_jax.quant.config import QuantConfig
from neox_jax.quant.params import abstract_quantized_params, quantize_params

KINDS = ("hf", "peft", "quantized", "checkpoint", "lora_run", "run", "neox")
LORA_RECORD = "lora.json"  # written by neox_jax.finetune.trainer_hooks in a LoRA run


# ------------------------------------------------------------------ which kind
def local_path(path: str | os.PathLike, *, weights: bool = True) -> Path:
    """The local folder a model path names. Every function here starts with it.

    This is where a Hub model id ("org/name[@revision]", e.g. ``EleutherAI/pythia-70m``)
    becomes a local cache folder (``neox_jax.hub``); a local path is returned as it is.
    ``weights=False`` fetches only the config and tokenizer files of a Hub id.
    """
    return Path(hub.resolve(path, weights=weights))


def artifact_kind(path: str | os.PathLike) -> str:
    """Which of ``KINDS`` the folder ``path`` is (the one place that decides).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      UserError: ``path`` is none of the kinds.
    """
    path = local_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    # A PEFT adapter folder may carry its base's config.json (trainers save it beside).
    if (path / ADAPTER_CONFIG).is_file() and not has_hf_weights(path):
        return "peft"
    if is_hf_folder(path):
        return "hf"
    if is_quantized_checkpoint(path):
        return "quantized"
    if is_model_checkpoint(path):
        return "checkpoint"
    if (path / LORA_RECORD).is_file():
        return "lora_run"
    if latest_step_dir(path) is not None:
        return "run"
    if is_neox_checkpoint(path):
        return "neox"
    raise UserError(
        f"{path} is neither a Hugging Face model folder (config.json + weights), a PEFT "
        f"adapter folder ({ADAPTER_CONFIG}), a neox_jax checkpoint ({PARAMS}/ + "
        "model_config/), nor a run directory with complete checkpoints/<step>/ folders, nor "
        "a GPT-NeoX checkpoint (global_stepN/ with layer_XX-model_YY-model_states.pt files)."
    )


def peek_config(path: str | os.PathLike) -> ModelConfig:
    """The ``ModelConfig`` of any kind of model folder, without reading its weights."""
    path = local_path(path, weights=False)
    kind = artifact_kind(path)
    if kind == "hf":
        return config_from_hf(read_hf_config(path))
    if kind == "peft":
        return peek_config(peft_base(path, weights=False))
    if kind == "quantized":
        return read_configs(path)[0]
    if kind == "lora_run":
        return ModelConfig.from_dict(read_lora_record(path)["model_config"])
    if kind == "neox":
        return read_neox_model_config(path)
    return read_model_config(path if kind == "checkpoint" else latest_step_dir(path))


# ------------------------------------------------------------------ load
def load_model(
    path: str | os.PathLike,
    *,
    shardings: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    **overrides,
) -> tuple[ModelConfig, dict[str, Any]]:
    """``(config, params)`` from any kind of model folder (see the module docstring).

    Args:
      path: a Hugging Face folder, a checkpoint (float or quantized), a trainer step
        directory, a run directory, a LoRA run directory or a GPT-NeoX checkpoint
        (``global_stepN`` or its save folder; TP ranks merged, config from its configs/).
      shardings: a tree of ``jax.sharding.Sharding`` shaped like the params (for a
        quantized checkpoint: like its quantized params) to place each array on.
      mesh: place the params on this mesh by the rules table instead (ignored when
        ``shardings`` is given).
      **overrides: ``ModelConfig`` fields to change at load time (``dtype``,
        ``attention_impl``, ``rope_scaling``, ``param_dtype``, ...). Fields that change
        parameter shapes are rejected by the shape checks.

    Returns:
      The config (with the overrides) and the params: on ``shardings`` / ``mesh`` when
      given; else host numpy arrays (Hugging Face folder, LoRA run) or arrays on the
      first device (the orbax kinds).
    """
    path = local_path(path)
    kind = artifact_kind(path)
    if kind == "hf":
        config, params = load_hf(path, **overrides)
    elif kind == "neox":  # architecture from its configs/*.yml
        config, params = load_neox_checkpoint(path, **overrides)
    elif kind == "peft":
        config, params = _load_peft(path, overrides)
    elif kind == "quantized":
        return _load_quantized(path, shardings, mesh, overrides)
    elif kind == "lora_run":
        config, base, adapters, lora, _ = load_lora_run(path)
        config = config.replace(**overrides) if overrides else config
        params = merged_params(base, adapters, lora)
    else:
        step_dir = path if kind == "checkpoint" else latest_step_dir(path)
        if shardings is None and mesh is not None:
            config = read_model_config(step_dir).replace(**overrides)
            shardings = param_shardings(config, abstract_params(config), mesh)
        return load_checkpoint(step_dir, shardings=shardings, **overrides)
    # Host arrays (hf, neox, lora_run, peft): placed only when asked.
    if shardings is None and mesh is not None:
        shardings = param_shardings(config, params, mesh)
    return config, params if shardings is None else jax.device_put(params, shardings)


def _load_quantized(path: Path, shardings, mesh, overrides):
    config, qconfig = read_configs(path)
    config = config.replace(**overrides)
    if shardings is None and mesh is not None:
        shardings = param_shardings(config, abstract_quantized_params(config, qconfig), mesh)
    config, _, params = load_quantized(path, config=config, shardings=shardings)
    return config, params


# ------------------------------------------------------------------ PEFT adapters
def peft_base(path: str | os.PathLike, *, weights: bool = True) -> Path:
    """The local base model folder of the PEFT adapter folder ``path``: its
    ``base_model_name_or_path`` (a path, also tried beside the adapter, or a Hub id;
    ``weights`` as in ``local_path``)."""
    path = local_path(path, weights=False)
    cfg = load_json(path / ADAPTER_CONFIG, "PEFT adapter config")
    base = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    if not base:
        raise UserError(
            f"{path / ADAPTER_CONFIG} names no base_model_name_or_path, so the model it adapts "
            "is unknown; set it to the base model's folder, or merge the adapter with "
            "python -m neox_jax.finetune.export --config.base=BASE --config.peft_in=ADAPTER "
            "--config.hf_out=OUT."
        )
    beside = path.parent / base
    if not Path(base).expanduser().exists() and beside.exists():
        return beside
    found = local_path(os.path.expanduser(base), weights=weights)
    if not found.exists():
        raise UserError(
            f"the base model of the adapter {path}, {base!r} (base_model_name_or_path in "
            f"{ADAPTER_CONFIG}), does not exist; put the base there or edit the field."
        )
    return found


def _load_peft(path: Path, overrides: dict[str, Any]) -> tuple[ModelConfig, dict[str, Any]]:
    """A PEFT adapter merged into its float base (host arrays)."""
    base = peft_base(path)
    kind = artifact_kind(base)
    if kind in ("peft", "quantized"):
        raise UserError(
            f"the base of the adapter {path} is {base}, a {kind} folder; a PEFT adapter "
            "merges into a float model (a Hugging Face folder, checkpoint or run)."
        )
    config, params = load_model(base, **overrides)
    lora, adapters = load_peft_adapter(path, config)
    return config, merged_params(params, adapters, lora)


# ------------------------------------------------------------------ LoRA runs
def read_lora_record(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``lora.json`` of a LoRA run directory (None when there is none)."""
    record = local_path(run_dir) / LORA_RECORD
    return load_json(record, "LoRA run record") if record.is_file() else None


def lora_quant_config(bits: int, group_size: int) -> QuantConfig | None:
    """The QLoRA base quantization recorded as ``quantize_bits`` / ``quant_group_size``."""
    return QuantConfig(bits=bits, group_size=group_size or None) if bits else None


def load_lora_base(
    init_from: str, model_config: ModelConfig, shardings, seed: int, quant=None
) -> dict[str, Any]:
    """The frozen base of a LoRA run on ``shardings``: loaded (float, then quantized for
    QLoRA) from ``init_from``, or, without one, the random model of seed ``seed + 1``.

    Args:
      shardings: shaped like the base as it is used (quantized when ``quant`` is given).
    """
    mesh = jax.tree.leaves(shardings)[0].mesh
    float_shardings = (
        shardings
        if quant is None
        else param_shardings(model_config, abstract_params(model_config), mesh)
    )
    if init_from:
        _, params = load_model(
            init_from, shardings=float_shardings, param_dtype=model_config.param_dtype
        )
    else:
        params = jax.jit(
            lambda: init_params(model_config, jax.random.PRNGKey(seed + 1)),
            out_shardings=float_shardings,
        )()
    if quant is None:
        return params
    return jax.jit(lambda p: quantize_params(model_config, p, quant), out_shardings=shardings)(
        params
    )


def load_lora_run(run_dir: str | os.PathLike, step: int | None = None):
    """Everything a LoRA run directory describes, on the first device.

    Args:
      run_dir: the training workdir of a LoRA run (it holds ``lora.json``).
      step: which checkpoint; default the latest complete one.

    Returns:
      ``(model_config, base params, adapters, lora config, record)``; the base is
      quantized again when the run trained on a quantized base (QLoRA).
    """
    run_dir = local_path(run_dir).absolute()
    record = read_lora_record(run_dir)
    if record is None:
        raise LoraError(f"{run_dir} has no {LORA_RECORD}: it is not a LoRA run directory.")
    model_config = ModelConfig.from_dict(record["model_config"])
    lora = LoraConfig(**record["lora"])
    quant = lora_quant_config(record.get("quantize_bits", 0), record.get("quant_group_size", 0))
    step_dir = run_dir / "checkpoints" / str(step) if step is not None else latest_step_dir(run_dir)
    if step_dir is None or not step_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint (step {step}).")
    mesh = _one_device_mesh()
    ad_abstract = abstract_adapters(model_config, lora)
    ad_shard = logical_to_sharding(adapter_logical_axes(model_config, lora), ad_abstract, mesh)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), ad_abstract, ad_shard
    )
    restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
        step_dir, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)})
    )
    base_abstract = (
        abstract_params(model_config)
        if quant is None
        else abstract_quantized_params(model_config, quant)
    )
    base_shard = param_shardings(model_config, base_abstract, mesh)
    base = load_lora_base(
        record["init_from"], model_config, base_shard, record.get("seed", 0), quant
    )
    return model_config, base, restored[PARAMS], lora, record


def merged_params(base: dict[str, Any], adapters: dict[str, Any], lora: LoraConfig):
    """``merge`` under jit, fetched to host numpy arrays."""
    return jax.device_get(jax.jit(lambda b, a: merge_adapters(b, a, lora))(base, adapters))


def _one_device_mesh() -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape((1,) * len(AXES)), AXES)


# ------------------------------------------------------------------ tokenizers
def find_tokenizer(path: str | os.PathLike) -> Path | None:
    """Where the tokenizer of a model path lives, if anywhere.

    ``path`` may be a tokenizer itself (a ``tokenizer.json`` / sentencepiece file or a
    folder holding one), any kind of model folder, or a step directory of a run (whose
    tokenizer sits in the run directory). A PEFT adapter folder without its own tokenizer
    uses its base model's.
    """
    path = local_path(path, weights=False)
    if path.is_file():
        return path
    candidates = [path, path / TOKENIZER_DIR]
    step_dir = latest_step_dir(path) if path.is_dir() else None
    if step_dir is not None:
        candidates += [step_dir / TOKENIZER_DIR]
    candidates += [path.parent / TOKENIZER_DIR, path.parent.parent / TOKENIZER_DIR]
    for c in candidates:
        if c.is_dir() and ((c / "tokenizer.json").is_file() or any(c.glob("*.model"))):
            return c
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        return find_tokenizer(peft_base(path, weights=False))
    return None


def model_generation_config(path: str | os.PathLike) -> GenerationDefaults | None:
    """The generation config of the model at ``path`` (``data.generation_config``): its
    Hugging Face folder's (a PEFT adapter's own, else its base's), or the one our
    checkpoints and runs keep with their tokenizer files; None when it has none."""
    path = local_path(path, weights=False)
    kind = artifact_kind(path)
    if kind in ("hf", "peft") and (found := read_generation_config(path)) is not None:
        return found
    if kind == "peft":
        return model_generation_config(peft_base(path, weights=False))
    if kind == "hf":
        return None
    folder = find_tokenizer(path)
    if folder is None:
        return None
    return read_generation_config(folder if folder.is_dir() else folder.parent)


def tokenizer_for(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer at ``path`` or beside the model at ``path`` (see ``find_tokenizer``)."""
    found = find_tokenizer(path)
    if found is None:
        raise UserError(
            f"no tokenizer found at or beside {path}; pass a tokenizer path (a "
            "tokenizer.json, a sentencepiece .model or a folder holding one)."
        )
    return load_tokenizer(found)


def load_model_and_tokenizer(
    checkpoint: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    *,
    dtype: str | None = None,
    attention_impl: str | None = None,
    rope_scaling_type: str | None = None,
    rope_scaling_factor: float | None = None,
    shardings: Any = None,
    mesh: jax.sharding.Mesh | None = None,
):
    """``(config, params, tokenizer)`` for any model folder, with load-time overrides.

    Args:
      checkpoint: any kind of model folder (see ``load_model``).
      tokenizer: tokenizer file or folder; default the one found beside the checkpoint.
        The generation config (eos ids, sampling defaults) is the model's
        (``model_generation_config``) whenever the model has one, as in transformers,
        where it belongs to the model, not to the tokenizer; else the tokenizer folder's.
      dtype, attention_impl: ``ModelConfig`` overrides ("" / None keeps the checkpoint's).
      rope_scaling_type, rope_scaling_factor: "linear" or "ntk" and a factor >= 1, to
        run past the trained context (position interpolation, Chen et al. 2023; NTK-aware
        base scaling); "none" removes a scaling stored in the checkpoint.
      shardings, mesh: where to place the params (see ``load_model``).
    """
    overrides: dict[str, Any] = {}
    if dtype:
        overrides["dtype"] = dtype
    if attention_impl:
        overrides["attention_impl"] = attention_impl
    if rope_scaling_type:
        overrides["rope_scaling"] = rope_scaling_override(rope_scaling_type, rope_scaling_factor)
    artifact_kind(checkpoint)  # a missing or foreign model folder fails first, ...
    tok = tokenizer_for(tokenizer or checkpoint)  # ... then a missing tokenizer, both fast
    if tokenizer is not None and (generation := model_generation_config(checkpoint)):
        tok.generation = generation  # the model's folder decides its eos ids and defaults
    config, params = load_model(checkpoint, shardings=shardings, mesh=mesh, **overrides)
    return config, params, tok


def rope_scaling_override(kind: str, factor: float | None) -> dict[str, Any] | None:
    """The ``rope_scaling`` value for ``load_model`` from CLI/config fields.

    Args:
      kind: "linear", "ntk", or "none" (remove any scaling).
      factor: the scaling factor (>= 1); required unless ``kind`` is "none".
    """
    if kind == "none":
        return None
    if factor is None or float(factor) < 1.0:
        raise UserError(
            f"rope_scaling_type={kind!r} needs rope_scaling_factor >= 1 (e.g. 2.0 to run a "
            f"2048-position model on 4096 tokens), got {factor!r}."
        )
    return {"type": kind, "factor": float(factor)}


def load_from_config(config, *, mesh: jax.sharding.Mesh | None = None):
    """``load_model_and_tokenizer`` from the model-source block of ``configs/common.py``
    (``checkpoint``, ``tokenizer``, ``dtype``, ``attention_impl``, ``rope_scaling_type``,
    ``rope_scaling_factor``), as sample, serve, evaluate, embed and rag use it."""
    if not config.checkpoint:
        raise UserError("no model: pass --config.checkpoint=PATH (checkpoint, run or HF dir).")
    return load_model_and_tokenizer(
        config.checkpoint,
        config.tokenizer or None,
        dtype=config.dtype or None,
        attention_impl=config.attention_impl or None,
        rope_scaling_type=config.rope_scaling_type or None,
        rope_scaling_factor=config.rope_scaling_factor,
        mesh=mesh,
    )

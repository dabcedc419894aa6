"""LoRA adapters in PEFT's on-disk format, both ways.

``peft.PeftModel.save_pretrained`` writes ``adapter_config.json`` and
``adapter_model.safetensors`` (older peft, or ``safe_serialization=False``: the same tensors
in a torch pickle, ``adapter_model.bin``, read here with ``weights_only=True``); for
``GPTNeoXForCausalLM`` the tensors are named::

    base_model.model.gpt_neox.layers.{i}.attention.query_key_value.lora_A.weight  [r, in]
    base_model.model.gpt_neox.layers.{i}.attention.query_key_value.lora_B.weight  [out, r]

(the same for ``attention.dense``, ``mlp.dense_h_to_4h``, ``mlp.dense_4h_to_h``); for the
Llama/Mistral/Qwen classes ``base_model.model.model.layers.{i}.self_attn.q_proj...`` (and
``k_proj``, ``v_proj``, ``o_proj``, ``mlp.gate_proj``, ``mlp.up_proj``, ``mlp.down_proj``). They are
torch ``nn.Linear`` weights, ``[out, in]``, so ours (``A [L, in, r]``, ``B [L, r, out]``) are
transposed per layer; nothing else changes. The update is ``lora_alpha / r`` (or
``/ sqrt(r)`` with ``use_rslora``) times ``B @ A`` in both libraries.

Importing checks the adapter against the model it is meant for: every tensor must name a
layer the model has and have the shape the model implies, and settings we cannot honour
(DoRA, LoRA biases, per-module ranks, ``modules_to_save``) are refused by name. Layers that
an adapter leaves out (``layers_to_transform``) get zero adapters, which add nothing.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from neox_jax.atomic import atomic_directory
from neox_jax.errors import load_json
from neox_jax.finetune.lora import (
    EXPERT_TARGETS,
    TARGETS,
    LoraConfig,
    LoraError,
    abstract_adapters,
    model_targets,
    target_shapes,
)
from neox_jax.model import ModelConfig
from neox_jax.model.shapes import describe, shape_mismatches
from neox_jax.torch_state import load_torch_state, torch_to_numpy

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"  # older peft; read when there is no safetensors file
_KEY = re.compile(r"^(base_model\.model\.\w+\.layers)\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight$")


def _hf_suffix(config: ModelConfig, target: str) -> str:
    """The module of ``target`` inside a Hugging Face decoder layer of ``config``'s class."""
    if config.model_type == "gpt_neox":
        return ".".join(TARGETS[target])
    return f"{'mlp' if TARGETS[target][0] == 'mlp' else 'self_attn'}.{target}"


def _hf_layers(config: ModelConfig) -> str:
    """PEFT's prefix of the decoder layers: ``gpt_neox.layers`` or ``model.layers``."""
    return f"base_model.model.{'gpt_neox' if config.model_type == 'gpt_neox' else 'model'}.layers"


def _family(config: ModelConfig) -> str:
    return "GPT-NeoX" if config.model_type == "gpt_neox" else config.model_type.capitalize()


def _hf_module(config: ModelConfig, target: str, layer: int) -> str:
    return f"{_hf_layers(config)}.{layer}.{_hf_suffix(config, target)}"


def check_peft_exportable(lora: LoraConfig) -> None:
    """Raise ``LoraError`` when PEFT's format cannot hold ``lora``'s adapters (before
    anything of an export is written)."""
    experts = [t for t in lora.targets if t in EXPERT_TARGETS]
    if experts:
        raise LoraError(
            f"LoRA targets {experts} adapt every expert separately; PEFT has no module for "
            "them (transformers holds the experts as fused parameters). Nothing was written; "
            "export the merged model instead (neox_jax.finetune.export with --config.hf_out "
            "and no --config.peft_out; in Python, lora.merge then save_hf)."
        )


def save_peft_adapter(
    config: ModelConfig,
    adapters: dict[str, Any],
    lora: LoraConfig,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str = "",
    overwrite: bool = False,
) -> Path:
    """Write ``adapters`` as a PEFT LoRA adapter folder (atomically).

    Args:
      config: the base model's config.
      adapters: ``init_adapters``-shaped tree (host or device arrays).
      lora: the adapter's settings.
      path: destination folder (absent or empty unless ``overwrite``).
      base_model_name_or_path: recorded in ``adapter_config.json`` for PEFT.

    Returns:
      The absolute path written.
    """
    path = Path(path).absolute()
    check_peft_exportable(lora)
    expected = abstract_adapters(config, lora)
    bad = shape_mismatches(adapters, expected)
    if bad:  # numpy would index past a short layer stack; a wrong rank is written as is
        raise LoraError(
            f"The adapters do not match the base config and lora settings ({describe(config)}, "
            f"rank={lora.rank}, targets={list(lora.targets)}): "
            + "; ".join(bad[:4])
            + ". Nothing was written."
        )
    tensors = {}
    for t in lora.targets:
        group, name = TARGETS[t]
        a = np.asarray(adapters["layers"][group][name]["lora_a"], np.float32)  # [L, in, r]
        b = np.asarray(adapters["layers"][group][name]["lora_b"], np.float32)  # [L, r, out]
        for i in range(config.num_hidden_layers):
            tensors[f"{_hf_module(config, t, i)}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{_hf_module(config, t, i)}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": [_hf_suffix(config, t) for t in lora.targets],
        "use_rslora": lora.rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    with atomic_directory(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
    return path


def _refuse_unsupported(cfg: dict[str, Any], where: Path) -> None:
    checks = [
        (cfg.get("peft_type") != "LORA", f"peft_type is {cfg.get('peft_type')!r}, not 'LORA'"),
        (bool(cfg.get("use_dora")), "it is a DoRA adapter (use_dora)"),
        (cfg.get("bias", "none") != "none" or cfg.get("lora_bias"), "it trains biases"),
        (bool(cfg.get("fan_in_fan_out")), "fan_in_fan_out is set (GPT-NeoX uses nn.Linear)"),
        (bool(cfg.get("modules_to_save")), "it saves whole modules (modules_to_save)"),
        (
            bool(cfg.get("rank_pattern")) or bool(cfg.get("alpha_pattern")),
            "it has per-module ranks or alphas (rank_pattern/alpha_pattern)",
        ),
    ]
    for bad, why in checks:
        if bad:
            raise LoraError(f"Cannot import the adapter in {where}: {why}.")


def _read_weights(file: Path) -> dict[str, np.ndarray]:
    """The tensors of an adapter file (safetensors, or a torch pickle read safely)."""
    if file.name == ADAPTER_PICKLE:
        state = load_torch_state(
            file, what=f"reading {file}", safetensors_name=ADAPTER_WEIGHTS, error=LoraError
        )
        return {k: torch_to_numpy(v) for k, v in state.items() if hasattr(v, "numpy")}
    try:
        return load_file(str(file))
    except SafetensorError as e:
        raise LoraError(
            f"{file} is truncated or not a safetensors file ({e}); copy it again."
        ) from None


def load_peft_adapter(
    path: str | os.PathLike, config: ModelConfig, *, expected_base: str | None = None
) -> tuple[LoraConfig, dict[str, Any]]:
    """Read a PEFT LoRA adapter for the model ``config`` describes.

    Args:
      path: folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or
        ``adapter_model.bin``).
      config: the base model's config; shapes and layer count are checked against it.
      expected_base: if given, the adapter's ``base_model_name_or_path`` (when set) must
        name the same model (equal, or the same last path component).

    Returns:
      ``(lora config, adapters)`` with adapters an ``init_adapters``-shaped numpy tree.
    """
    path = Path(path)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file() and (path / ADAPTER_PICKLE).is_file():
        weights = path / ADAPTER_PICKLE
    if not (path / ADAPTER_CONFIG).is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{path} needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (or {ADAPTER_PICKLE})."
        )
    cfg = load_json(path / ADAPTER_CONFIG, "PEFT adapter config")
    _refuse_unsupported(cfg, path)
    base = cfg.get("base_model_name_or_path")
    if expected_base and base and _name(base) != _name(expected_base):
        raise LoraError(
            f"The adapter in {path} was made for {base!r}, not {expected_base!r}; load it on "
            "the model it was trained on."
        )
    found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    by_suffix = {_hf_suffix(config, t): t for t in model_targets(config)}
    for key, value in _read_weights(weights).items():
        m = _KEY.match(key)
        if m is None or m[1] != _hf_layers(config):
            raise LoraError(
                f"{weights} holds {key!r}, which is not a LoRA weight of a "
                f"{_family(config)} block linear layer (under {_hf_layers(config)}); this "
                "adapter is for another architecture."
            )
        layer, suffix, ab = int(m[2]), m[3], m[4]
        target = by_suffix.get(suffix)
        if target is None:
            raise LoraError(
                f"{key!r}: this {_family(config)} model has no {suffix}; its layers are "
                f"{', '.join(by_suffix)}."
            )
        if layer >= config.num_hidden_layers:
            raise LoraError(
                f"{key!r} adapts layer {layer}, but the model has {config.num_hidden_layers} "
                "layers: the adapter was made for a different base model."
            )
        found.setdefault(target, {}).setdefault(layer, {})[ab] = value
    if not found:
        raise LoraError(f"{weights} holds no LoRA weights.")
    rank = int(cfg["r"])
    lora = LoraConfig(
        targets=tuple(t for t in model_targets(config) if t in found),
        rank=rank,
        alpha=float(cfg.get("lora_alpha", rank)),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        rslora=bool(cfg.get("use_rslora", False)),
    )
    shapes = target_shapes(config, lora)
    tree: dict[str, Any] = {}
    n = config.num_hidden_layers
    for t, layers in found.items():
        d_in, d_out = shapes[t]
        a = np.zeros((n, d_in, rank), np.float32)
        b = np.zeros((n, rank, d_out), np.float32)
        for i, pair in layers.items():
            module = _hf_module(config, t, i)
            for ab, want, dst in (("A", (rank, d_in), a), ("B", (d_out, rank), b)):
                if ab not in pair:
                    raise LoraError(f"{module} has no lora_{ab}.weight in {path}.")
                if pair[ab].shape != want:
                    raise LoraError(
                        f"{module}.lora_{ab}.weight has shape {pair[ab].shape}, but "
                        f"this model (hidden {config.hidden_size}, intermediate "
                        f"{config.intermediate_size}) with r={rank} needs {want}: the adapter "
                        "was made for a different base model."
                    )
                dst[i] = pair[ab].astype(np.float32).T
        group, name = TARGETS[t]
        tree.setdefault(group, {})[name] = {"lora_a": a, "lora_b": b}
    return lora, {"layers": tree}


def _name(ref: str) -> str:
    return Path(str(ref).rstrip("/")).name

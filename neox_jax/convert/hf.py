"""Hugging Face checkpoints <-> neox_jax parameters: ``GPTNeoXForCausalLM`` here, and
the Llama-style families (Llama, Mistral, Qwen2, Qwen3) through the tables of
``neox_jax.convert.hf_families``, chosen by ``model_type``.

The name map below is the whole conversion. Hugging Face stores ``nn.Linear.weight``
as ``[out, in]``; we store ``kernel`` as ``[in, out]``, so linear weights are
transposed and nothing else changes. In particular the fused
``attention.query_key_value`` keeps its per-head ``[q|k|v]`` output order in both
formats (documented once, in ``neox_jax.model.layers``). Layers are stacked on a
leading axis on our side (the scanned ``layers`` subtree).

Loading goes tensor by tensor into preallocated arrays of the target dtype, so a
checkpoint never needs twice its size in host memory.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from neox_jax.atomic import atomic_directory
from neox_jax.convert import hf_families
from neox_jax.convert.hf_families import ConversionError
from neox_jax.convert.hf_tokenizer import special_token_ids, write_hf_tokenizer
from neox_jax.errors import load_json
from neox_jax.model import ModelConfig, abstract_params
from neox_jax.model.shapes import check_params
from neox_jax.torch_state import load_torch_state, torch_to_numpy

# HF name (with {i} for the layer) -> (our path, transpose?)
LAYER_MAP = {
    "gpt_neox.layers.{i}.input_layernorm.weight": ("layers/input_layernorm/scale", False),
    "gpt_neox.layers.{i}.input_layernorm.bias": ("layers/input_layernorm/bias", False),
    "gpt_neox.layers.{i}.post_attention_layernorm.weight": (
        "layers/post_attention_layernorm/scale",
        False,
    ),
    "gpt_neox.layers.{i}.post_attention_layernorm.bias": (
        "layers/post_attention_layernorm/bias",
        False,
    ),
    "gpt_neox.layers.{i}.attention.query_key_value.weight": (
        "layers/attention/query_key_value/kernel",
        True,
    ),
    "gpt_neox.layers.{i}.attention.query_key_value.bias": (
        "layers/attention/query_key_value/bias",
        False,
    ),
    "gpt_neox.layers.{i}.attention.dense.weight": ("layers/attention/dense/kernel", True),
    "gpt_neox.layers.{i}.attention.dense.bias": ("layers/attention/dense/bias", False),
    "gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight": ("layers/mlp/dense_h_to_4h/kernel", True),
    "gpt_neox.layers.{i}.mlp.dense_h_to_4h.bias": ("layers/mlp/dense_h_to_4h/bias", False),
    "gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight": ("layers/mlp/dense_4h_to_h/kernel", True),
    "gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias": ("layers/mlp/dense_4h_to_h/bias", False),
}
GLOBAL_MAP = {
    "gpt_neox.embed_in.weight": ("embed_in/embedding", False),
    "gpt_neox.final_layer_norm.weight": ("final_layer_norm/scale", False),
    "gpt_neox.final_layer_norm.bias": ("final_layer_norm/bias", False),
    "embed_out.weight": ("embed_out/kernel", True),
}
# transformers 5 names the output projection lm_head in memory (embed_out on disk); a
# state_dict saved by hand therefore carries lm_head.weight.
ALIASES = {"lm_head.weight": "embed_out.weight"}
# Buffers that old checkpoints carry and that hold no parameters.
IGNORED = re.compile(r".*\.(attention|self_attn)\.(bias|masked_bias|rotary_emb\.inv_freq)$")

DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
TORCH_SINGLE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"


# -------------------------------------------------------------------- config
# Sizes config.json must state (everything else has transformers' default).
REQUIRED_HF_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
)  # fmt: skip


def config_from_hf(hf: dict[str, Any], **overrides) -> ModelConfig:
    """``ModelConfig`` from a Hugging Face ``config.json`` dict (either rotary spelling).

    Old files carry ``rotary_pct``/``rotary_emb_base`` (+ ``rope_scaling``); transformers 5
    writes ``rope_parameters: {partial_rotary_factor, rope_theta, rope_type, ...}``. Every
    RoPE type the families read (linear, dynamic, yarn, llama3) reads here too: transformers'
    GPT-NeoX takes them all.
    """
    hf_families.check_supported(hf)
    if hf["model_type"] != "gpt_neox":
        return hf_families.config_from_hf(hf, **overrides)
    base, rotary_pct, scaling = hf_families.rope_from_hf(hf, default_partial=0.25)
    missing = [k for k in REQUIRED_HF_KEYS if k not in hf]
    if missing:
        raise ConversionError(
            f"config.json lacks {', '.join(missing)}: every GPT-NeoX config.json names "
            f"{', '.join(REQUIRED_HF_KEYS)}; restore the file from the original checkpoint."
        )
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        hidden_act=hf.get("hidden_act", "gelu"),
        rotary_pct=float(rotary_pct),
        rotary_emb_base=float(base),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
        use_parallel_residual=hf.get("use_parallel_residual", True),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", True),
        rope_scaling=scaling,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def config_to_hf(config: ModelConfig, dtype: str = "float32", **extra) -> dict[str, Any]:
    """A ``config.json`` dict that transformers 4.x and 5.x both read."""
    if config.model_type != "gpt_neox":
        return {**hf_families.config_to_hf(config, dtype), **extra}
    _check_neox_exportable(config)
    out = {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": config.hidden_act,
        "rotary_pct": config.rotary_pct,
        "rotary_emb_base": config.rotary_emb_base,
        "max_position_embeddings": config.max_position_embeddings,
        "layer_norm_eps": config.layer_norm_eps,
        "use_parallel_residual": config.use_parallel_residual,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    scaling = config.rope_scaling_dict or {}
    if scaling.get("type") in hf_families.HF_ROPE_TYPES:
        kind = scaling.pop("type")
        out["rope_scaling"] = {"rope_type": kind, **scaling}
    elif scaling.get("type") == "ntk" and config.rotary_ndims > 2:
        # Static NTK-aware scaling is a larger rotary base (model/layers.py rotary_inv_freq);
        # transformers has no static NTK type, so the exported base carries it exactly.
        rd = config.rotary_ndims
        out["rotary_emb_base"] = config.rotary_emb_base * scaling["factor"] ** (rd / (rd - 2))
    elif scaling:
        raise ConversionError(f"rope_scaling {scaling} has no Hugging Face equivalent.")
    out.update(extra)
    return out


def _check_neox_exportable(config: ModelConfig) -> None:
    """Refuse family options ``GPTNeoXForCausalLM`` has no field for: transformers would
    build a different model from the config.json (or the weights would not fit it)."""
    wrong = [
        f"{name}={getattr(config, name)!r}"
        for name, neox in (
            ("norm_type", "layernorm"), ("gated_mlp", False), ("mlp_bias", True),
            ("fused_qkv", True), ("qk_norm", False), ("sliding_window", None),
            ("num_experts", 0),
        )
        if getattr(config, name) != neox
    ]  # fmt: skip
    if config.kv_heads != config.num_attention_heads:
        wrong.append(f"num_key_value_heads={config.num_key_value_heads}")
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        wrong.append(f"head_dim_override={config.head_dim_override}")
    if config.out_bias != config.attention_bias:
        wrong.append(f"attention_out_bias={config.attention_out_bias}")
    if wrong:
        raise ConversionError(
            f"A gpt_neox model with {', '.join(wrong)} cannot be written as a "
            "GPTNeoXForCausalLM (it has no such option). Train such a model with the "
            "family that has it, e.g. --config.model.model_type=llama (or mistral, qwen2, "
            "qwen3, qwen3_moe), or keep it as a neox_jax checkpoint."
        )


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path} is not a directory; pass a Hugging Face checkpoint folder.")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{path} has no config.json; is it a Hugging Face checkpoint?")
    return load_json(cfg_file, "model config")


def is_hf_folder(path: str | os.PathLike) -> bool:
    """A folder in Hugging Face's layout: a ``config.json`` that names a ``model_type`` or
    ``architectures`` (``config_from_hf`` says which of those it cannot read).

    (A training run directory has a ``config.json`` too, our run config, with neither.)
    """
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return False
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True  # an HF folder with a broken config.json: read_hf_config says so
    return isinstance(config, dict) and ("model_type" in config or "architectures" in config)


def has_hf_weights(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds Hugging Face model weights (safetensors or torch, single or
    sharded), as opposed to, e.g., a PEFT adapter folder with its base's config.json."""
    return any(
        (Path(path) / f).is_file() for f in (SAFE_SINGLE, SAFE_INDEX, TORCH_SINGLE, TORCH_INDEX)
    )


# ------------------------------------------------------------------- loading
def _iter_hf_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` one tensor at a time from safetensors or torch files."""
    if (path / SAFE_INDEX).is_file() or (path / SAFE_SINGLE).is_file():
        from safetensors import SafetensorError, safe_open

        for file in _shard_files(path, SAFE_INDEX, SAFE_SINGLE):
            try:
                with safe_open(str(file), framework="numpy") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                        yield name, f.get_tensor(name)
            except SafetensorError as e:
                raise ConversionError(
                    f"{file} is truncated or not a safetensors file ({e}); download or copy "
                    "it again."
                ) from None
    elif (path / TORCH_INDEX).is_file() or (path / TORCH_SINGLE).is_file():
        for file in _shard_files(path, TORCH_INDEX, TORCH_SINGLE):
            state = load_torch_state(
                file,
                what=f"reading {path}'s pytorch_model.bin files",
                safetensors_name="model.safetensors",
                error=ConversionError,
            )
            for name in list(state):
                tensor = state.pop(name)
                yield name, torch_to_numpy(tensor)
            del state
    else:
        raise ConversionError(
            f"{path} has no weights: expected {SAFE_SINGLE}, {SAFE_INDEX}, {TORCH_SINGLE} "
            f"or {TORCH_INDEX}."
        )


def _shard_files(path: Path, index_name: str, single_name: str) -> list[Path]:
    if (path / index_name).is_file():
        try:
            weight_map = load_json(path / index_name, "shard index")["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConversionError(f"{path / index_name} is not a valid index file: {e}") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
    else:
        files = [path / single_name]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConversionError(f"Checkpoint shards listed by the index are missing: {missing}")
    return files


def _hf_name_table(config: ModelConfig) -> dict[str, tuple[str, bool, int | None]]:
    """Every HF tensor name this config needs -> (our path, transpose, layer or None)."""
    if config.model_type != "gpt_neox":
        return hf_families.name_table(config)
    table = {}
    for name, (ours, t) in GLOBAL_MAP.items():
        if name == "embed_out.weight" and config.tie_word_embeddings:
            continue
        table[name] = (ours, t, None)
    for i in range(config.num_hidden_layers):
        for name, (ours, t) in LAYER_MAP.items():
            if (
                not config.attention_bias
                and name.endswith(("query_key_value.bias", "dense.bias"))
                and ".attention." in name
            ):
                continue
            table[name.format(i=i)] = (ours, t, i)
    return table


def load_hf(
    path: str | os.PathLike, *, param_dtype: str = "float32", **config_overrides
) -> tuple[ModelConfig, dict[str, Any]]:
    """Read a Hugging Face GPT-NeoX, Llama, Mistral, Qwen2 or Qwen3 directory.

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` (single or sharded with
        its index), or legacy ``pytorch_model.bin`` (read with ``weights_only=True``).
      param_dtype: dtype of the returned arrays ("float32", "bfloat16", "float16").
      **config_overrides: ModelConfig fields to set (``dtype``, ``attention_impl``, ...).

    Returns:
      ``(config, params)`` with params a tree of numpy arrays in our layout.
    """
    path = Path(path)
    config = config_from_hf(read_hf_config(path), param_dtype=param_dtype, **config_overrides)
    return config, params_from_hf_tensors(config, _iter_hf_tensors(path), str(path))


def params_from_hf_tensors(
    config: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], source: str
) -> dict[str, Any]:
    """Our params (numpy, ``config.param_dtype``) from ``(HF name, array)`` pairs.

    Every tensor's shape is checked against ``config``; a name that is not a GPT-NeoX
    parameter, or a parameter never given, raises ``ConversionError`` naming ``source``.
    Other formats (GPT-NeoX's own layer files) reuse this once their tensors carry HF names.
    """
    path = source
    target = DTYPES[config.param_dtype]
    shapes = flatten_dict(abstract_params(config), sep="/")
    # Zeros where a mixed dense/sparse stack has slots no tensor fills (model/moe.py).
    alloc = np.zeros if config.mixed_mlp else np.empty
    params = {k: alloc(s.shape, target) for k, s in shapes.items()}
    table = _hf_name_table(config)
    seen: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in tensors:
        if config.model_type == "gpt_neox":
            name = ALIASES.get(name, name)
        if IGNORED.match(name):
            continue
        if name in ("embed_out.weight", "lm_head.weight") and config.tie_word_embeddings:
            continue  # tied checkpoints may still carry a copy of the embedding
        if name not in table:
            unexpected.append(name)
            continue
        ours, transpose, index = table[name]
        index = _index(index)  # () whole, (layer,) or (layer, expert)
        value = tensor.T if transpose else tensor
        expected = shapes[ours].shape[len(index) :]
        if value.shape != tuple(expected):
            hf_shape = tuple(expected[::-1]) if transpose else tuple(expected)
            raise ConversionError(
                f"Tensor {name} has shape {tuple(tensor.shape)} but the model config implies "
                f"{hf_shape}; the weights do not match the config."
            )
        params[ours][index] = value
        seen.add(name)
    if unexpected:
        raise ConversionError(
            f"{len(unexpected)} tensors are not part of a "
            f"{hf_families.NAMES[config.model_type]} model of this config.json, e.g. "
            f"{unexpected[:5]}; is {path} a "
            f"{hf_families.ARCHITECTURES[config.model_type]} checkpoint?"
        )
    missing = sorted(set(table) - seen)
    if missing:
        raise ConversionError(
            f"{path} lacks {len(missing)} tensors the config needs, e.g. {missing[:5]}; "
            "the checkpoint is incomplete."
        )
    return unflatten_dict(params, sep="/")


def _index(index: int | tuple[int, ...] | None) -> tuple[int, ...]:
    """A name table's index (None, a layer, or (layer, expert)) as a tuple."""
    if index is None:
        return ()
    return index if isinstance(index, tuple) else (index,)


# -------------------------------------------------------------------- saving
def _parse_size(size: int | str) -> int:
    """Bytes in ``size`` as transformers' ``max_shard_size`` counts them: KB/MB/GB are
    decimal (5GB = 5 * 10**9), KiB/MiB/GiB binary."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMG])(I?)B?)?\s*", size.upper())
    if not m:
        raise ValueError(f"Cannot parse size {size!r}; use e.g. 5GB, 500MB, 1GiB or a byte count.")
    power = " KMG".index(m.group(2) or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def _hf_tensors(
    config: ModelConfig, params: dict[str, Any], dtype
) -> Iterator[tuple[str, np.ndarray]]:
    flat = flatten_dict(params, sep="/")
    for name, (ours, transpose, index) in _hf_name_table(config).items():
        value = np.asarray(flat[ours][_index(index)])
        value = value.T if transpose else value
        yield name, np.ascontiguousarray(value.astype(dtype))


def save_hf(
    config: ModelConfig,
    params: dict[str, Any],
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    max_shard_size: int | str = "5GB",
    tokenizer_dir: str | os.PathLike | None = None,
    chat_template: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a folder that transformers' ``<family>ForCausalLM.from_pretrained`` loads
    (``config.model_type`` picks the family).

    Shards ``model.safetensors`` above ``max_shard_size`` (with the index file). The
    folder is written under a temporary name and renamed at the end, so a failure
    leaves nothing partial at ``path``. The tokenizer of ``tokenizer_dir`` (when given) is
    written as a ``tokenizer.json`` + ``tokenizer_config.json`` that transformers'
    ``AutoTokenizer`` reads into the same ids (a sentencepiece model is converted; see
    ``hf_tokenizer``), with ``chat_template`` in the config when given. config.json
    names that tokenizer's bos/eos/pad ids (``hf_tokenizer.special_token_ids``: for a
    folder converted from Hugging Face, the source config's own); without a tokenizer, a
    gpt_neox export says 0/0 (Pythia's) and the other families keep their class defaults.
    """
    path = Path(path).absolute()
    limit = _parse_size(max_shard_size)
    np_dtype = DTYPES[dtype]
    hf_config = config_to_hf(config, dtype=dtype)  # refuses what the class cannot hold
    check_params(config, params, what="params to export")
    with atomic_directory(path, overwrite=overwrite) as tmp:
        _write_shards(_hf_tensors(config, params, np_dtype), tmp, limit)
        if tokenizer_dir is not None:
            tok = write_hf_tokenizer(tokenizer_dir, tmp, chat_template)
            hf_config.update(special_token_ids(tok))  # not a class default (see above)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return path


def _write_shards(tensors: Iterator[tuple[str, np.ndarray]], out: Path, limit: int) -> None:
    """Group tensors into safetensors files of at most ``limit`` bytes (one tensor may exceed).

    Not huggingface_hub's ``split_*_state_dict_into_shards``: that plans from the whole
    state dict in memory, while this writes each shard as the tensors stream in (host
    memory holds one shard, not a 20B model's 40 GB)."""
    from safetensors.numpy import save_file

    files: list[dict[str, np.ndarray]] = []
    current: dict[str, np.ndarray] = {}
    size = total = 0
    names: list[str] = []

    def flush():
        name = f"part-{len(names):05d}.safetensors"
        save_file(current, str(out / name), metadata={"format": "pt"})
        names.append(name)
        files.append(dict.fromkeys(current))  # keep only the keys, free the arrays

    for name, value in tensors:
        if current and size + value.nbytes > limit:
            flush()
            current, size = {}, 0
        current[name] = value
        size += value.nbytes
        total += value.nbytes
    flush()
    if len(names) == 1:
        os.replace(out / names[0], out / SAFE_SINGLE)
        return
    n = len(names)  # conventional names need the shard count, known only now
    weight_map = {}
    for i, (old, keys) in enumerate(zip(names, files, strict=True)):
        new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out / old, out / new)
        weight_map.update(dict.fromkeys(keys, new))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")

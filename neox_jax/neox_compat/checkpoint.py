"""GPT-NeoX's native DeepSpeed pipeline checkpoints read into neox_jax params.

A GPT-NeoX run saves ``<save>/global_stepN/`` (and ``<save>/latest`` naming that tag),
holding one file per pipeline layer with parameters and tensor-parallel rank,
``layer_XX-model_YY-model_states.pt`` (a plain dict of tensors), and the run's config
files under ``configs/``. The layer numbering (GPT-NeoX ``megatron/model/gpt2_model.py``;
its ``tools/ckpts/convert_neox_to_hf.py`` reads the same):

====================  =========================================================
``layer_00``          ``word_embeddings.weight`` (vocab rows split across ranks)
``layer_02 .. N+1``   transformer layer ``i`` in file ``i + 2``
``layer_{N+3}``       the final ``norm.weight`` / ``norm.bias``
``layer_{N+4}``       ``final_linear.weight`` (untied models only; vocab rows split)
====================  =========================================================

Ranks merge as that converter merges them: column-parallel weights and biases
(``query_key_value``, ``dense_h_to_4h``/``linear1``, the embeddings) concatenate along
their output rows (dim 0, torch's ``[out, in]``), row-parallel weights (``attention.dense``,
``dense_4h_to_h``/``linear2``) along their input columns (dim 1), LayerNorm parameters
(replicated) are averaged. Row-parallel biases are summed when the residual is parallel
(each rank adds its copy before the one all-reduce, GPT-NeoX's ``gpt_j_residual``; the
converter always sums, and every Pythia model is parallel) and taken from rank 0 for a
sequential residual (added once, after the all-reduce). Files are read with
``torch.load(weights_only=True)``, never unpickling arbitrary objects.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from neox_jax.convert.hf import params_from_hf_tensors
from neox_jax.errors import UserError
from neox_jax.model import ModelConfig
from neox_jax.neox_compat.config import read_configs, translate
from neox_jax.optional import require

LAYER_FILE = "layer_{layer:02d}-model_{rank:02d}-model_states.pt"
_RANK = re.compile(r"layer_00-model_(\d+)-model_states\.pt$")
# GPT-NeoX layer key -> HF name suffix; "legacy" and "new" MLP names both occur.
COLUMN = {
    "attention.query_key_value.weight": "attention.query_key_value.weight",
    "attention.query_key_value.bias": "attention.query_key_value.bias",
    "mlp.dense_h_to_4h.weight": "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias": "mlp.dense_h_to_4h.bias",
    "mlp.linear1.weight": "mlp.dense_h_to_4h.weight",
    "mlp.linear1.bias": "mlp.dense_h_to_4h.bias",
}
ROW = {
    "attention.dense.weight": "attention.dense.weight",
    "mlp.dense_4h_to_h.weight": "mlp.dense_4h_to_h.weight",
    "mlp.linear2.weight": "mlp.dense_4h_to_h.weight",
}
ROW_BIAS = {
    "attention.dense.bias": "attention.dense.bias",
    "mlp.dense_4h_to_h.bias": "mlp.dense_4h_to_h.bias",
    "mlp.linear2.bias": "mlp.dense_4h_to_h.bias",
}
NORM = {
    f"{norm}.{p}": f"{norm}.{p}"
    for norm in ("input_layernorm", "post_attention_layernorm")
    for p in ("weight", "bias")
}


def step_dir(path: str | Path) -> Path | None:
    """The ``global_stepN`` folder ``path`` names (itself, or the one ``latest`` names)."""
    path = Path(path)
    if (path / LAYER_FILE.format(layer=0, rank=0)).is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (path / tag / LAYER_FILE.format(layer=0, rank=0)).is_file():
            return path / tag
    return None


def is_neox_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a GPT-NeoX checkpoint (a ``global_stepN`` folder or its parent)."""
    return step_dir(path) is not None


def tensor_parallel_degree(folder: Path) -> int:
    """How many ranks saved the embedding file; ranks must be ``00 .. tp-1``."""
    ranks = sorted(int(m.group(1)) for f in folder.iterdir() if (m := _RANK.match(f.name)))
    if ranks != list(range(len(ranks))):
        raise UserError(
            f"{folder}: embedding files for ranks {ranks}; expected 00 .. {len(ranks) - 1}."
        )
    return len(ranks)


def _load_layer(folder: Path, layer: int, tp: int, what: str) -> list[dict[str, Any]]:
    torch = require("torch", "reading GPT-NeoX checkpoints")
    states = []
    for rank in range(tp):
        file = folder / LAYER_FILE.format(layer=layer, rank=rank)
        if not file.is_file():
            raise UserError(
                f"GPT-NeoX checkpoint {folder} lacks {file.name} ({what}, tensor-parallel rank "
                f"{rank} of {tp}); the checkpoint is incomplete."
            )
        states.append(torch.load(str(file), map_location="cpu", weights_only=True, mmap=True))
    return states


def _numpy(tensor) -> np.ndarray:
    import torch

    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()  # exact: fp32 holds every bf16/fp16 value
    return tensor.numpy()


def _merged(states, key: str, how: str, file: str) -> np.ndarray:
    missing = [r for r, s in enumerate(states) if key not in s]
    if missing:
        raise UserError(f"GPT-NeoX layer file {file} (rank {missing[0]}) has no tensor {key!r}.")
    parts = [_numpy(s[key]) for s in states]
    if how == "rows":
        return np.concatenate(parts, axis=0)
    if how == "cols":
        return np.concatenate(parts, axis=1)
    if how == "sum":
        return np.sum(parts, axis=0)
    if how == "mean":
        return np.mean(parts, axis=0)
    return parts[0]


def neox_hf_tensors(folder: Path, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """``(HF name, merged array)`` for every parameter, one layer file at a time."""
    tp = tensor_parallel_degree(folder)
    n = config.num_hidden_layers
    name = lambda layer: LAYER_FILE.format(layer=layer, rank=0)  # noqa: E731
    embed = _load_layer(folder, 0, tp, "the input embedding")
    yield "gpt_neox.embed_in.weight", _merged(embed, "word_embeddings.weight", "rows", name(0))
    if config.tie_word_embeddings:
        yield "embed_out.weight", _merged(embed, "word_embeddings.weight", "rows", name(0))
    del embed
    row_bias = "sum" if config.use_parallel_residual else "first"
    for i in range(n):
        states = _load_layer(folder, i + 2, tp, f"transformer layer {i}")
        prefix = f"gpt_neox.layers.{i}."
        for table, how in ((COLUMN, "rows"), (ROW, "cols"), (ROW_BIAS, row_bias), (NORM, "mean")):
            for key, hf in table.items():
                if key in states[0]:
                    yield prefix + hf, _merged(states, key, how, name(i + 2))
    final = _load_layer(folder, n + 3, tp, "the final LayerNorm")
    for p in ("weight", "bias"):
        yield f"gpt_neox.final_layer_norm.{p}", _merged(final, f"norm.{p}", "mean", name(n + 3))
    if not config.tie_word_embeddings:
        head = _load_layer(folder, n + 4, tp, "the output projection")
        yield "embed_out.weight", _merged(head, "final_linear.weight", "rows", name(n + 4))


def read_neox_model_config(path: str | Path, **overrides) -> ModelConfig:
    """The architecture from the checkpoint's ``configs/*.yml`` (merged as GPT-NeoX does);
    the vocabulary size is the embedding's, so no tokenizer file is needed."""
    folder = _folder(path)
    files = sorted(str(f) for f in (folder / "configs").glob("*.y*ml")) + sorted(
        str(f) for f in (folder / "configs").glob("*.json")
    )
    if not files:
        raise UserError(
            f"GPT-NeoX checkpoint {folder} has no configs/*.yml to read the architecture "
            "from; copy the run's config files there, or call neox_jax.neox_compat."
            "checkpoint.load_neox_checkpoint(path, config=ModelConfig(...))."
        )
    tp = tensor_parallel_degree(folder)
    embed = _load_layer(folder, 0, 1, "the input embedding")[0]["word_embeddings.weight"]
    neox = read_configs(files)
    translation = translate(neox, tokenizer_vocab_size=embed.shape[0] * tp)
    model = {
        k[len("model.") :]: v for k, v in translation.overrides.items() if k.startswith("model.")
    }
    model.pop("dtype")  # the run's precision is not the loaded model's compute dtype
    model["vocab_size"] = embed.shape[0] * tp  # the padded size GPT-NeoX trained with
    return ModelConfig(**{**model, **overrides})


def _folder(path: str | Path) -> Path:
    folder = step_dir(path)
    if folder is None:
        raise UserError(
            f"{path} is not a GPT-NeoX checkpoint: no {LAYER_FILE.format(layer=0, rank=0)} "
            "in it, nor a 'latest' file naming a global_stepN folder that has one."
        )
    return folder


def load_neox_checkpoint(
    path: str | Path, *, config: ModelConfig | None = None, **overrides
) -> tuple[ModelConfig, dict[str, Any]]:
    """``(config, params)`` (host numpy arrays) from a GPT-NeoX checkpoint, any TP degree.

    Args:
      path: a ``global_stepN`` folder, or the save folder whose ``latest`` names one.
      config: the architecture; default: read from the checkpoint's ``configs/*.yml``.
      **overrides: ``ModelConfig`` fields (``param_dtype``, ``dtype``, ...).
    """
    folder = _folder(path)
    if config is None:
        config = read_neox_model_config(folder, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    return config, params_from_hf_tensors(config, neox_hf_tensors(folder, config), str(folder))

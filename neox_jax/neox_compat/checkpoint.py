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

A run without pipeline parallelism (``pipe_parallel_size: 0``, GPT-NeoX's sequential
model) writes no layer files: each rank's ``mp_rank_YY_model_states.pt`` holds the whole
model under ``module`` with keys ``sequential.<layer>.<key>``, the same numbering (the
converter reads both). That file also carries GPT-NeoX's RNG states, NumPy's among them,
so it is read with ``weights_only=True`` plus NumPy's array reconstruction allowlisted
(data only, no code runs). With pipeline parallelism those files hold ``module: None``
and the layer files are read.

Ranks merge as that converter merges them: column-parallel weights and biases
(``query_key_value``, ``dense_h_to_4h``/``linear1``, the embeddings) concatenate along
their output rows (dim 0, torch's ``[out, in]``), row-parallel weights (``attention.dense``,
``dense_4h_to_h``/``linear2``) along their input columns (dim 1), LayerNorm parameters
(replicated) are averaged. Row-parallel biases are summed when the residual is parallel
(each rank adds its copy before the one all-reduce, GPT-NeoX's ``gpt_j_residual``; the
converter always sums, and every Pythia model is parallel) and taken from rank 0 for a
sequential residual (added once, after the all-reduce). Files are read with
``torch.load(weights_only=True)``, never unpickling arbitrary objects. The output layer
is split by vocabulary rows, or by input columns with ``output_layer_parallelism: row``.

GPT-NeoX's Llama-style models (``norm: rmsnorm``, ``activation: swiglu``; see
model_config.py) load into our Llama family: RMSNorm ``scale``s, ``query_key_value`` split
into q/k/v (per head ``[q, k, v]`` without ``num_kv_heads``, per rank ``[q | k | v]`` with
it, as ``gqa_project`` splits it), ``linear1`` per rank ``[up | gate]`` (its
``Gated_Activation`` chunks it so) or the older ``w1``/``w3``/``w2``.
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
from neox_jax.neox_compat.config import Translation, read_configs
from neox_jax.neox_compat.model_config import model_fields
from neox_jax.neox_compat.values import coerce
from neox_jax.optional import require

LAYER_FILE = "layer_{layer:02d}-model_{rank:02d}-model_states.pt"
RANK_FILE = "mp_rank_{rank:02d}_model_states.pt"
_RANK = re.compile(r"layer_00-model_(\d+)-model_states\.pt$")
_MP_RANK = re.compile(r"mp_rank_(\d+)_model_states\.pt$")
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


def _has_weights_file(folder: Path) -> bool:
    return (folder / LAYER_FILE.format(layer=0, rank=0)).is_file() or (
        folder / RANK_FILE.format(rank=0)
    ).is_file()


def step_dir(path: str | Path) -> Path | None:
    """The ``global_stepN`` folder ``path`` names (itself, or the one ``latest`` names)."""
    path = Path(path)
    if _has_weights_file(path):
        return path
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if _has_weights_file(path / tag):
            return path / tag
    return None


def is_neox_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a GPT-NeoX checkpoint (a ``global_stepN`` folder or its parent)."""
    return step_dir(path) is not None


def is_sequential(folder: Path) -> bool:
    """True for a run without pipeline parallelism (weights in ``mp_rank_YY`` files)."""
    return not (folder / LAYER_FILE.format(layer=0, rank=0)).is_file()


def tensor_parallel_degree(folder: Path) -> int:
    """How many ranks saved the embedding (or whole-model) file; ranks ``00 .. tp-1``."""
    pattern = _MP_RANK if is_sequential(folder) else _RANK
    ranks = sorted(int(m.group(1)) for f in folder.iterdir() if (m := pattern.match(f.name)))
    if ranks != list(range(len(ranks))):
        raise UserError(
            f"{folder}: {'model' if pattern is _MP_RANK else 'embedding'} files for ranks "
            f"{ranks}; expected 00 .. {len(ranks) - 1}."
        )
    return len(ranks)


def _torch_load(file: Path):
    torch = require("torch", "reading GPT-NeoX checkpoints")
    # np.random.get_state() in GPT-NeoX's client state pickles as NumPy arrays: allow only
    # their reconstruction, under numpy 2's and numpy 1's module names.
    rebuild = np._core.multiarray._reconstruct
    allowed = [rebuild, (rebuild, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
               type(np.dtype(np.uint32))]  # fmt: skip
    with torch.serialization.safe_globals(allowed):
        return torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)


class _Files:
    """Reads the tensors of one pipeline layer from every rank, from the layer files or
    (sequential runs) from the ``mp_rank_YY`` files, each of those loaded once."""

    def __init__(self, folder: Path):
        self.folder, self.tp = folder, tensor_parallel_degree(folder)
        self.sequential = is_sequential(folder)
        self._modules: list[dict[str, Any]] | None = None

    def layer(self, layer: int, what: str) -> list[dict[str, Any]]:
        """Each rank's tensors of layer ``layer`` (keys without the layer prefix)."""
        if self.sequential:
            prefix = f"sequential.{layer}."
            states = [
                {k[len(prefix) :]: v for k, v in module.items() if k.startswith(prefix)}
                for module in self.modules()
            ]
            if not states[0]:
                raise UserError(
                    f"GPT-NeoX checkpoint {self.folder}: {RANK_FILE.format(rank=0)} has no "
                    f"'{prefix}*' tensors ({what}); the checkpoint is incomplete."
                )
            return states
        states = []
        for rank in range(self.tp):
            file = self.folder / LAYER_FILE.format(layer=layer, rank=rank)
            if not file.is_file():
                raise UserError(
                    f"GPT-NeoX checkpoint {self.folder} lacks {file.name} ({what}, "
                    f"tensor-parallel rank {rank} of {self.tp}); the checkpoint is incomplete."
                )
            states.append(_torch_load(file))
        return states

    def modules(self) -> list[dict[str, Any]]:
        """The ``module`` state dict of every ``mp_rank_YY`` file (memory-mapped)."""
        if self._modules is None:
            self._modules = []
            for rank in range(self.tp):
                file = self.folder / RANK_FILE.format(rank=rank)
                module = _torch_load(file).get("module")
                if module is None:
                    raise UserError(
                        f"GPT-NeoX checkpoint {self.folder}: {file.name} holds no weights "
                        "(a pipeline run's) and there are no layer_XX-model_YY files; the "
                        "checkpoint is incomplete."
                    )
                self._modules.append(module)
        return self._modules

    def name(self, layer: int) -> str:
        """The file a layer's tensors come from, for messages."""
        return (
            RANK_FILE.format(rank=0) if self.sequential else LAYER_FILE.format(layer=layer, rank=0)
        )


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


def _output_layer(files: _Files, config: ModelConfig) -> np.ndarray:
    """``final_linear.weight``: vocabulary rows split across ranks (GPT-NeoX's default
    ``output_layer_parallelism: column``) or, for ``row``, its input columns."""
    layer = config.num_hidden_layers + 4
    head = files.layer(layer, "the output projection")
    rows_split = head[0]["final_linear.weight"].shape[0] * files.tp == config.vocab_size
    how = "rows" if rows_split or files.tp == 1 else "cols"
    return _merged(head, "final_linear.weight", how, files.name(layer))


def neox_hf_tensors(folder: Path, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """``(HF name, merged array)`` for every parameter, one layer at a time."""
    files = _Files(folder)
    if config.model_type != "gpt_neox":
        yield from _llama_tensors(files, config)
        return
    n, name = config.num_hidden_layers, files.name
    embed = files.layer(0, "the input embedding")
    yield "gpt_neox.embed_in.weight", _merged(embed, "word_embeddings.weight", "rows", name(0))
    if config.tie_word_embeddings:
        yield "embed_out.weight", _merged(embed, "word_embeddings.weight", "rows", name(0))
    del embed
    row_bias = "sum" if config.use_parallel_residual else "first"
    for i in range(n):
        states = files.layer(i + 2, f"transformer layer {i}")
        _check_not_transformer_engine(states[0], name(i + 2))
        prefix = f"gpt_neox.layers.{i}."
        for table, how in ((COLUMN, "rows"), (ROW, "cols"), (ROW_BIAS, row_bias), (NORM, "mean")):
            for key, hf in table.items():
                if key in states[0]:
                    yield prefix + hf, _merged(states, key, how, name(i + 2))
    final = files.layer(n + 3, "the final LayerNorm")
    for p in ("weight", "bias"):
        yield f"gpt_neox.final_layer_norm.{p}", _merged(final, f"norm.{p}", "mean", name(n + 3))
    if not config.tie_word_embeddings:
        yield "embed_out.weight", _output_layer(files, config)


def _check_not_transformer_engine(state: dict[str, Any], file: str) -> None:
    """Transformer Engine layers (``te_*`` settings) save other names and fp8 state."""
    te = sorted(k for k in state if k.startswith(("attention.qkv.", "mlp.fc1_", "mlp.fc2_")))
    if te:
        raise UserError(
            f"GPT-NeoX layer file {file} holds Transformer Engine weights ({te[:3]}), which "
            "neox_jax does not read; convert the run with GPT-NeoX's tools/ckpts/"
            "convert_neox_to_hf.py and load the Hugging Face folder."
        )


def _split_qkv(states, key: str, config: ModelConfig, file: str) -> list[np.ndarray]:
    """GPT-NeoX's fused ``query_key_value`` rows (weight or bias) as full q, k, v.

    Each rank holds its heads. With as many KV heads as query heads the rows are per
    head ``[q, k, v]`` (GPT-NeoX's strided layout); with ``num_kv_heads`` they are the
    rank's ``[q heads | k heads | v heads]`` (``gqa_project``)."""
    hd, tp = config.head_dim, len(states)
    _merged(states, key, "first", file)  # names a rank that lacks it
    parts = [_numpy(s[key]) for s in states]
    heads, kv = config.num_attention_heads // tp, config.kv_heads // tp
    if config.kv_heads == config.num_attention_heads:
        split = [p.reshape(heads, 3, hd, *p.shape[1:]) for p in parts]
        qkv = [[x[:, j].reshape(heads * hd, *x.shape[3:]) for j in range(3)] for x in split]
    else:
        qkv = [np.split(p, [heads * hd, (heads + kv) * hd]) for p in parts]
    return [np.concatenate([r[j] for r in qkv]) for j in range(3)]


def _llama_tensors(files: _Files, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """GPT-NeoX's Llama-style models (RMSNorm ``scale``, gated ``linear1`` = per rank
    ``[up | gate]``, as its ``Gated_Activation`` chunks it) under transformers' Llama names."""
    name = files.name
    embed = files.layer(0, "the input embedding")
    yield "model.embed_tokens.weight", _merged(embed, "word_embeddings.weight", "rows", name(0))
    del embed
    row_bias = "sum" if config.use_parallel_residual else "first"
    for i in range(config.num_hidden_layers):
        states, file = files.layer(i + 2, f"transformer layer {i}"), name(i + 2)
        _check_not_transformer_engine(states[0], file)
        prefix = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield f"{prefix}{norm}.weight", _merged(states, f"{norm}.scale", "mean", file)
        for what in ("weight", "bias") if config.attention_bias else ("weight",):
            q, k, v = _split_qkv(states, f"attention.query_key_value.{what}", config, file)
            for p, value in zip("qkv", (q, k, v), strict=True):
                yield f"{prefix}self_attn.{p}_proj.{what}", value
        yield (
            prefix + "self_attn.o_proj.weight",
            _merged(states, "attention.dense.weight", "cols", file),
        )
        if config.out_bias:
            yield (
                prefix + "self_attn.o_proj.bias",
                _merged(states, "attention.dense.bias", row_bias, file),
            )
        for what in ("weight", "bias") if config.mlp_bias else ("weight",):
            if f"mlp.w1.{what}" in states[0]:  # GPT-NeoX's older LLaMAParallelMLP
                yield (
                    f"{prefix}mlp.gate_proj.{what}",
                    _merged(states, f"mlp.w1.{what}", "rows", file),
                )
                yield f"{prefix}mlp.up_proj.{what}", _merged(states, f"mlp.w3.{what}", "rows", file)
                down = f"mlp.w2.{what}"
            else:
                _merged(states, f"mlp.linear1.{what}", "first", file)
                halves = [np.split(_numpy(s[f"mlp.linear1.{what}"]), 2) for s in states]
                yield f"{prefix}mlp.up_proj.{what}", np.concatenate([h[0] for h in halves])
                yield f"{prefix}mlp.gate_proj.{what}", np.concatenate([h[1] for h in halves])
                down = f"mlp.linear2.{what}"
            how = "cols" if what == "weight" else row_bias
            yield f"{prefix}mlp.down_proj.{what}", _merged(states, down, how, file)
    n = config.num_hidden_layers
    final = files.layer(n + 3, "the final RMSNorm")
    yield "model.norm.weight", _merged(final, "norm.scale", "mean", name(n + 3))
    if not config.tie_word_embeddings:
        yield "lm_head.weight", _output_layer(files, config)


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
    checkpoint = _Files(folder)
    tp = checkpoint.tp
    embed = checkpoint.layer(0, "the input embedding")[0]["word_embeddings.weight"]
    # Only the model is read here: the run's optimizer, data and batch settings do not
    # matter, nor its precision (not the loaded model's compute dtype).
    neox = coerce(read_configs(files))
    model = model_fields(
        neox, lambda key, default=None: neox.get(key, default), Translation(), embed.shape[0] * tp
    )
    model["vocab_size"] = embed.shape[0] * tp  # the padded size GPT-NeoX trained with
    return ModelConfig(**{**model, **overrides})


def _folder(path: str | Path) -> Path:
    folder = step_dir(path)
    if folder is None:
        raise UserError(
            f"{path} is not a GPT-NeoX checkpoint: no {LAYER_FILE.format(layer=0, rank=0)} "
            f"or {RANK_FILE.format(rank=0)} in it, nor a 'latest' file naming a global_stepN "
            "folder that has one."
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

"""Loading a model for evaluation, embedding or retrieval, with load-time overrides.

RoPE scaling is chosen here, at load time: ``rope_scaling_type="linear"`` (position
interpolation, Chen et al. 2023) or ``"ntk"`` (NTK-aware base scaling) with a factor
``f`` lets a model trained on ``max_position_embeddings`` positions read ``f`` times as
many (``neox_jax.model.layers.rotary_inv_freq`` implements both). ``load_model`` passes
the override through for neox_jax checkpoints and Hugging Face folders alike.
"""

from __future__ import annotations

import os
from typing import Any


def load_model_and_tokenizer(
    checkpoint: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    *,
    dtype: str | None = None,
    attention_impl: str | None = None,
    rope_scaling_type: str | None = None,
    rope_scaling_factor: float | None = None,
):
    """``(config, params, tokenizer)`` for a checkpoint, with load-time overrides.

    Args:
      checkpoint: a neox_jax checkpoint, a training run directory or a HF folder.
      tokenizer: tokenizer file or folder; default the one found beside the checkpoint.
      dtype, attention_impl: ``ModelConfig`` overrides ("" / None keeps the checkpoint's).
      rope_scaling_type, rope_scaling_factor: "linear" or "ntk" and a factor >= 1, to
        run past the trained context; "none" removes a scaling stored in the checkpoint.
    """
    from neox_jax.convert import find_tokenizer, load_model
    from neox_jax.data.tokenizer import load_tokenizer

    overrides: dict[str, Any] = {}
    if dtype:
        overrides["dtype"] = dtype
    if attention_impl:
        overrides["attention_impl"] = attention_impl
    if rope_scaling_type:
        overrides["rope_scaling"] = rope_scaling_override(rope_scaling_type, rope_scaling_factor)
    config, params = load_model(checkpoint, **overrides)
    tok_path = tokenizer or find_tokenizer(checkpoint)
    if tok_path is None:
        raise FileNotFoundError(
            f"no tokenizer found beside {checkpoint}; pass tokenizer=PATH (a tokenizer.json, "
            "a sentencepiece .model or a folder holding one)."
        )
    return config, params, load_tokenizer(tok_path)


def rope_scaling_override(kind: str, factor: float | None) -> dict[str, Any] | None:
    """The ``rope_scaling`` value for ``load_model`` from CLI/config fields.

    Args:
      kind: "linear", "ntk", or "none" (remove any scaling).
      factor: the scaling factor (>= 1); required unless ``kind`` is "none".
    """
    if kind == "none":
        return None
    if factor is None or float(factor) < 1.0:
        raise ValueError(
            f"rope_scaling_type={kind!r} needs rope_scaling_factor >= 1 (e.g. 2.0 to run a "
            f"2048-position model on 4096 tokens), got {factor!r}."
        )
    return {"type": kind, "factor": float(factor)}


def load_from_config(config):
    """``load_model_and_tokenizer`` with the model fields shared by ``configs/evaluate.py``
    and ``configs/rag.py`` (``checkpoint``, ``tokenizer``, ``dtype``, ``attention_impl``,
    ``rope_scaling_type``, ``rope_scaling_factor``)."""
    if not config.checkpoint:
        raise ValueError("no model: pass --config.checkpoint=PATH (checkpoint, run or HF dir).")
    return load_model_and_tokenizer(
        config.checkpoint,
        config.tokenizer or None,
        dtype=config.dtype or None,
        attention_impl=config.attention_impl or None,
        rope_scaling_type=config.rope_scaling_type or None,
        rope_scaling_factor=config.rope_scaling_factor,
    )

"""Checks of the non-training configs, run before anything loads or compiles.

One function per config file (``sample``, ``evaluate``, ``rag``, ``quantize``,
``convert``, ``export``, ``preprocess``, ``spm_training``); each raises
``neox_jax.errors.UserError`` naming the field (as its ``--config.`` flag), the value
given and the values allowed. Training and fine-tuning configs are checked by the
trainer. Only the fields' values are checked here; whether paths hold what they
should is for the loaders, which name the file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neox_jax.errors import UserError
from neox_jax.model.config import ATTENTION_IMPLS, DTYPES

# The load-time RoPE overrides (``loading.load_model``) take a type and a factor only;
# the types that need more keys (dynamic, yarn, llama3) come from the model's config.
ROPE_SCALING_TYPES = ("none", "linear", "ntk")


def _get(config, field: str) -> Any:
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def choice(config, field: str, allowed: Sequence[Any]) -> None:
    """``config.<field>`` must be one of ``allowed``."""
    value = _get(config, field)
    if value not in allowed:
        options = ", ".join(repr(a) for a in allowed)
        raise UserError(f"--config.{field}={value!r} is not allowed; choose one of {options}.")


def at_least(config, field: str, minimum: float) -> None:
    """``config.<field>`` must be a number >= ``minimum``."""
    value = _get(config, field)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < minimum:
        raise UserError(f"--config.{field}={value!r} must be a number >= {minimum}.")


def required(config, *fields: str, hint: str = "") -> None:
    """Each of ``fields`` must be set (non-empty)."""
    missing = [f"--config.{f}=..." for f in fields if not _get(config, f)]
    if missing:
        raise UserError(f"missing {', '.join(missing)}{'; ' + hint if hint else ''}")


def output_file(config, field: str = "output_file") -> None:
    """``config.<field>``, when set, is a file path in an existing folder."""
    value = _get(config, field)
    if not value:
        return
    path = Path(value)
    if path.is_dir():
        raise UserError(f"--config.{field}={path} is a folder; pass a file path.")
    if not path.absolute().parent.is_dir():
        raise UserError(
            f"--config.{field}={path}: folder {path.absolute().parent} does not exist; "
            "create it first."
        )


def model_source(config) -> None:
    """The model-source block: checkpoint, dtype, attention_impl, RoPE scaling."""
    required(config, "checkpoint", hint="a checkpoint, run directory or Hugging Face folder")
    choice(config, "dtype", ("", *DTYPES))
    choice(config, "attention_impl", ("", *ATTENTION_IMPLS))
    if "rope_scaling_type" in config:
        choice(config, "rope_scaling_type", ("", *ROPE_SCALING_TYPES))
        if config.rope_scaling_type not in ("", "none"):
            at_least(config, "rope_scaling_factor", 1.0)


def sample(config) -> None:
    """``configs/sample.py``."""
    model_source(config)
    modes = [bool(config.prompt), bool(config.prompt_file), bool(config.interactive)]
    if sum(modes) != 1:
        raise UserError(
            "choose exactly one of --config.prompt=, --config.prompt_file= and "
            "--config.interactive=True."
        )
    for field, minimum in (("batch_size", 1), ("max_new_tokens", 1), ("num_beams", 1),
                           ("tensor_parallel", 1), ("pipeline_stages", 1), ("top_k", 0),
                           ("temperature", 0.0), ("repetition_penalty", 0.0),
                           ("max_cache_len", 0), ("pipeline_microbatches", 0)):  # fmt: skip
        at_least(config, field, minimum)
    if not 0.0 < config.top_p <= 1.0:
        raise UserError(f"--config.top_p={config.top_p!r} must be in (0, 1].")
    for field in ("presence_penalty", "frequency_penalty"):
        if not -2.0 <= config[field] <= 2.0:
            raise UserError(f"--config.{field}={config[field]!r} must be in [-2, 2] (0 = off).")
    choice(config, "early_stopping", ("false", "true", "never", False, True))
    output_file(config)


def evaluate(config) -> None:
    """``configs/evaluate.py``."""
    model_source(config)
    at_least(config, "batch_size", 1)
    at_least(config, "max_length", 0)
    at_least(config, "perplexity.stride", 0)
    at_least(config, "perplexity.max_sequences", 0)
    at_least(config, "harness.limit", 0.0)
    at_least(config, "harness.max_gen_toks", 1)
    at_least(config, "harness.bootstrap_iters", 0)
    output_file(config)
    if not (config.perplexity.text_file or config.perplexity.indexed_dataset
            or config.harness.tasks):  # fmt: skip
        raise UserError(
            "nothing to evaluate: pass --config.perplexity.text_file=, "
            "--config.perplexity.indexed_dataset= or --config.harness.tasks=."
        )


def rag(config, *, building: bool) -> None:
    """``configs/rag.py``, for ``neox_jax.embed`` (``building``) or ``neox_jax.rag``."""
    model_source(config)
    choice(config, "embed.pooling", ("mean", "last", "max"))
    choice(config, "index.kind", ("flat", "ivf", "hnsw"))
    choice(config, "index.metric", ("ip", "l2"))
    for field, minimum in (("embed.batch_size", 1), ("chunk_tokens", 1), ("chunk_overlap", 0),
                           ("index.nlist", 0), ("index.nprobe", 1), ("index.hnsw_m", 2),
                           ("index.ef_search", 1), ("top_k", 1), ("max_new_tokens", 1),
                           ("temperature", 0.0)):  # fmt: skip
        at_least(config, field, minimum)
    if config.chunk_overlap >= config.chunk_tokens:
        raise UserError(
            f"--config.chunk_overlap={config.chunk_overlap} must be smaller than "
            f"--config.chunk_tokens={config.chunk_tokens}."
        )
    if building:
        required(config, "corpus", "index_dir")
    else:
        required(config, "index_dir", hint="an index built by python -m neox_jax.embed")
        output_file(config)
        if bool(config.question) == bool(config.question_file):
            raise UserError("pass exactly one of --config.question= and --config.question_file=.")


def quantize(config) -> None:
    """``configs/quantize.py``."""
    required(config, "src", "dst")
    choice(config, "bits", (8, 4))
    choice(config, "method", ("rtn", "gptq"))
    choice(config, "scale_dtype", DTYPES)
    choice(config, "matmul_impl", ("xla", "pallas"))
    at_least(config, "group_size", 0)
    for field in ("num_calibration_samples", "calibration_seq_len", "calibration_batch_size",
                  "gptq_block_size"):  # fmt: skip
        at_least(config, field, 1)
    at_least(config, "gptq_damp", 0.0)
    if config.method == "gptq" and not config.calibration:
        raise UserError(
            "--config.method=gptq needs --config.calibration=PATH (a UTF-8 text file or an "
            "indexed dataset prefix)."
        )


def convert(config) -> None:
    """``configs/convert.py``."""
    required(config, "src", "dst", "to")
    choice(config, "to", ("neox", "hf"))
    choice(config, "dtype", DTYPES)
    if config.push_to_hub and config.to != "hf":
        raise UserError("--config.push_to_hub uploads a Hugging Face export: add --config.to=hf.")


def export(config) -> None:
    """``configs/export.py``."""
    choice(config, "dtype", DTYPES)
    at_least(config, "step", -1)
    if config.peft_in:
        required(config, "base", "hf_out", hint="--config.peft_in merges into --config.base")
        if config.run:
            raise UserError("pass either --config.run= or --config.peft_in=, not both.")
    elif not config.run or not (config.hf_out or config.peft_out):
        raise UserError(
            "pass --config.run=RUN_DIR and at least one of --config.hf_out= / "
            "--config.peft_out= (or --config.peft_in= with --config.base=)."
        )


def preprocess(config) -> None:
    """``configs/preprocess.py``."""
    required(config, "input", "tokenizer", "output_prefix")
    choice(config, "text_split", ("file", "blank_line"))
    choice(config, "on_malformed", ("fail", "skip"))
    at_least(config, "workers", 1)
    at_least(config, "chunksize", 1)


def spm_training(config) -> None:
    """``configs/spm_training.py``."""
    required(config, "input", "output")
    choice(config, "model_type", ("bpe", "unigram"))
    at_least(config, "vocab_size", 1)
    at_least(config, "input_sentence_size", 0)


def destination(config, field: str) -> None:
    """``config.<field>`` names a folder this run may write: checked before any work.

    Refused: an existing file, a non-empty folder without ``config.overwrite``, and a
    place whose nearest existing parent is not writable.
    """
    path = Path(_get(config, field))
    if path.exists() and not path.is_dir():
        raise UserError(f"--config.{field}={path} is a file; pass a folder path.")
    if path.is_dir() and any(path.iterdir()) and not config.get("overwrite", False):
        raise UserError(
            f"--config.{field}={path} is not empty; pass --config.overwrite=True to replace "
            "it, or another folder."
        )
    parent = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    try:  # a real probe: os.access says yes to root even on a read-only mount
        os.rmdir(tempfile.mkdtemp(prefix=".neox_jax_probe_", dir=parent))
    except OSError as e:
        raise UserError(
            f"--config.{field}={path}: cannot write in {parent} ({e.strerror}); "
            "pick another folder."
        ) from e

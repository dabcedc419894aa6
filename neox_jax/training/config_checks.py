"""Checks of a training or fine-tuning config, run before anything loads or compiles.

Each check raises ``neox_jax.errors.UserError`` naming the field as its ``--config.``
flag, the value given and what is allowed. Sections that belong to a data source or to
fine-tuning are checked by the modules that read them (``training.data``,
``finetune.trainer_hooks``, ``finetune.sft_data``), also before anything compiles.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from neox_jax.config_checks import choice
from neox_jax.convert.hf import config_to_hf
from neox_jax.errors import UserError
from neox_jax.model import ModelConfig

NONFINITE = ("stop", "skip")  # train.nonfinite: stop the run, or skip the step
# Fields that count steps or sizes: whole numbers >= 1.
POSITIVE_INTS = (
    "data.seq_len",
    "data.global_batch_size",
    "data.eval_batch_size",
    "train.steps",
    "train.microbatches",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.save_every",
)
NON_NEGATIVE_INTS = ("train.pipeline_microbatches", "train.keep", "train.keep_period")
# (field, low, high, high included): real numbers in a range.
RANGES = (
    ("optimizer.min_lr_ratio", 0.0, 1.0, True),
    ("optimizer.warmup_ratio", 0.0, 1.0, True),
    ("optimizer.b1", 0.0, 1.0, False),
    ("optimizer.b2", 0.0, 1.0, False),
    ("optimizer.weight_decay", 0.0, math.inf, False),
    ("optimizer.grad_clip", 0.0, math.inf, False),
    ("data.eval_fraction", 0.0, 1.0, False),
    ("train.peak_flops", 0.0, math.inf, False),
)
HINTS = {
    "train.eval_batches": " (to skip evaluation, set train.eval_every above train.steps)",
    "train.save_every": " (to save only at the end, set it to train.steps)",
}


def check_train_config(config, workdir) -> None:
    """Every field of a training config that the trainer reads, before anything runs.

    Raises:
      UserError: naming the first field whose value is not allowed.
    """
    _check_workdir(Path(workdir))
    _check_model_fields(config)
    for field in POSITIVE_INTS:
        _int_at_least(config, field, 1)
    for field in NON_NEGATIVE_INTS:
        _int_at_least(config, field, 0)
    _int_at_least(config, "optimizer.warmup_steps", -1, " (-1: use optimizer.warmup_ratio)")
    choice(config, "train.nonfinite", NONFINITE)
    _number_in(config, "optimizer.lr", 0.0, math.inf, low_included=False, high_included=False)
    _number_in(config, "optimizer.eps", 0.0, math.inf, low_included=False, high_included=False)
    for field, low, high, high_included in RANGES:
        _number_in(config, field, low, high, high_included=high_included)
    if not config.train.init_from:  # else the model is init_from's: checked once read
        check_seq_len(config.data.seq_len, ModelConfig.from_dict(config.model.to_dict()))


def check_seq_len(seq_len: int, model_config: ModelConfig) -> None:
    """Rows of ``seq_len`` tokens must fit the positions the model has."""
    factor = (model_config.rope_scaling_dict or {}).get("factor", 1.0)
    context = model_config.context_length
    if seq_len > context:
        raise UserError(
            f"--config.data.seq_len={seq_len} exceeds the model's context of {context} "
            f"positions (max_position_embeddings={model_config.max_position_embeddings}"
            f"{f' x rope_scaling factor {factor:g}' if factor != 1.0 else ''}); lower "
            "data.seq_len or extend the context with model.rope_scaling."
        )


def warn_if_not_exportable(model_config: ModelConfig) -> str | None:
    """Warn at the start of a run, not when it is over, that its model has a setting no
    Hugging Face class can express (``config_to_hf`` refuses it, as ``python -m
    neox_jax.convert --to=hf`` and ``neox_jax.finetune.export`` will). Such a model
    trains and loads as our checkpoint everywhere in neox_jax, so this is a warning, not
    an error. Returns the warning, None when the model exports.
    """
    try:
        config_to_hf(model_config)
    except UserError as e:
        message = (
            f"This model cannot be exported to Hugging Face: {e} It trains, and its "
            "checkpoints load in neox_jax (sample, serve, evaluate), but "
            "`python -m neox_jax.convert --to=hf` and neox_jax.finetune.export will "
            "refuse them; change the setting now if you need a transformers model."
        )
        logging.warning(message)
        return message
    return None


def _check_workdir(workdir: Path) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir={workdir} is a file; pass a folder (it is created if absent).")
    parent = next((p for p in workdir.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"--workdir={workdir}: {parent} is a file, not a folder.")


def _check_model_fields(config) -> None:
    missing = [f for f in ModelConfig.architecture_fields() if f not in config.model]
    if missing:  # ModelConfig's defaults (the 20B's) would fill them in silently
        raise UserError(
            f"the config's model section lacks {', '.join(missing)}; set "
            + ", ".join(f"--config.model.{f}" for f in missing)
            + " (or start from configs/pretrain.py)."
        )


def _get(config, field: str):
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def _int_at_least(config, field: str, minimum: int, hint: str = "") -> None:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(
            f"--config.{field}={value!r} must be a whole number >= {minimum}"
            f"{hint or HINTS.get(field, '')}."
        )


def _number_in(
    config, field: str, low: float, high: float, *, low_included=True, high_included=True
) -> None:
    value = _get(config, field)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if low_included else value > low)
    ok = ok and (value <= high if high_included else value < high)
    if not ok:
        lo, hi = "[" if low_included else "(", "]" if high_included else ")"
        top = "inf" if math.isinf(high) else f"{high:g}"
        raise UserError(f"--config.{field}={value!r} must be a number in {lo}{low:g}, {top}{hi}.")

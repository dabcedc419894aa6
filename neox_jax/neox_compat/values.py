"""The types of GPT-NeoX config values, checked before they are mapped.

YAML gives ``1e-4`` as a string and lets a file say anything; GPT-NeoX's ``NeoXArgs``
declares each key's type (megatron/neox_arguments/neox_args.py). ``coerce`` converts the
values neox_jax reads to those types (``"1e-4"`` -> 1e-4, ``"1024"`` or ``1024.0`` ->
1024) and raises ``UserError`` naming the key, its value and the expected type for
anything else, so no mapping step fails with a traceback.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from neox_jax.errors import UserError

# Integer keys and the least value each may take.
INTS = {
    **dict.fromkeys(("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                     "max_position_embeddings", "num_kv_heads", "intermediate_size",
                     "make_vocab_size_divisible_by", "mlp_multiple_of",
                     "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                     "train_batch_size", "train_iters", "eval_interval", "log_interval",
                     "global_num_gpus", "save_interval", "keep_last_n_checkpoints",
                     "sliding_window_width"), 1),
    **dict.fromkeys(("pipe_parallel_size", "model_parallel_size", "seed", "eval_iters",
                     "lr_decay_iters"), 0),
}  # fmt: skip
# Real-valued keys and the least value each may take (None: any).
FLOATS = {
    **dict.fromkeys(("lr", "min_lr", "weight_decay", "gradient_clipping", "warmup",
                     "lr_decay_fraction", "hidden_dropout", "attention_dropout"), 0.0),
    **dict.fromkeys(("rotary_pct", "layernorm_epsilon", "rms_norm_epsilon"), 0.0),
    **dict.fromkeys(("rotary_emb_base", "expansion_factor", "checkpoint_factor"), 1e-300),
}  # fmt: skip
DICTS = (
    "optimizer",
    "fp16",
    "bf16",
    "zero_optimization",
    "soft_prompt_tuning",
    "curriculum_learning",
)
LISTS = ("train_data_paths", "valid_data_paths", "test_data_paths", "train_data_weights",
         "valid_data_weights", "test_data_weights", "extra_save_iters",
         "attention_config")  # fmt: skip
STRINGS = ("precision", "data_path", "vocab_file", "tokenizer_type", "lr_decay_style", "norm",
           "activation", "pos_emb")  # fmt: skip


def _number(key: str, value: Any, low, integer: bool):
    kind = "a whole number" if integer else "a number"
    number = math.nan
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError):
            number = float(value)
    if not math.isfinite(number) or (integer and not number.is_integer()):
        raise UserError(f"GPT-NeoX {key}={value!r} must be {kind}.")
    if low is not None and number < low:
        least = "positive" if low == 1e-300 else f">= {low}"
        raise UserError(f"GPT-NeoX {key}={value!r} must be {least}.")
    return int(number) if integer else number


def _optimizer(opt: dict) -> dict:
    params = opt.get("params") or {}
    if not isinstance(params, dict):
        raise UserError(f"GPT-NeoX optimizer.params={params!r} must be a mapping.")
    params = dict(params)
    for key in ("lr", "eps", "weight_decay"):
        if params.get(key) is not None:
            params[key] = _number(f"optimizer.params.{key}", params[key], 0.0, False)
    betas = params.get("betas")
    if betas is not None:
        if not isinstance(betas, list | tuple) or len(betas) != 2:
            raise UserError(f"GPT-NeoX optimizer.params.betas={betas!r} must be two numbers.")
        params["betas"] = [_number("optimizer.params.betas", b, 0.0, False) for b in betas]
    return {**opt, "params": params}


def coerce(neox: dict[str, Any]) -> dict[str, Any]:
    """``neox`` with every value neox_jax reads converted to GPT-NeoX's declared type."""
    out = dict(neox)
    for key, value in neox.items():
        if value is None:
            continue
        if key in INTS:
            out[key] = _number(key, value, INTS[key], True)
        elif key in FLOATS:
            out[key] = _number(key, value, FLOATS[key], False)
            if key == "checkpoint_factor" and out[key].is_integer():  # Union[int, float]
                out[key] = int(out[key])
        elif key in DICTS and not isinstance(value, dict):
            raise UserError(f"GPT-NeoX {key}={value!r} must be a mapping (a YAML dict).")
        elif key in LISTS and not isinstance(value, list | tuple):
            raise UserError(f"GPT-NeoX {key}={value!r} must be a list.")
        elif key in STRINGS and not isinstance(value, str):
            raise UserError(f"GPT-NeoX {key}={value!r} must be a string.")
        elif key == "split" and not isinstance(value, str | int | float):
            raise UserError(f"GPT-NeoX split={value!r} must be a string such as '969,30,1'.")
    if isinstance(out.get("optimizer"), dict):
        out["optimizer"] = _optimizer(out["optimizer"])
    for key in ("train_data_weights", "valid_data_weights", "extra_save_iters"):
        if out.get(key) is not None:
            integer = key == "extra_save_iters"
            checked = [_number(key, v, 0, integer) for v in out[key]]
            # Numbers stay as written (the flags print them back); text becomes numbers.
            pairs = zip(out[key], checked, strict=True)
            out[key] = [v if isinstance(v, int | float) else c for v, c in pairs]
    return out

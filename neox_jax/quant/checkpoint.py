"""Quantized checkpoints: a model checkpoint with a third item, ``quant_config``.

Layout (an orbax composite, like ``neox_jax.convert.checkpoint``)::

    <dir>/params/         the parameter tree; each QuantizedWeight saved as a dict
                          {qvalue, scale[, zero]} (plain arrays: any orbax reads them)
    <dir>/model_config/   ModelConfig as JSON
    <dir>/quant_config/   QuantConfig as JSON (bits, group size, method, ...)
    <dir>/tokenizer/      optional tokenizer files

The static metadata of each ``QuantizedWeight`` (bits, group size, layout) is not
stored per array: it follows from the two configs (``abstract_quantized_params``),
which is also how a mismatch is caught before anything is read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from neox_jax.convert.checkpoint import MODEL_CONFIG, PARAMS, save_items
from neox_jax.model import ModelConfig
from neox_jax.quant.config import QuantConfig, QuantizationError
from neox_jax.quant.core import QuantizedWeight, is_quantized
from neox_jax.quant.params import abstract_quantized_params, dequantize_params

QUANT_CONFIG = "quant_config"


def to_state(tree):
    """``QuantizedWeight`` nodes -> plain dicts (what is written to disk)."""

    def fn(x):
        if not is_quantized(x):
            return x
        out = {"qvalue": x.qvalue, "scale": x.scale}
        if x.zero is not None:
            out["zero"] = x.zero
        return out

    return jax.tree.map(fn, tree, is_leaf=is_quantized)


def from_state(state, template):
    """Inverse of ``to_state``, taking the static metadata from ``template``."""

    def fn(t, s):
        if not is_quantized(t):
            return s
        return t.replace(qvalue=s["qvalue"], scale=s["scale"], zero=s.get("zero"))

    return jax.tree.map(fn, template, state, is_leaf=is_quantized)


def save_quantized(
    config: ModelConfig,
    qconfig: QuantConfig,
    params: dict[str, Any],
    path: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a quantized checkpoint at ``path`` (atomically: a temporary folder, renamed).

    Args:
      config, qconfig: the model and quantization configs the params were made with.
      params: output of ``quantize_params``.
      path: destination folder; must be absent or empty unless ``overwrite``.
      tokenizer_dir: tokenizer files to copy into ``<path>/tokenizer``.
      overwrite: replace an existing checkpoint.

    Returns:
      The absolute path written.
    """
    _check_structure(params, abstract_quantized_params(config, qconfig), "the params to save")
    items = {
        PARAMS: ocp.args.StandardSave(to_state(params)),
        MODEL_CONFIG: ocp.args.JsonSave(config.to_dict()),
        QUANT_CONFIG: ocp.args.JsonSave(qconfig.to_dict()),
    }
    return save_items(items, path, tokenizer_dir=tokenizer_dir, overwrite=overwrite)


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return all((path / item).is_dir() for item in (PARAMS, MODEL_CONFIG, QUANT_CONFIG))


def read_configs(path: str | os.PathLike) -> tuple[ModelConfig, QuantConfig]:
    """The ``(ModelConfig, QuantConfig)`` recorded in a quantized checkpoint."""
    path = Path(path).absolute()
    if not is_quantized_checkpoint(path):
        hint = (
            "it is a float checkpoint: load it with neox_jax.loading.load_model, or quantize it "
            "with `python -m neox_jax.quantize`"
            if (path / PARAMS).is_dir()
            else f"expected {PARAMS}/, {MODEL_CONFIG}/ and {QUANT_CONFIG}/"
        )
        raise QuantizationError(f"{path} is not a quantized checkpoint: {hint}.")
    json_item = lambda name: ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path / name)
    return (
        ModelConfig.from_dict(json_item(MODEL_CONFIG)),
        QuantConfig.from_dict(json_item(QUANT_CONFIG)),
    )


def _flat(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_flatten_with_path(to_state(tree))[0]
    return {
        jax.tree_util.keystr(p, simple=True, separator="/"): (tuple(x.shape), str(x.dtype))
        for p, x in leaves
    }


def _check_structure(actual, expected, what: str, hint: str = "") -> None:
    """Raise ``QuantizationError`` at the first leaf whose path, shape or dtype differs."""
    got, want = _flat(actual), _flat(expected)
    for key in sorted(set(got) | set(want)):
        if got.get(key) != want.get(key):
            raise QuantizationError(
                f"{what} do not match the configs at {key}: found "
                f"{got.get(key, 'nothing')}, the configs imply {want.get(key, 'nothing')}.{hint}"
            )


def load_quantized(
    path: str | os.PathLike,
    *,
    config: ModelConfig | None = None,
    qconfig: QuantConfig | None = None,
    shardings: Any = None,
    materialize_embed_in: bool = True,
) -> tuple[ModelConfig, QuantConfig, dict[str, Any]]:
    """Read a quantized checkpoint for sampling or evaluation.

    Args:
      path: a folder written by ``save_quantized`` (or ``python -m neox_jax.quantize``).
      config, qconfig: expected configs; default the recorded ones. Fields that do not
        change array shapes (``attention_impl``, ``dtype``, ``matmul_impl``) may differ;
        anything else is reported with the recorded values.
      shardings: optional tree of ``jax.sharding.Sharding`` shaped like the quantized
        params (e.g. from ``neox_jax.parallel.param_shardings``); default the first device.
      materialize_embed_in: dequantize a quantized ``embed_in`` so that
        ``GPTNeoX.apply`` can read it (the model's ``nn.Embed`` needs a float table).

    Returns:
      ``(config, qconfig, params)``; ``params`` go straight into ``GPTNeoX(config).apply``.

    Raises:
      QuantizationError: not a quantized checkpoint, or the configs do not match it.
    """
    path = Path(path).absolute()
    saved_config, saved_qconfig = read_configs(path)
    config = config or saved_config
    qconfig = qconfig or saved_qconfig
    expected = abstract_quantized_params(config, qconfig)
    stored = ocp.StandardCheckpointHandler().metadata(path / PARAMS).tree
    recorded = (
        f" The checkpoint was quantized with {saved_qconfig} for a model with "
        f"hidden_size={saved_config.hidden_size}, num_hidden_layers="
        f"{saved_config.num_hidden_layers}, vocab_size={saved_config.vocab_size}; load it "
        "without config/qconfig to use the recorded ones."
    )
    _check_structure(stored, expected, f"The arrays in {path}", recorded)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, expected)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        to_state(expected),
        to_state(shardings),
    )
    restored = ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(
        path / PARAMS, args=ocp.args.StandardRestore(target)
    )
    params = from_state(restored, expected)
    if materialize_embed_in and isinstance(params["embed_in"]["embedding"], QuantizedWeight):
        params = dequantize_params(params, config.params_dtype, only=("embed_in",))
    return config, qconfig, params

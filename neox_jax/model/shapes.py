"""Does a parameter tree belong to a config? Every writer asks before writing anything.

JAX clamps out-of-range indices, so params with fewer layers than their config would be
exported with the last layer repeated, silently; a wrong width would be written as is.
"""

from __future__ import annotations

from typing import Any

import jax

from neox_jax.errors import UserError
from neox_jax.model.config import ModelConfig
from neox_jax.model.transformer import abstract_params

_SHOWN = 4  # mismatches listed in a message; the count says how many more


def shape_mismatches(actual: Any, expected: Any) -> list[str]:
    """One line per tensor that is missing, extra, or of another shape (path: a vs b)."""
    got, want = _flat_shapes(actual), _flat_shapes(expected)
    out = []
    for key in sorted(set(got) | set(want)):
        if key not in got:
            out.append(f"{key} is missing (the config implies shape {want[key]})")
        elif key not in want:
            out.append(f"{key} (shape {got[key]}) is not part of this model")
        elif got[key] != want[key]:
            out.append(f"{key} has shape {got[key]} but the config implies {want[key]}")
    return out


def check_params(config: ModelConfig, params: Any, *, what: str = "params") -> None:
    """Raise ``UserError`` naming each tensor whose shape ``config`` does not imply.

    Args:
      config: the model config that would be written beside ``params``.
      params: a parameter tree (host or device arrays, any dtype).
      what: how the message names ``params`` (e.g. "the params to export").
    """
    bad = shape_mismatches(params, abstract_params(config))
    if bad:
        more = f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        raise UserError(
            f"The {what} do not match the model config ({describe(config)}): "
            + "; ".join(bad[:_SHOWN])
            + more
            + ". Nothing was written; pass the config the params were made with."
        )


def describe(config: ModelConfig) -> str:
    return (
        f"num_hidden_layers={config.num_hidden_layers}, hidden_size={config.hidden_size}, "
        f"vocab_size={config.vocab_size}, intermediate_size={config.intermediate_size}"
    )


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
        for path, leaf in leaves
    }

"""Rotary position embeddings and the RoPE scaling types, as transformers computes them.

``rotary_inv_freq`` gives the ``[rd / 2]`` inverse frequencies of the ``rd`` rotary
dims of a head; ``rotary_attention_scaling`` the factor YaRN multiplies cos and sin by;
``apply_rotary`` rotates q or k (rotate-half convention, GPT-NeoX's and Llama's).

Scaling types (``ModelConfig.rope_scaling["type"]``):

* ``linear`` (position interpolation, Chen et al. 2023): frequencies / ``factor``.
* ``ntk`` (static NTK-aware, bloc97 2023; ours, no transformers type): base raised to
  ``base * factor^(rd / (rd - 2))``.
* ``dynamic`` (dynamic NTK, transformers' ``_compute_dynamic_ntk_parameters``): the same
  base change, but by the length ``n = max(position) + 1`` of the call, and only once
  ``n`` passes ``max_position_embeddings``: ``base * (factor n / max_pos - (factor -
  1))^(rd / (rd - 2))``. Keys already in a KV cache keep the rotation they were written
  with, as in transformers' generate.
* ``yarn`` (Peng et al. 2023, arXiv:2309.00071; transformers' ``_compute_yarn_parameters``):
  per-dimension blend of interpolated and original frequencies by a linear ramp between
  the dims that turn ``beta_fast`` and ``beta_slow`` times over the original context, and
  cos/sin scaled by ``0.1 ln(factor) + 1`` (or the given ``attention_factor``).
* ``llama3`` (Llama 3.1, transformers' ``_compute_llama3_parameters``): long wavelengths
  divided by ``factor``, short ones kept, those between interpolated.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from neox_jax.model.config import ModelConfig

Array = jax.Array


def rotary_inv_freq(config: ModelConfig, positions: Array | None = None) -> Array:
    """``1 / base^(2i / rd)`` for the ``rd`` rotary dims, with the config's RoPE scaling.

    Args:
      config: the model; ``rotary_ndims``, ``rotary_emb_base`` and ``rope_scaling``.
      positions: ``[B, T]`` positions of this call; only ``dynamic`` scaling reads them
        (their maximum, like transformers' ``position_ids``). None = the trained length.
    Returns:
      ``[rd / 2]`` fp32.
    """
    rd = config.rotary_ndims
    base = config.rotary_emb_base
    scaling = config.rope_scaling_dict or {}
    kind = scaling.get("type")
    exponents = jnp.arange(0, rd, 2, dtype=jnp.float32) / rd
    if kind == "ntk" and rd > 2:
        base = base * scaling["factor"] ** (rd / (rd - 2))
    if kind == "dynamic" and positions is not None:
        return 1.0 / (_dynamic_base(config, positions, scaling["factor"]) ** exponents)
    if kind == "yarn":
        return _yarn_inv_freq(config, scaling)
    inv_freq = 1.0 / (base**exponents)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    if kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    return inv_freq


def rotary_attention_scaling(config: ModelConfig) -> float:
    """The factor cos and sin are multiplied by: YaRN's ``attention_factor``, else 1."""
    scaling = config.rope_scaling_dict or {}
    if scaling.get("type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling["factor"]
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _dynamic_base(config: ModelConfig, positions: Array, factor: float) -> Array:
    """Dynamic NTK's base for a call whose longest position is ``max(positions)``,
    in fp32 as transformers computes it from its ``seq_len`` tensor."""
    rd, max_pos = config.rotary_ndims, config.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(positions).astype(jnp.int32) + 1, max_pos).astype(jnp.float32)
    growth = (factor * seq_len / max_pos) - (factor - 1)
    return jnp.float32(config.rotary_emb_base) * growth ** jnp.float32(rd / (rd - 2))


def _yarn_inv_freq(config: ModelConfig, scaling: dict) -> Array:
    """YaRN's blend of extrapolated (original) and interpolated (``/ factor``) frequencies."""
    rd, base, factor = config.rotary_ndims, config.rotary_emb_base, scaling["factor"]
    original = scaling["original_max_position_embeddings"]
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations):  # the dim that turns ``rotations`` times over ``original``
        return rd * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rd - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = base ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd)
    ramp = jnp.clip((jnp.arange(rd // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 for high-frequency dims (kept), 0 for low (interpolated)
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def _llama3_inv_freq(inv_freq: Array, scaling: dict) -> Array:
    """Llama 3.1's RoPE scaling (as transformers' ``_compute_llama3_parameters``):
    wavelengths longer than ``original / low_freq_factor`` are divided by ``factor``,
    shorter than ``original / high_freq_factor`` kept, and those between interpolated."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < original / high) & ~(wavelen > original / low)
    return jnp.where(medium, smoothed, scaled)


def apply_rotary(x: Array, positions: Array, inv_freq: Array, scale: float = 1.0) -> Array:
    """Rotate the first ``2 * len(inv_freq)`` dims of each head (rotate-half convention).

    Args:
      x: ``[B, T, H, D]``.
      positions: ``[B, T]`` integer positions.
      inv_freq: ``[rd / 2]`` fp32.
      scale: multiplies cos and sin in fp32 (YaRN's attention factor), as transformers.
    """
    rd = 2 * inv_freq.shape[0]
    if rd == 0:
        return x
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, rd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, rd]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)

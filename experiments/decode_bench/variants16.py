"""Batch-16 decode-step variants for ``ab_step.py`` (experiments, not the library).

Each is ``name: (patch while tracing, params from (config, params))`` like
``ab_step.VARIANTS``:

* ``unblocked``: the fused layers with each weight as one block of input columns (the
  layout before ``fused.K_BLOCK``).
* ``qkred`` / ``pvred`` / ``red``: the attention products over the cache as a multiply
  and a reduction (one XLA loop fusion each) instead of XLA:CPU's batched dots (one
  Eigen matrix-vector call per (row, head)); measured 2-6x slower (README).
* ``redbar`` / ``qkredbar``: ``red`` / ``qkred`` with ``q`` and the probabilities
  behind ``optimization_barrier`` (no gain: YNNPACK's reductions are the slow part).
* ``qktree`` / ``pvtree`` / ``tree``: the QK and/or the PV product as a tree of
  elementwise adds of halves (``pvtree`` became ``grouped.sum_slots``; README).
* ``pvdot``: ``grouped.step_attention`` before ``sum_slots`` (the PV batched dot).
* ``mlpfirst``: the out product's blocks summed last to first, so the MLP's blocks
  need nothing from the attention (with ``+conc``: may run beside it; README).
* ``halves``: the attention over each half of the batch as separate products (the
  halves of the cache are sliced, i.e. copied, every step; README).
* ``oldargmax``: greedy tokens by ``jnp.argmax``, before ``sampling.greedy_tokens``.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import jax
import jax.numpy as jnp

from neox_jax.inference import fused, sampling
from neox_jax.inference import step as step_module
from neox_jax.inference.fused import FUSED_LAYERS
from neox_jax.inference.step import split_params
from neox_jax.kernels import reference
from neox_jax.model import grouped, layers


def unblocked(params):
    """``split_params``' fused layers with each weight as one block (``fused.blocks``
    with no limit): the layout before the blocking, for before/after timings."""
    whole = lambda ws: (jnp.concatenate(ws, axis=1),)  # noqa: E731
    fused_layers = tuple(
        {**layer, "w_in": whole(layer["w_in"]), "w_out": whole(layer["w_out"])}
        for layer in params[FUSED_LAYERS]
    )
    return {**params, FUSED_LAYERS: fused_layers}


def _reduced_attention(qk_dot: bool, pv_dot: bool, barrier: bool = False):
    """``grouped.step_attention`` with either product as multiply + reduce; with
    ``barrier``, ``q`` and the probabilities are materialized first
    (``optimization_barrier``), so the reductions cannot recompute their producers
    (rotary, softmax) once per element of the cache."""
    stop = jax.lax.optimization_barrier if barrier else (lambda x: x)

    def attention(q, k, v, k_cache, v_cache, cache_mask, new_mask):
        batch, length, heads, head_dim = q.shape
        kv_heads = k_cache.shape[1]
        qg = stop(q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim))
        scale = head_dim**-0.5
        if qk_dot:
            old = jnp.einsum("btkgd,bksd->bkgts", qg, k_cache)
        else:  # [B, KV, G, T, 1, D] * [B, KV, 1, 1, S, D], summed over D
            qt = qg.transpose(0, 2, 3, 1, 4)[:, :, :, :, None, :]
            old = jnp.sum(qt * k_cache[:, :, None, None], axis=-1)
        new = jnp.einsum("btkgd,bskd->bkgts", qg, k)
        old = jnp.where(cache_mask[:, :, None], old * scale, reference.MASK_VALUE)
        new = jnp.where(new_mask[:, :, None], new * scale, reference.MASK_VALUE)
        probs = stop(jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1))
        slots = k_cache.shape[2]
        if pv_dot:
            out = jnp.einsum("bkgts,bksd->btkgd", probs[..., :slots], v_cache)
        else:  # [B, KV, G, T, S, 1] * [B, KV, 1, 1, S, D], summed over S
            part = jnp.sum(probs[..., :slots, None] * v_cache[:, :, None, None], axis=-2)
            out = part.transpose(0, 3, 1, 2, 4)
        out = out + jnp.einsum("bkgts,bskd->btkgd", probs[..., slots:], v)
        return out.reshape(batch, length, heads, head_dim).astype(q.dtype)

    return lambda: mock.patch.object(layers, "step_attention", attention)


def _tree_sum(x):
    """``x.sum(-1)`` as a tree of elementwise adds of halves (an odd last element is
    added to the first): elementwise ops XLA can fuse into one loop, which XLA:CPU
    splits over its threads, instead of a reduction."""
    while x.shape[-1] > 1:
        n, half = x.shape[-1], x.shape[-1] // 2
        y = x[..., :half] + x[..., half : 2 * half]
        x = y if n % 2 == 0 else y.at[..., :1].add(x[..., 2 * half :])
    return x[..., 0]


def _tree_rows(x):
    """``x.sum(-2)`` as a tree of halves along axis -2 (as ``_tree_sum``)."""
    while x.shape[-2] > 1:
        n, half = x.shape[-2], x.shape[-2] // 2
        y = x[..., :half, :] + x[..., half : 2 * half, :]
        x = y if n % 2 == 0 else y.at[..., :1, :].add(x[..., 2 * half :, :])
    return x[..., 0, :]


def _tree_attention(qk_tree: bool, pv_tree: bool):
    """``grouped.step_attention`` with the products over the cache as ``_tree_sum`` of
    ``q * K`` over the head dimension and/or ``_tree_rows`` of ``p * V`` over the slots
    (compile with ``+ynndot`` so that XLA, not YNNPACK, emits the elementwise ops)."""

    def attention(q, k, v, k_cache, v_cache, cache_mask, new_mask):
        batch, length, heads, head_dim = q.shape
        kv_heads, slots = k_cache.shape[1], k_cache.shape[2]
        qg = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
        scale = head_dim**-0.5
        if qk_tree:
            qt = qg.transpose(0, 2, 3, 1, 4)[:, :, :, :, None, :]  # [B, KV, G, T, 1, D]
            old = _tree_sum(qt * k_cache[:, :, None, None])  # [B, KV, G, T, S]
        else:
            old = jnp.einsum("btkgd,bksd->bkgts", qg, k_cache)
        new = jnp.einsum("btkgd,bskd->bkgts", qg, k)
        old = jnp.where(cache_mask[:, :, None], old * scale, reference.MASK_VALUE)
        new = jnp.where(new_mask[:, :, None], new * scale, reference.MASK_VALUE)
        probs = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1)
        if pv_tree:  # [B, KV, G, T, S, 1] * [B, KV, 1, 1, S, D] summed over S
            part = _tree_rows(probs[..., :slots, None] * v_cache[:, :, None, None])
            out = part.transpose(0, 3, 1, 2, 4)
        else:
            out = jnp.einsum("bkgts,bksd->btkgd", probs[..., :slots], v_cache)
        out = out + jnp.einsum("bkgts,bskd->btkgd", probs[..., slots:], v)
        return out.reshape(batch, length, heads, head_dim).astype(q.dtype)

    return lambda: mock.patch.object(layers, "step_attention", attention)


def _mlp_first():
    """``fused._product`` summing its blocks last to first: in the out product the
    attention's block (the first ``E`` input columns) is added last, so the MLP's
    blocks depend on nothing the attention computes and may run beside it."""

    def product(x, weights):
        out, stop = None, x.shape[-1]
        for w in reversed(weights):
            part = jnp.einsum("bti,oi->bto", x[..., stop - w.shape[1] : stop], w)
            out, stop = part if out is None else out + part, stop - w.shape[1]
        return out

    return lambda: mock.patch.object(fused, "_product", product)


def _halves():
    """``grouped.step_attention`` on each half of the batch separately (two independent
    pairs of products the runtime may run on both cores at once), then concatenated."""
    whole = grouped.step_attention

    def attention(q, k, v, k_cache, v_cache, cache_mask, new_mask):
        h = q.shape[0] // 2
        parts = [
            whole(q[s], k[s], v[s], k_cache[s], v_cache[s], cache_mask[s], new_mask[s])
            for s in (slice(0, h), slice(h, None))
        ]
        return jnp.concatenate(parts, axis=0)

    return lambda: mock.patch.object(layers, "step_attention", attention)


def _old_argmax():
    """Greedy tokens by ``jnp.argmax`` (one variadic reduction), as before
    ``sampling.greedy_tokens``."""
    argmax = lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32)  # noqa: E731
    return lambda: mock.patch.object(sampling, "greedy_tokens", argmax)


_fused = lambda c, p: split_params(p, c)  # noqa: E731


def _input_major(columns: int | None):
    """Params: ``split_params``' fused layers with each block stored input-major
    (``[in, out]``; ``columns`` input rows per block, 0 for one block, None as
    ``fused.K_BLOCK``) and no vocabulary-major head copy (the head is ``embed_out``'s
    ``[E, V]``): the weight order bound.py found fastest for Eigen and oneDNN."""

    def make(config, params):
        split = split_params(params, config)
        split.pop(step_module.VOCAB_MAJOR_HEAD, None)

        def weight(parts):
            whole = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
            return tuple(b.T.copy() for b in fused.blocks(whole, columns))

        layers_ = tuple(
            {**layer, "w_in": weight(layer["w_in"]), "w_out": weight(layer["w_out"])}
            for layer in split[FUSED_LAYERS]
        )
        return {**split, FUSED_LAYERS: layers_}

    return make


def _input_major_product(x, weights):
    out, start = None, 0
    for w in weights:
        part = jnp.einsum("bti,io->bto", x[..., start : start + w.shape[0]], w)
        out, start = part if out is None else out + part, start + w.shape[0]
    return out


def _input_major_patch():
    return mock.patch.object(fused, "_product", _input_major_product)

VARIANTS = {
    "unblocked": (contextlib.nullcontext, lambda c, p: unblocked(split_params(p, c))),
    "qkred": (_reduced_attention(False, True), _fused),
    "pvred": (_reduced_attention(True, False), _fused),
    "red": (_reduced_attention(False, False), _fused),
    "redbar": (_reduced_attention(False, False, barrier=True), _fused),
    "qkredbar": (_reduced_attention(False, True, barrier=True), _fused),
    "qktree": (_tree_attention(True, False), _fused),
    "pvtree": (_tree_attention(False, True), _fused),
    "tree": (_tree_attention(True, True), _fused),
    # the V-cache product as the batched dot that GPU/TPU keep (before ``sum_slots``)
    "pvdot": (lambda: mock.patch.object(grouped, "_v_tree", grouped._v_dot), _fused),
    "mlpfirst": (_mlp_first(), _fused),
    "halves": (_halves(), _fused),
    "oldargmax": (_old_argmax(), _fused),
    # input-major blocks, for XLA's own (Eigen) dots: ``io+eigen``
    "io": (_input_major_patch, _input_major(None)),
    "iowhole": (_input_major_patch, _input_major(0)),
}

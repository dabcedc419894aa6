"""The Pallas flash and decode kernels with fewer K/V heads than query heads (grouped-
query / multi-query attention, K/V never repeated) and with a sliding window, in
interpret mode on CPU, for both kernel layouts (Triton's and Mosaic's), against the
XLA path (``model.grouped``); and the model with attention_impl="pallas" against "xla".

Tolerances: fp32 on both sides, only summation order differs (online softmax in
blocks vs one softmax): outputs within 1e-5 and gradients within 1e-4 of their largest
magnitude, as tests/test_kernels.py argues for the MHA kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax.kernels import reference
from neox_jax.kernels.decode_attention import _decode, decode_attention
from neox_jax.kernels.flash_attention import _attention, flash_attention
from neox_jax.model import GPTNeoX, ModelConfig, init_cache, init_params
from neox_jax.model.grouped import grouped_attention, window_mask


def _close(got, want, rel):
    got, want = np.asarray(got), np.asarray(want)
    assert np.abs(got - want).max() <= rel * np.abs(want).max(), np.abs(got - want).max()


def _xla(q, k, v, seg, window, q_offset=0):
    mask = reference.make_attention_mask(seg[:, -q.shape[1] :], seg, q_offset=q_offset)
    if window is not None:
        mask &= window_mask(q.shape[1], k.shape[1], q_offset, window)
    return grouped_attention(q, k, v, mask)


def _qkv(batch, length, heads, kv_heads, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    shape = lambda h: (batch, length, h, dim)  # noqa: E731
    return tuple(
        jnp.asarray(rng.standard_normal(shape(h)), jnp.float32) for h in (heads, kv_heads, kv_heads)
    )


# GQA 2 and MQA, with and without a window, over both layouts (each interpreted run
# with gradients costs ~20 s on 2 cores, so not every combination).
@pytest.mark.parametrize(
    "layout,kv_heads,window", [("gpu", 2, None), ("tpu", 1, 7), ("gpu", 1, 33)]
)
def test_flash_grouped_and_windowed_equals_xla(layout, kv_heads, window):
    q, k, v = _qkv(2, 72, 4, kv_heads)
    seg = np.ones((2, 72), np.int32)
    seg[1, 40:], seg[1, :3] = 2, 0  # two documents and left padding
    seg = jnp.asarray(seg)
    ours = lambda q, k, v: _attention(q, k, v, seg, True, None, (16, 16), layout, True, window)  # noqa: E731
    ref = lambda q, k, v: _xla(q, k, v, seg, window)  # noqa: E731
    _close(ours(q, k, v), ref(q, k, v), 1e-5)
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))  # noqa: E731
    got = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    assert got[1].shape == k.shape  # K/V gradients per K/V head, summed over the group
    for g, w in zip(got, want, strict=True):
        _close(g, w, 1e-4)


# The TPU (Mosaic) schedule streams the other side's blocks through a grid axis and
# clamps the block index of skipped steps into the visible range (flash_stream.py). Its
# edges: first grid steps skipped (window rows start past kv block 0; key blocks past the
# first query blocks), last ones skipped (causal rows end before the last kv block), the
# accumulators initialised and written on skipped steps, block_q < and > block_k.
@pytest.mark.parametrize("blocks,window", [((16, 32), 20), ((32, 16), None)])
def test_streamed_kernels_at_block_edges(blocks, window):
    q, k, v = _qkv(1, 96, 2, 1, seed=5)
    seg = np.ones((1, 96), np.int32)
    seg[0, 50:], seg[0, :3] = 2, 0
    seg = jnp.asarray(seg)
    ours = lambda q, k, v: _attention(q, k, v, seg, True, None, blocks, "tpu", True, window)  # noqa: E731
    ref = lambda q, k, v: _xla(q, k, v, seg, window)  # noqa: E731
    _close(ours(q, k, v), ref(q, k, v), 1e-5)
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))  # noqa: E731
    got = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        _close(g, w, 1e-4)


def test_streamed_kernels_never_mix_in_blocks_outside_the_window():
    """NaN keys and values in slots 0-15: with a window of 8, query rows from 32 on see
    none of them, so their outputs and dq stay exact only if no grid step combines that
    block with them (fetched and computed, even masked, 0 * NaN would be NaN). Here the
    skipped steps name a visible block (the clamped index map) and compute nothing."""
    q, k, v = _qkv(1, 64, 2, 1, seed=6)
    seg = jnp.ones((1, 64), jnp.int32)
    poison = lambda x: x.at[:, :16].set(jnp.nan)  # noqa: E731
    run = lambda q, k, v: _attention(q, k, v, seg, True, None, (16, 16), "tpu", True, 8)  # noqa: E731
    loss = lambda fn, k, v: lambda q: jnp.sum(jnp.sin(fn(q, k, v)[:, 32:]))  # noqa: E731
    ref = lambda q, k, v: _xla(q, k, v, seg, 8)  # noqa: E731
    _close(run(q, poison(k), poison(v))[:, 32:], ref(q, k, v)[:, 32:], 1e-5)
    got = jax.grad(loss(run, poison(k), poison(v)))(q)[:, 32:]
    _close(got, jax.grad(loss(ref, k, v))(q)[:, 32:], 1e-4)


@pytest.mark.parametrize("layout", ["gpu", "tpu"])
@pytest.mark.parametrize("kv_heads,window", [(2, None), (1, 5), (8, 30)])
def test_decode_grouped_and_windowed_equals_xla(layout, kv_heads, window):
    q, k, v = _qkv(3, 64, 8, kv_heads, seed=1)
    q = q[:, :1]
    seg = np.ones((3, 64), np.int32)
    seg[1, :9] = 0
    length = 41
    seg_live = jnp.asarray(np.where(np.arange(64)[None] < length, seg, 0))
    ours = _decode(q[:, 0], k, v, jnp.asarray(seg), length, None, 16, layout, True, window)
    mask = reference.make_attention_mask(jnp.ones((3, 1), jnp.int32), seg_live, q_offset=length - 1)
    if window is not None:
        mask &= window_mask(1, 64, length - 1, window)
    _close(ours, grouped_attention(q, k, v, mask)[:, 0], 1e-5)


def test_flash_refuses_heads_that_do_not_group():
    q, k, v = _qkv(1, 16, 4, 3)
    with pytest.raises(ValueError, match="kv_heads 3 must divide heads 4"):
        flash_attention(q, k, v, kernel_target="interpret")
    with pytest.raises(ValueError, match="window must be a positive int with causal=True"):
        flash_attention(q, k[:, :, :1], v[:, :, :1], causal=False, window=4)


FAMILY = ModelConfig(
    model_type="mistral", vocab_size=64, hidden_size=64, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, rotary_pct=1.0,
    max_position_embeddings=128, norm_type="rmsnorm", gated_mlp=True, mlp_bias=False,
    fused_qkv=False, attention_bias=False, use_parallel_residual=False, hidden_act="silu",
    qk_norm=True, sliding_window=6,
)  # fmt: skip


def test_family_model_with_pallas_equals_xla():
    """Forward of a GQA + QK-norm + sliding-window model (the kernels' gradients are
    checked above), then a decode step on a full (non-rolling) cache through the
    decode kernel."""
    params = init_params(FAMILY, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 24)), jnp.int32)
    seg = jnp.asarray([[1] * 14 + [2] * 10, [0] * 5 + [1] * 19])
    pallas = FAMILY.replace(attention_impl="pallas")
    logits = [
        np.asarray(GPTNeoX(cfg).apply({"params": params}, ids, segment_ids=seg))
        for cfg in (FAMILY, pallas)
    ]
    real = np.asarray(seg) > 0
    _close(logits[1][real], logits[0][real], 1e-5)
    steps = []
    for cfg in (FAMILY, pallas):
        model = GPTNeoX(cfg)
        out = model.apply({"params": params}, ids[:, :12], cache=init_cache(cfg, 2, 32))
        out = model.apply({"params": params}, ids[:, 12:13], cache=out.cache)
        steps.append(np.asarray(out.logits))
    _close(steps[1], steps[0], 1e-5)


def test_flash_equals_xla_at_8k_with_segment_ids():
    """8,192 tokens, three packed documents, MQA and a 1,000-slot window: the kernels of
    both schedules (512-slot blocks, most of them skipped) equal the XLA path, computed
    here in query chunks of 1,024 so its [chunk, 8192] logits stay small."""
    length = 8192
    q, k, v = _qkv(1, length, 2, 1, seed=3)
    seg = np.ones((1, length), np.int32)
    seg[0, 3000:], seg[0, 6500:] = 2, 3
    seg = jnp.asarray(seg)
    run = jax.jit(
        lambda q, k, v: flash_attention(
            q, k, v, seg, block_q=512, block_k=512, kernel_target="interpret", window=1000
        )
    )
    ours = run(q, k, v)
    chunks = []
    for start in range(0, length, 1024):
        mask = reference.make_attention_mask(seg[:, start : start + 1024], seg, q_offset=start)
        mask &= window_mask(1024, length, start, 1000)
        chunks.append(grouped_attention(q[:, start : start + 1024], k, v, mask))
    _close(ours, jnp.concatenate(chunks, axis=1), 1e-5)
    # The TPU schedule (K/V blocks streamed through the grid), interpreted, the same.
    streamed = jax.jit(
        lambda q, k, v: _attention(q, k, v, seg, True, None, (512, 512), "tpu", True, 1000)
    )
    _close(streamed(q, k, v), jnp.concatenate(chunks, axis=1), 1e-5)


def test_decode_kernel_reads_a_32k_cache():
    """One token against 32,768 cached slots (GQA 4:1, three quarters written), both
    kernel layouts."""
    q, k, v = _qkv(1, 32768, 4, 1, seed=4)
    seg = jnp.ones((1, 32768), jnp.int32)
    length = 24577
    ours = decode_attention(q[:, 0], k, v, seg, length=length, kernel_target="interpret")
    live = jnp.where(jnp.arange(32768)[None] < length, seg, 0)
    mask = reference.make_attention_mask(seg[:, :1], live, q_offset=length - 1)
    want = grouped_attention(q[:, :1], k, v, mask)[:, 0]
    _close(ours, want, 1e-5)
    # The TPU layout (one 512-slot block per grid step, dead blocks never fetched).
    _close(_decode(q[:, 0], k, v, seg, length, None, 512, "tpu", True, None), want, 1e-5)

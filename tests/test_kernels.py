"""Pallas attention kernels vs the XLA reference (interpret mode on CPU).

Tolerances are relative to the largest reference magnitude, max|out - ref| <= rel *
max|ref|, because attention outputs and gradients are sums whose scale varies:

* fp32, ``_F32_REL = 2e-5``: the kernels compute exactly the reference's fp32 math and
  differ only in summation order (blockwise online softmax, split-K merging); observed
  errors are ~1e-6 relative.
* bf16, ``_BF16_REL = 1.5e-2`` (outputs), ``_BF16_GRAD_REL = 2.5e-2`` (gradients):
  the reference runs in fp32 on the same bf16 inputs, while the kernels round the
  probabilities to bf16 before the PV matmul (as the reference's own bf16 path does),
  round dS and P before the backward matmuls, and return bf16 (relative step 2**-8 =
  0.4%); gradients chain several rounded products. Observed: <= 0.3% on outputs (the
  reference's own bf16 path is also 0.3% off its fp32 result) and <= 0.5% on
  gradients, so the bounds leave ~5x headroom while a wrong mask or a skipped block
  (errors of order 1) still fails.

The same tests run compiled on a GPU (``kernel_target="auto"`` picks that); references run
at "float32" matmul precision so TF32 does not blur the comparison there.
"""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax.errors import UserError
from neox_jax.kernels import decode_attention as decode_module
from neox_jax.kernels import reference
from neox_jax.kernels.decode_attention import _decode, decode_attention
from neox_jax.kernels.flash_attention import _attention, flash_attention

_F32_REL = 2e-5
_BF16_REL = 1.5e-2
_BF16_GRAD_REL = 2.5e-2
_BATCH, _HEADS = 2, 2


def _interpret(target):
    """Interpret unless this machine compiles for ``target`` ("gpu" or "tpu" layout), so
    a GPU run of this file tests the Triton kernels and a TPU run the Mosaic ones."""
    native = {"gpu": "gpu", "tpu": "tpu"}.get(jax.default_backend())
    return native != target


def _assert_close(actual, expected, rel, what):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert actual.shape == expected.shape, what
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
    assert err <= rel * scale, f"{what}: max|diff| {err:.3g} > {rel} * max|ref| {scale:.3g}"


def _packed_segments(length, seed):
    """[batch, length]: row 0 packs three documents then padding; row 1 two, no padding."""
    rng = np.random.default_rng(seed)
    pad = int(rng.integers(1, max(2, length // 4)))
    cuts = np.sort(rng.choice(np.arange(1, length - pad), size=2, replace=False))
    row0 = np.zeros(length, np.int32)
    row0[: cuts[0]], row0[cuts[0] : cuts[1]], row0[cuts[1] : length - pad] = 1, 2, 3
    row1 = np.where(np.arange(length) < length // 3, 5, 6).astype(np.int32)
    return jnp.asarray(np.stack([row0, row1]))


def _qkv(head_dim, length, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    shape = (_BATCH, length, _HEADS, head_dim)
    q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys[:3])
    cotangent = jax.random.normal(keys[3], shape, jnp.float32)
    return q, k, v, cotangent


def _value_and_grads(fn, q, k, v, cotangent):
    """fn's output and d(sum(out * cotangent))/d(q, k, v), as one jitted program (eager,
    every op of the interpreted kernels would compile on its own)."""

    @jax.jit
    def both(q, k, v, cotangent):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)
        return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return both(q, k, v, cotangent)


def _check_flash(fn, head_dim, length, causal, dtype, segments):
    q, k, v, cotangent = _qkv(head_dim, length, dtype)
    seg = _packed_segments(length, seed=head_dim) if segments else None
    out, grads = _value_and_grads(lambda q, k, v: fn(q, k, v, seg), q, k, v, cotangent)
    up = lambda x: x.astype(jnp.float32)  # bf16 inputs, fp32 reference
    with jax.default_matmul_precision("float32"):
        ref_fn = lambda q, k, v: reference.segment_attention(q, k, v, seg, causal=causal)
        ref_out, ref_grads = _value_and_grads(ref_fn, up(q), up(k), up(v), cotangent)
    assert out.dtype == dtype
    bf16 = dtype == jnp.bfloat16
    _assert_close(out, ref_out, _BF16_REL if bf16 else _F32_REL, "out")
    for name, g, ref_g in zip("qkv", grads, ref_grads, strict=True):
        assert g.dtype == dtype
        _assert_close(g, ref_g, _BF16_GRAD_REL if bf16 else _F32_REL, f"d{name}")


# (head_dim, length, block_q, block_k, causal, dtype, segments). Every head size of
# the GPT-NeoX family; lengths that are multiples of the blocks and ones that are not
# (padded inside); block_q < = > block_k; 1-3 blocks to stay fast under interpret.
_FLASH_CASES = [
    (64, 64, 32, 32, True, jnp.float32, True),
    (64, 50, 32, 16, False, jnp.bfloat16, False),
    (80, 48, 16, 32, True, jnp.float32, False),
    (80, 64, 32, 32, False, jnp.bfloat16, True),
    (96, 40, 16, 16, True, jnp.bfloat16, True),
    (96, 64, 64, 32, False, jnp.float32, False),
    (128, 96, 32, 32, True, jnp.float32, False),
    (128, 70, 32, 64, True, jnp.bfloat16, True),
    (256, 32, 16, 16, True, jnp.float32, True),
    (256, 45, 32, 16, False, jnp.bfloat16, True),
    (64, 200, None, None, True, jnp.float32, True),  # default blocks (128 on CPU)
]


@pytest.mark.parametrize("head_dim,length,block_q,block_k,causal,dtype,segments", _FLASH_CASES)
def test_flash_attention_matches_reference(
    head_dim, length, block_q, block_k, causal, dtype, segments
):
    def fn(q, k, v, seg):
        return flash_attention(q, k, v, seg, causal=causal, block_q=block_q, block_k=block_k)

    _check_flash(fn, head_dim, length, causal, dtype, segments)


@pytest.mark.parametrize(
    "head_dim,length,causal,dtype,segments",
    [(80, 40, True, jnp.float32, True), (128, 64, False, jnp.bfloat16, False)],
)
def test_flash_attention_tpu_layout(head_dim, length, causal, dtype, segments):
    """The Mosaic path's [batch, heads, length, d] layout and grid order, interpreted."""

    interpret = _interpret("tpu")
    blocks = (32, 16) if interpret else (128, 128)  # compiled Mosaic needs 128-lane blocks

    def fn(q, k, v, seg):
        return _attention(q, k, v, seg, causal, None, blocks, "tpu", interpret)

    _check_flash(fn, head_dim, length, causal, dtype, segments)


def test_flash_attention_all_padding_row_is_finite():
    """A batch row of padding only: finite, and equal to the reference's uniform average."""
    q, k, v, cotangent = _qkv(64, 32, jnp.float32)
    seg = jnp.stack([jnp.zeros(32, jnp.int32), jnp.ones(32, jnp.int32)])
    fn = lambda q, k, v: flash_attention(q, k, v, seg, block_q=16, block_k=16)
    out, grads = _value_and_grads(fn, q, k, v, cotangent)
    ref_fn = lambda q, k, v: reference.segment_attention(q, k, v, seg)
    with jax.default_matmul_precision("float32"):
        ref_out, ref_grads = _value_and_grads(ref_fn, q, k, v, cotangent)
    _assert_close(out, ref_out, _F32_REL, "out")
    for g, ref_g in zip(grads, ref_grads, strict=True):
        _assert_close(g, ref_g, _F32_REL, "grad")


def test_flash_attention_skips_blocks_above_diagonal():
    """NaN values in the last key block: rows of earlier blocks stay finite only if
    that block is never visited for them (a visited-but-masked block would give
    0 * NaN = NaN in P @ V)."""
    q, k, v, _ = _qkv(64, 64, jnp.float32)
    poisoned = v.at[:, 48:].set(jnp.nan)
    out = flash_attention(q, k, poisoned, block_q=16, block_k=16)
    with jax.default_matmul_precision("float32"):
        ref = reference.segment_attention(q, k, v)
    _assert_close(out[:, :48], ref[:, :48], _F32_REL, "rows before the poisoned block")


@pytest.mark.parametrize("segments", [False, True])
def test_flash_attention_under_jit(segments):
    """Inside a jitted train-step-like function (value and grad), traced once."""
    q, k, v, cotangent = _qkv(64, 48, jnp.float32)
    seg = _packed_segments(48, seed=1) if segments else None

    traces = []

    @jax.jit
    def step(q, k, v, seg):
        traces.append(1)
        loss = lambda q: jnp.sum(flash_attention(q, k, v, seg, block_q=16, block_k=16) * cotangent)
        return jax.value_and_grad(loss)(q)

    loss, dq = step(q, k, v, seg)
    step(q + 1.0, k, v, seg)  # same shapes: no retrace
    assert len(traces) == 1
    ref_loss = lambda q: jnp.sum(reference.segment_attention(q, k, v, seg) * cotangent)
    with jax.default_matmul_precision("float32"):
        ref_value, ref_dq = jax.value_and_grad(ref_loss)(q)
    _assert_close(loss, ref_value, _F32_REL, "loss")
    _assert_close(dq, ref_dq, _F32_REL, "dq")


def _decode_inputs(head_dim, heads, cache_len, dtype, fill, seed=0):
    """Cache rows left-padded by 0, 3 and 21 slots, written up to slot ``fill``."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    batch = 3
    q = jax.random.normal(keys[0], (batch, heads, head_dim), jnp.float32).astype(dtype)
    shape = (batch, cache_len, heads, head_dim)
    k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys[1:])
    slot = jnp.arange(cache_len)[None, :]
    left_pad = jnp.array([[0], [3], [21]])
    seg = ((slot >= left_pad) & (slot < fill)).astype(jnp.int32)
    return q, k, v, seg


@jax.jit
def _decode_reference(q, k, v, seg):
    up = lambda x: x.astype(jnp.float32)
    mask = (seg != 0)[:, None, None, :]  # [batch, 1, q_len=1, cache_len]
    with jax.default_matmul_precision("float32"):
        return reference.attention(up(q)[:, None], up(k), up(v), mask)[:, 0]


def _jitted_decode(q, k, v, seg, length, *static, **options):
    """``_decode`` as one jitted program (eager, every op of the interpreted kernel would
    compile on its own); ``static``: its block_k, target and interpret arguments."""
    run = lambda q, k, v, seg, length: _decode(q, k, v, seg, length, *static, **options)
    return jax.jit(run)(q, k, v, seg, length)


def _poison_after(length, k, v, seg):
    """NaN keys/values and non-zero ids from ``length`` on: they must never be read."""
    dead = jnp.arange(k.shape[1]) >= length
    k = jnp.where(dead[None, :, None, None], jnp.nan, k)
    v = jnp.where(dead[None, :, None, None], jnp.nan, v)
    return k, v, jnp.where(dead[None, :], 9, seg)


# (head_dim, heads, cache_len, block_k, dtype, target). Fill 100 of the cache: the
# last live block is partial and later blocks are empty (skipped with ``length``).
_DECODE_CASES = [
    (64, 2, 256, 32, jnp.float32, "gpu"),
    (80, 2, 256, 32, jnp.float32, "gpu"),
    (96, 2, 128, 16, jnp.bfloat16, "gpu"),
    (128, 2, 256, 64, jnp.float32, "gpu"),
    (256, 1, 128, 32, jnp.bfloat16, "gpu"),
    (64, 4, 256, 128, jnp.float32, "tpu"),  # two heads per 128-lane group
    (80, 2, 256, 128, jnp.bfloat16, "tpu"),  # no group fills 128 lanes: all heads
    (128, 2, 256, 128, jnp.float32, "tpu"),
]


@pytest.mark.parametrize("head_dim,heads,cache_len,block_k,dtype,target", _DECODE_CASES)
@pytest.mark.parametrize("use_length", [False, True])
def test_decode_attention_matches_reference(
    head_dim, heads, cache_len, block_k, dtype, target, use_length, monkeypatch
):
    # 3 GPU programs per (row, head) instead of one per block, so programs own several
    # round-robin blocks (2, 1, 1 of the 4 live ones with length 100).
    monkeypatch.setattr(decode_module, "_GPU_TARGET_PROGRAMS", 3 * 3 * heads)
    fill = 100
    q, k, v, seg = _decode_inputs(head_dim, heads, cache_len, dtype, fill)
    expected = _decode_reference(q, k, v, seg)
    length = None
    if use_length:
        length = jnp.int32(fill)
        k, v, seg = _poison_after(fill, k, v, seg)
    out = _jitted_decode(q, k, v, seg, length, None, block_k, target, _interpret(target))
    assert out.shape == q.shape and out.dtype == dtype
    _assert_close(out, expected, _BF16_REL if dtype == jnp.bfloat16 else _F32_REL, "decode")


@pytest.mark.parametrize(
    "head_dim,heads,cache_len,block_k,dtype,target",
    [_DECODE_CASES[0], _DECODE_CASES[2], _DECODE_CASES[5], (64, 2, 200, 32, jnp.float32, "tpu")],
)
def test_decode_attention_heads_major_cache(head_dim, heads, cache_len, block_k, dtype, target):
    """The model's cache layout [batch, heads, cache_len, head_dim] (``layout="bksd"``):
    one head per program, read in place; the same result as the reference, including
    a cache_len no block divides (padded) and poisoned slots past ``length``."""
    fill = 100
    q, k, v, seg = _decode_inputs(head_dim, heads, cache_len, dtype, fill)
    expected = _decode_reference(q, k, v, seg)
    k, v, seg = _poison_after(fill, k, v, seg)
    heads_major = lambda x: x.swapaxes(1, 2)  # noqa: E731
    out = _jitted_decode(
        q, heads_major(k), heads_major(v), seg, jnp.int32(fill), None, block_k, target,
        _interpret(target), layout="bksd",
    )  # fmt: skip
    assert out.shape == q.shape and out.dtype == dtype
    _assert_close(out, expected, _BF16_REL if dtype == jnp.bfloat16 else _F32_REL, "decode")


def test_decode_attention_unaligned_cache_and_defaults():
    """cache_len with no power-of-two block (padded inside) and default block size."""
    q, k, v, seg = _decode_inputs(64, 2, 200, jnp.float32, fill=150)
    out = decode_attention(q, k, v, seg, length=jnp.int32(150))
    _assert_close(out, _decode_reference(q, k, v, seg), _F32_REL, "decode")


def test_decode_attention_under_jit_one_trace():
    """A jitted decode step: a new length each token reuses the same compilation."""
    q, k, v, seg = _decode_inputs(128, 2, 256, jnp.float32, fill=256)

    traces = []

    @jax.jit
    def step(q, k, v, seg, length):
        traces.append(1)
        return decode_attention(q, k, v, seg, length=length, block_k=32)

    for fill in (70, 129):
        live = jnp.where(jnp.arange(256)[None] < fill, seg, 0)
        out = step(q, k, v, live, jnp.int32(fill))
        _assert_close(out, _decode_reference(q, k, v, live), _F32_REL, f"fill {fill}")
    assert len(traces) == 1


def test_attention_bench_smoke(tmp_path):
    """experiments/attention_bench/bench.py --smoke runs on CPU and writes its JSON."""
    path = Path(__file__).resolve().parents[1] / "experiments" / "attention_bench" / "bench.py"
    spec = importlib.util.spec_from_file_location("attention_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "results.json"
    bench.main(["--smoke", f"--out={out}"])
    rows = json.loads(out.read_text())["rows"]
    assert {r["bench"] for r in rows} == {"train_fwd_bwd", "decode"}
    # cuDNN is absent on CPU: it must be reported, not crash the run.
    assert all(r["status"] == "ok" for r in rows if r["impl"] != "cudnn")


def test_kernel_target_is_checked():
    q, k, v, _ = _qkv(64, 32, jnp.float32)
    with pytest.raises(UserError, match="kernel_target must be one of"):
        flash_attention(q, k, v, kernel_target="mosaic")
    # An explicit compiled target refuses blocks its compiler cannot take; "auto" (the
    # Mosaic variant is traced too) raises them to the minimum instead (tests above).
    with pytest.raises(ValueError, match="tpu kernels need blocks >= 128"):
        flash_attention(q, k, v, block_q=16, block_k=16, kernel_target="tpu")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="'auto' interprets only on CPU")
def test_explicit_interpret_target_matches_auto_on_cpu():
    # On this CPU "auto" lowers the interpreter too: the same kernels, the same numbers.
    q, k, v, _ = _qkv(64, 48, jnp.float32)
    forced = jax.jit(lambda q, k, v: flash_attention(q, k, v, kernel_target="interpret"))
    auto = jax.jit(flash_attention)
    np.testing.assert_array_equal(forced(q, k, v), auto(q, k, v))

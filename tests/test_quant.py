"""Weight quantization: storage, error bounds, matmuls, the quantized model, checkpoints.

Tolerances (all relative to the largest reference magnitude, max|a - b| <= rel * max|b|):

* Quantized matmul vs ``x @ dequantize(q)``, fp32, ``_F32_REL = 1e-5``: the same
  products summed in a different order (scale applied after the dot for per-channel
  int8, tile by tile in the kernel); observed ~1e-7.
* bf16, ``_BF16_REL = 2e-2``: the dequantized weight and the activations are rounded
  to bf16 (relative step 2^-8 = 0.4%) before an fp32-accumulated dot; observed ~0.5%.
* Quantized model vs float model (logits of a tiny random model whose activations are
  O(1)). This measures quantization noise, not an implementation error. A weight
  quantized to the nearest grid point is off by a uniform error of RMS ``scale / sqrt(12)``:
  int8 per channel, ``scale ~ 3.5 sigma / 127.5`` -> 0.8% of a weight's sigma; int4 in
  groups of 32, ``scale ~ 2.3 sigma / 7.5`` -> 9%. Each layer's output inherits about
  that relative error and ~9 matmuls compound it; observed max logit errors are
  0.9-1.3% (int8) and 11-15% (int4) of the largest logit. We allow 3% and 30%: a
  wrong nibble order, scale or zero point gives errors of order 100%. The exact
  check of the dispatch is separate: a quantized model equals the float model run
  on the dequantized weights to fp32 round-off.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.quant import CONFIG, INT4_MODEL_REL, o1_params

from neox_jax.model import GPTNeoX
from neox_jax.quant import (
    QuantConfig,
    QuantizationError,
    dequantize_params,
    is_quantized,
    load_quantized,
    pack_int4,
    pallas_matmul,
    quantize,
    quantize_params,
    save_quantized,
    take_rows,
    unpack_int4,
    weight_bytes,
    with_matmul_impl,
    xla_matmul,
)
from neox_jax.quant.core import code_range, codes
from neox_jax.quant.leaves import _quantize_jit
from neox_jax.quant.pallas_matmul import _qmm, make_plan

_F32_REL = 1e-5
_BF16_REL = 2e-2
_INT8_MODEL_REL = 3e-2
_INT4_MODEL_REL = INT4_MODEL_REL

SCHEMES = [  # (bits, group_size, symmetric)
    (8, None, True),
    (8, 32, False),
    (4, 32, True),
    (4, 64, False),
]


def _assert_close(actual, expected, rel, what=""):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert actual.shape == expected.shape, what
    err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
    assert err <= rel * scale, f"{what}: max|diff| {err:.3g} > {rel} * {scale:.3g}"


_apply = jax.jit(lambda p, ids: GPTNeoX(CONFIG).apply({"params": p}, ids))


@pytest.fixture(scope="module")
def params():
    return o1_params()


@pytest.fixture(scope="module")
def ids():
    return jax.random.randint(jax.random.key(1), (2, 24), 0, CONFIG.vocab_size)


@pytest.fixture(scope="module")
def float_logits(params, ids):
    return _apply(params, ids)


# --------------------------------------------------------------------- storage
@pytest.mark.parametrize("signed", [True, False])
def test_int4_packing_round_trips_every_value_at_both_positions(signed):
    lo, hi = code_range(4, signed)
    values = np.arange(lo, hi + 1)
    pairs = np.stack(np.meshgrid(values, values, indexing="ij"), -1).reshape(-1, 2)  # 256 x 2
    packed = pack_int4(jnp.asarray(pairs))
    assert packed.dtype == jnp.uint8 and packed.shape == (256, 1)
    np.testing.assert_array_equal(unpack_int4(packed, signed), pairs)
    # Element 2j is the low nibble, 2j + 1 the high one.
    np.testing.assert_array_equal(
        np.asarray(packed[:, 0]), (pairs[:, 0] & 15) | (pairs[:, 1] & 15) << 4
    )


def test_odd_number_of_int4_codes_is_rejected():
    with pytest.raises(QuantizationError, match="odd"):
        pack_int4(jnp.zeros((2, 3), jnp.int32))


@pytest.mark.parametrize("bits,group,symmetric", SCHEMES)
@pytest.mark.parametrize(  # the bf16 rounding of scales does not depend on the layout
    "transposed,scale_dtype", [(True, jnp.float32), (False, jnp.float32), (True, jnp.bfloat16)]
)
def test_error_within_half_a_step(bits, group, symmetric, transposed, scale_dtype):
    # Leading [L] axis as scanned kernels have; a skewed distribution for asymmetric grids.
    w = jax.random.normal(jax.random.key(0), (2, 64, 128)) + (0.0 if symmetric else 0.7)
    stored = jnp.swapaxes(w, -1, -2) if transposed else w  # [L, R, C]
    group = group or stored.shape[-1]
    qw = _quantize_jit(
        w, bits=bits, group_size=group, symmetric=symmetric, transposed=transposed,
        scale_dtype=scale_dtype,
    )  # fmt: skip
    assert qw.scale.dtype == scale_dtype
    assert qw.scale.shape == (*stored.shape[:-1], stored.shape[-1] // group)
    step = jnp.repeat(qw.scale.astype(jnp.float32), group, axis=-1)  # per element
    deq = qw.dequantize()
    assert deq.shape == w.shape
    err = jnp.abs(stored - (jnp.swapaxes(deq, -1, -2) if transposed else deq))
    # <= scale / 2, up to the round-off of w / scale (values exactly half a step away
    # from two grid points, like max|w| on the symmetric grid, may land either side).
    assert bool(jnp.all(err <= step / 2 * (1 + 1e-5) + 1e-7)), float(jnp.max(err / step))
    lo, hi = code_range(bits, symmetric)
    q = codes(qw)
    assert int(q.min()) >= lo and int(q.max()) <= hi


def test_take_rows_matches_dequantized_table():
    table = jax.random.normal(jax.random.key(0), (50, 64))
    qw = quantize(table, 4, 32, transposed=False)
    ids = jnp.array([[3, 49], [0, 7]])
    np.testing.assert_allclose(take_rows(qw, ids), qw.dequantize()[ids], rtol=0, atol=0)


# ---------------------------------------------------------------------- matmul
@pytest.mark.parametrize("bits,group,symmetric", SCHEMES)
@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantized_matmul_equals_dequantize_then_matmul(bits, group, symmetric, impl, dtype):
    w = jax.random.normal(jax.random.key(0), (128, 96))
    x = jax.random.normal(jax.random.key(1), (3, 5, 128))
    qw = quantize(w, bits, group or 128, symmetric)
    reference = jnp.dot(x, qw.dequantize(), precision=jax.lax.Precision.HIGHEST)
    fn = xla_matmul if impl == "xla" else pallas_matmul
    y = jax.jit(fn, static_argnums=2)(x, qw, dtype)
    assert y.shape == (3, 5, 96) and y.dtype == dtype
    _assert_close(y, reference, _F32_REL if dtype == jnp.float32 else _BF16_REL, f"{impl}")


def test_pallas_tiles_over_several_programs_and_k_steps():
    # 3 row blocks x 2 column blocks x 4 K steps of 32 (with padding of the rows).
    w = jax.random.normal(jax.random.key(0), (128, 64))
    x = jax.random.normal(jax.random.key(1), (40, 128))
    qw = quantize(w, 4, 64, symmetric=False)
    y = pallas_matmul(x, qw, jnp.float32, block_m=16, block_n=32, block_k=32)
    _assert_close(y, x @ qw.dequantize(), _F32_REL)


@pytest.mark.parametrize("bits,group,symmetric", SCHEMES)
def test_pallas_tpu_variant_interpreted(bits, group, symmetric):
    """The Mosaic variant (K loop unrolled, 128-lane output blocks), run by the interpreter:
    2 column blocks x 2 row blocks (rows padded), every K step of every group."""
    w = jax.random.normal(jax.random.key(0), (128, 256))
    x = jax.random.normal(jax.random.key(1), (20, 128))
    qw = quantize(w, bits, group or 128, symmetric)
    plan = make_plan(20, qw, block_m=16, interpret=True, target="tpu")
    assert plan.block_n == 128
    reference = jnp.dot(x, qw.dequantize(), precision=jax.lax.Precision.HIGHEST)
    _assert_close(jax.jit(_qmm, static_argnums=2)(x, qw, plan), reference, _F32_REL)


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 32)])
def test_gradients_flow_through_quantized_matmul(bits, group):
    """QLoRA needs d/dx through the dequantizing matmul; both paths agree."""
    w = jax.random.normal(jax.random.key(0), (64, 32))
    x = jax.random.normal(jax.random.key(1), (4, 64))
    qw = quantize(w, bits, group)
    # Each gradient jitted whole: eager, the interpreted Pallas kernel runs op by op.
    dense = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(x @ qw.dequantize()))))(x)
    for fn in (xla_matmul, pallas_matmul):
        grad = jax.jit(jax.grad(lambda x, fn=fn: jnp.sum(jnp.sin(fn(x, qw, jnp.float32)))))(x)
        _assert_close(grad, dense, _F32_REL, fn.__name__)
    # d/dscale of the Pallas path (custom VJP) equals the XLA path's.
    loss = lambda s, fn: jnp.sum(jnp.sin(fn(x, qw.replace(scale=s), jnp.float32)))
    d_scale = jax.jit(jax.grad(loss), static_argnums=1)
    _assert_close(d_scale(qw.scale, pallas_matmul), d_scale(qw.scale, xla_matmul), _F32_REL)


# ----------------------------------------------------------------------- model
@pytest.mark.parametrize(
    "qconfig,rel",
    [
        (QuantConfig(bits=8), _INT8_MODEL_REL),
        (QuantConfig(bits=8, embed_out=True), _INT8_MODEL_REL),
        (QuantConfig(bits=4, group_size=32), _INT4_MODEL_REL),
        (QuantConfig(bits=4, group_size=32, symmetric=False, embed_out=True), _INT4_MODEL_REL),
    ],
    ids=["int8", "int8+head", "int4", "int4-asym+head"],
)
def test_quantized_model_logits(params, ids, float_logits, qconfig, rel):
    qparams = quantize_params(CONFIG, params, qconfig)
    kernel = qparams["layers"]["mlp"]["dense_h_to_4h"]["kernel"]
    assert is_quantized(kernel) and kernel.qvalue.shape[0] == CONFIG.num_hidden_layers
    assert is_quantized(qparams["embed_out"]["kernel"]) == qconfig.embed_out
    logits = _apply(qparams, ids)
    # The dispatch is exact: same as the float model on the dequantized weights.
    dequantized = _apply(dequantize_params(qparams), ids)
    _assert_close(logits, dequantized, _F32_REL, "quantized vs dequantized")
    _assert_close(logits, float_logits, rel, "quantized vs float")
    assert weight_bytes(qparams) < weight_bytes(params)


def test_pallas_model_equals_xla_model(params, ids):
    qparams = quantize_params(CONFIG, params, QuantConfig(bits=4, group_size=32, embed_out=True))
    pallas = _apply(with_matmul_impl(qparams, "pallas"), ids)
    _assert_close(pallas, _apply(qparams, ids), _F32_REL)


def test_quantized_embedding_is_storage_for_the_model(params, ids, float_logits):
    qconfig = QuantConfig(bits=8, embed_in=True)
    qparams = quantize_params(CONFIG, params, qconfig)
    table = qparams["embed_in"]["embedding"]
    assert is_quantized(table) and table.scale.shape == (CONFIG.vocab_size, 1)  # per row
    usable = dequantize_params(qparams, only=("embed_in",))
    assert is_quantized(usable["layers"]["attention"]["dense"]["kernel"])
    _assert_close(_apply(usable, ids), float_logits, _INT8_MODEL_REL)


def test_grad_through_quantized_model(params, ids):
    """Float leaves get gradients, integer leaves get float0 (nothing) with allow_int."""
    qparams = quantize_params(CONFIG, params, QuantConfig(bits=4, group_size=32))
    model = GPTNeoX(CONFIG)

    def loss(p):
        logits = model.apply({"params": p}, ids)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grads = jax.grad(loss, allow_int=True)(qparams)
    kernel_grad = grads["layers"]["attention"]["query_key_value"]["kernel"]
    assert kernel_grad.qvalue.dtype == jax.dtypes.float0
    assert np.isfinite(kernel_grad.scale).all() and np.abs(kernel_grad.scale).max() > 0
    assert np.abs(grads["embed_in"]["embedding"]).max() > 0
    assert np.abs(grads["layers"]["mlp"]["dense_4h_to_h"]["bias"]).max() > 0


# ----------------------------------------------------------------- checkpoints
@pytest.mark.parametrize(
    "qconfig",
    [QuantConfig(bits=8), QuantConfig(bits=4, group_size=32, symmetric=False, embed_out=True)],
    ids=["int8", "int4-asym"],
)
def test_checkpoint_round_trip(tmp_path, params, ids, qconfig):
    qparams = quantize_params(CONFIG, params, qconfig)
    save_quantized(CONFIG, qconfig, qparams, tmp_path / "q")
    config, loaded_qconfig, loaded = load_quantized(tmp_path / "q")
    assert config == CONFIG and loaded_qconfig == qconfig
    assert jax.tree.structure(loaded) == jax.tree.structure(qparams)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(qparams), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # Shape-neutral overrides are allowed.
    _, q2, loaded = load_quantized(tmp_path / "q", qconfig=qconfig.replace(matmul_impl="pallas"))
    assert loaded["layers"]["attention"]["dense"]["kernel"].impl == "pallas"


def test_checkpoint_with_quantized_embedding_loads_for_the_model(tmp_path, params, ids):
    qconfig = QuantConfig(bits=8, embed_in=True)
    save_quantized(CONFIG, qconfig, quantize_params(CONFIG, params, qconfig), tmp_path / "q")
    config, _, loaded = load_quantized(tmp_path / "q")
    assert not is_quantized(loaded["embed_in"]["embedding"])
    assert np.isfinite(_apply(loaded, ids)).all()
    _, _, raw = load_quantized(tmp_path / "q", materialize_embed_in=False)
    assert is_quantized(raw["embed_in"]["embedding"])


def test_loading_with_the_wrong_config_fails_clearly(tmp_path, params):
    qconfig = QuantConfig(bits=4, group_size=32)
    save_quantized(CONFIG, qconfig, quantize_params(CONFIG, params, qconfig), tmp_path / "q")
    with pytest.raises(QuantizationError, match=r"qvalue.*found.*uint8.*imply.*int8.*bits=4"):
        load_quantized(tmp_path / "q", qconfig=QuantConfig(bits=8))
    with pytest.raises(QuantizationError, match="scale"):
        load_quantized(tmp_path / "q", qconfig=qconfig.replace(group_size=64))
    with pytest.raises(QuantizationError, match="hidden_size=64"):
        load_quantized(tmp_path / "q", config=dataclasses.replace(CONFIG, intermediate_size=256))


def test_loading_a_float_checkpoint_fails_clearly(tmp_path, params):
    from neox_jax.convert import save_checkpoint

    save_checkpoint(CONFIG, params, tmp_path / "float")
    with pytest.raises(QuantizationError, match="float checkpoint.*neox_jax.quantize"):
        load_quantized(tmp_path / "float")


def test_save_refuses_params_that_do_not_match_the_configs(tmp_path, params):
    qparams = quantize_params(CONFIG, params, QuantConfig(bits=8))
    with pytest.raises(QuantizationError, match="do not match"):
        save_quantized(CONFIG, QuantConfig(bits=4, group_size=32), qparams, tmp_path / "q")
    assert not (tmp_path / "q").exists()


# ------------------------------------------------------------------ bad input
def test_bad_settings_fail_clearly(params):
    with pytest.raises(QuantizationError, match="Unsupported bit width 3"):
        QuantConfig(bits=3)
    with pytest.raises(QuantizationError, match="odd"):
        QuantConfig(bits=4, group_size=33)
    with pytest.raises(QuantizationError, match="Unknown method"):
        QuantConfig(method="awq")
    # 48 does not divide the hidden size 64 (the input dim of qkv / h_to_4h).
    with pytest.raises(QuantizationError, match="group_size 48 does not divide .* 64.*32"):
        quantize_params(CONFIG, params, QuantConfig(bits=4, group_size=48))
    with pytest.raises(QuantizationError, match="calibration"):
        quantize_params(CONFIG, params, QuantConfig(bits=4, group_size=32, method="gptq"))
    qparams = quantize_params(CONFIG, params, QuantConfig(bits=8))
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_params(CONFIG, qparams, QuantConfig(bits=8))
    other = dataclasses.replace(CONFIG, hidden_size=128)
    with pytest.raises(QuantizationError, match="do not belong together"):
        quantize_params(other, params, QuantConfig(bits=8))


def test_pallas_rejects_shapes_it_cannot_tile():
    qw = quantize(jax.random.normal(jax.random.key(0), (64, 24)), 8, 64)
    with pytest.raises(QuantizationError, match="output size 24"):
        pallas_matmul(jnp.ones((1, 64)), qw, jnp.float32)

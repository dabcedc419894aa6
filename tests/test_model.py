"""ModelConfig, presets, parameter counts, KV cache and packing behaviour."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax.model import (
    PRESETS,
    GPTNeoX,
    ModelConfig,
    count_params,
    init_cache,
    init_params,
    param_logical_axes,
)
from neox_jax.model.family_presets import FAMILY_PRESETS
from neox_jax.model.moe_presets import MOE_PRESETS

# Published parameter counts (Hugging Face model cards / Pythia README; the 20B
# figure is the sum of the hub checkpoint's tensor sizes).
PUBLISHED = {
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
    "pythia-1.4b": 1_414_647_808,
    "pythia-2.8b": 2_775_208_960,
    "pythia-6.9b": 6_857_302_016,
    "pythia-12b": 11_846_072_320,
    "neox-20b": 20_554_567_680,
}
# Non-embedding counts from the Pythia README for the two small models.
NON_EMBEDDING = {"pythia-14m": 1_189_888, "pythia-31m": 4_739_072}

SMALL = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_parameter_counts(name):
    assert count_params(ModelConfig.from_preset(name)) == PUBLISHED[name]


@pytest.mark.parametrize("name", NON_EMBEDDING)
def test_small_pythia_non_embedding_counts(name):
    cfg = ModelConfig.from_preset(name)
    embeddings = 2 * cfg.vocab_size * cfg.hidden_size
    assert count_params(cfg) - embeddings == NON_EMBEDDING[name]


def test_preset_table_is_complete_and_architectural():
    expected = {
        "pythia-14m",
        "pythia-31m",
        "pythia-70m",
        "pythia-160m",
        "pythia-410m",
        "pythia-1b",
        "pythia-1.4b",
        "pythia-2.8b",
        "pythia-6.9b",
        "pythia-12b",
        "neox-20b",
        "neox-175b",
    }
    # tests/test_family_presets.py and tests/test_moe_presets.py check the others.
    assert set(PRESETS) - expected == FAMILY_PRESETS.keys() | MOE_PRESETS.keys()
    neox = ModelConfig.from_preset("neox-20b")
    assert (neox.head_dim, neox.rotary_ndims, neox.hidden_act) == (96, 24, "gelu_fast")
    assert ModelConfig.from_preset("pythia-2.8b").head_dim == 80
    assert ModelConfig.from_preset("pythia-1b").head_dim == 256


def test_neox_175b_counts_as_gpt3_shape():
    # GPT-3 175B's shape (Brown et al. 2020, Table 2.1: 96 x 12288, 96 heads, "175.0B")
    # with GPT-NeoX's blocks. Per layer: fused QKV (3E^2 + 3E), dense (E^2 + E), MLP
    # (2EF + F + E) and two LayerNorms (4E); plus untied embeddings 2VE and the final norm.
    cfg = ModelConfig.from_preset("neox-175b")
    L, E, F, V = 96, 12288, 4 * 12288, 50432  # noqa: N806
    per_layer = 4 * E * E + 4 * E + 2 * E * F + F + E + 4 * E
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim) == (L, E, 128)
    assert count_params(cfg) == L * per_layer + 2 * V * E + 2 * E == 175_200_952_320
    # GPT-3's count differs by its 50257-token tied embedding and learned positions.
    assert abs(count_params(cfg) / 175.0e9 - 1) < 0.002


def test_count_params_allocates_nothing():
    # 20B parameters in fp32 would be 82 GB: eval_shape must not materialise them.
    assert count_params(ModelConfig.from_preset("neox-20b")) > 2e10


def test_the_layer_body_is_traced_once_per_trace(monkeypatch):
    # Tracing dominates small programs' start-up (and this suite's time): the scanned
    # layer must be traced once per forward or init trace, not twice (Flax's default
    # nn.scan traces it again to check loop invariance), and abstract_params /
    # param_logical_axes must reuse one trace per config. Counted through `attend`,
    # which every layer calls once per trace.
    import neox_jax.model.layers as layers
    import neox_jax.model.transformer as transformer
    from neox_jax.model import abstract_params

    transformer._abstract_variables.cache_clear()  # counted from an empty cache

    calls = []
    real = layers.attend
    monkeypatch.setattr(layers, "attend", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = dataclasses.replace(SMALL, num_hidden_layers=3, vocab_size=72)
    params = init_params(config, jax.random.key(0))
    assert len(calls) == 1
    ids = jnp.zeros((1, 5), jnp.int32)
    jax.make_jaxpr(lambda p: GPTNeoX(config).apply({"params": p}, ids))(params)
    assert len(calls) == 2
    shapes = abstract_params(config)
    axes = param_logical_axes(config)
    assert len(calls) == 3  # one trace of init for both
    again = abstract_params(config)
    assert len(calls) == 3 and again == shapes and again is not shapes
    assert param_logical_axes(config) == axes
    assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == jax.tree.map(
        lambda x: (x.shape, x.dtype), params
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hidden_size=30), "not divisible by num_attention_heads"),
        (dict(rotary_pct=0.375), "is odd"),  # int(8 * 0.375) = 3
        (dict(rotary_pct=1.5), r"rotary_pct must lie in \[0, 1\]"),
        (dict(hidden_act="gelu_bogus"), "Unknown hidden_act 'gelu_bogus'"),
        (dict(attention_impl="cuda"), "Unknown attention_impl"),
        (dict(dtype="float8"), "Unknown dtype"),
        (dict(remat="sometimes"), "Unknown remat"),
        (dict(scan_unroll=0), "scan_unroll must be an integer >= 1"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
        (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling"),
        (dict(rope_scaling={"type": "linear", "factor": 0.5}), "factor"),
    ],
)
def test_invalid_configs_raise_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SMALL, **change)


def test_unknown_preset_and_fields():
    with pytest.raises(ValueError, match="Unknown preset 'pythia-7b'"):
        ModelConfig.from_preset("pythia-7b")
    with pytest.raises(ValueError, match="Unknown ModelConfig fields"):
        ModelConfig.from_dict({**SMALL.to_dict(), "n_layer": 3})


def test_config_json_round_trip_and_hashable():
    cfg = SMALL.replace(rope_scaling={"type": "linear", "factor": 2.0})
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert hash(cfg) == hash(ModelConfig.from_json(cfg.to_json()))


def test_every_parameter_has_logical_axes():
    axes = param_logical_axes(SMALL)
    shapes = jax.eval_shape(lambda: init_params(SMALL, jax.random.key(0)))
    for spec, shape in zip(
        jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
        jax.tree.leaves(shapes),
        strict=True,
    ):
        assert len(spec) == len(shape.shape) and all(name is not None for name in spec)


def _ids(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, SMALL.vocab_size, shape), jnp.int32)


def test_kv_cache_decode_equals_full_recomputation():
    params = init_params(SMALL, jax.random.key(0))
    model = GPTNeoX(SMALL)
    ids = _ids((2, 12))
    full = model.apply({"params": params}, ids)
    # Prefill 5 tokens, then feed 3, then 1 at a time.
    cache = init_cache(SMALL, 2, 16)
    pieces = []
    apply = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c))  # not op by op
    for start, stop in [(0, 5), (5, 8), *[(i, i + 1) for i in range(8, 12)]]:
        out = apply(params, ids[:, start:stop], cache)
        cache = out.cache
        pieces.append(out.logits)
    # Same math, different op order (masked softmax over a longer cache): fp32 round-off.
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, rtol=1e-5, atol=1e-5)
    assert int(cache["index"]) == 12


def test_packed_segments_do_not_attend_across_documents():
    params = init_params(SMALL, jax.random.key(1))
    model = GPTNeoX(SMALL)
    a, b = _ids((1, 7), 1), _ids((1, 5), 2)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 4), jnp.int32)], axis=1)
    segments = jnp.asarray([[1] * 7 + [2] * 5 + [0] * 4])
    positions = jnp.asarray([list(range(7)) + list(range(5)) + [0] * 4])
    out = model.apply({"params": params}, packed, positions, segments)
    np.testing.assert_allclose(out[:, :7], model.apply({"params": params}, a), atol=1e-5)
    np.testing.assert_allclose(out[:, 7:12], model.apply({"params": params}, b), atol=1e-5)
    assert np.all(np.isfinite(np.asarray(out)))  # fully masked padding rows stay finite


def test_remat_and_bf16_params_run():
    ids = _ids((2, 8))
    base = init_params(SMALL, jax.random.key(2))
    ref = GPTNeoX(SMALL).apply({"params": base}, ids)
    for policy in ("full", "dots", "dots_no_batch"):
        cfg = SMALL.replace(remat=policy)
        loss = lambda p, cfg=cfg: GPTNeoX(cfg).apply({"params": p}, ids).mean()  # noqa: E731
        grads = jax.jit(jax.grad(loss))(base)  # jitted, as training runs remat (not eager)
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
        np.testing.assert_allclose(GPTNeoX(cfg).apply({"params": base}, ids), ref, atol=1e-6)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    out = GPTNeoX(SMALL.replace(param_dtype="bfloat16", dtype="bfloat16")).apply(
        {"params": half}, ids
    )
    assert out.dtype == jnp.float32 and out.shape == (2, 8, SMALL.vocab_size)


def test_unrolled_layer_stack_gives_the_same_values_and_gradients():
    """``scan_unroll`` changes how the layer loop compiles, not what it computes: the
    stack unrolled whole (and by a factor that does not divide the depth) against the
    one-layer loop, jitted as training runs it."""
    ids = _ids((2, 8))
    cfg = SMALL.replace(num_hidden_layers=3)
    params = init_params(cfg, jax.random.key(4))

    def value_and_grad(cfg):
        loss = lambda p: GPTNeoX(cfg).apply({"params": p}, ids).mean()  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    ref_loss, ref_grads = value_and_grad(cfg)
    for unroll in (2, 100):  # 2 of 3 layers per iteration; 100: the whole stack
        got_loss, got_grads = value_and_grad(cfg.replace(scan_unroll=unroll))
        # The same ops in the same order; XLA may fuse the unrolled layers differently,
        # so fp32 round-off (1e-6) is allowed, nothing more.
        np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
        for g, r in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads), strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["linear", "ntk"])
def test_rope_scaling(kind):
    """Factor 1 equals no scaling; a real factor changes the outputs."""
    cfg = SMALL.replace(rotary_pct=1.0)  # 8 rotary dims, so NTK has frequencies to stretch
    params = init_params(cfg, jax.random.key(3))
    ids = _ids((1, 20))
    plain = GPTNeoX(cfg).apply({"params": params}, ids)
    same = GPTNeoX(cfg.replace(rope_scaling={"type": kind, "factor": 1.0})).apply(
        {"params": params}, ids
    )
    np.testing.assert_allclose(same, plain, atol=1e-6)
    scaled = GPTNeoX(cfg.replace(rope_scaling={"type": kind, "factor": 4.0})).apply(
        {"params": params}, ids
    )
    assert not np.allclose(scaled, plain, atol=1e-3)

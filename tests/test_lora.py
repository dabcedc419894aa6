"""LoRA: identity at init, merge, frozen base (values and gradients), shapes, QLoRA, errors."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.hf_reference import assert_logits_close
from helpers.xla import xla_flags

from neox_jax.finetune.lora import (
    LoraConfig,
    LoraError,
    adapter_logical_axes,
    init_adapters,
    lora_apply_fn,
    merge,
    trainable_fraction,
)
from neox_jax.model import GPTNeoX, ModelConfig, init_params, param_logical_axes
from neox_jax.training.step import TrainState, loss_and_grads, model_apply_fn, train_step

# Sizes chosen so no activation shape equals a kernel shape: a [32, 96]-shaped value in
# the backward pass can only be a kernel gradient (see test_base_gets_no_gradient).
CONFIG = ModelConfig(
    vocab_size=72, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80
)
ALL = LoraConfig(
    targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"), rank=4, alpha=8.0
)


@pytest.fixture(scope="module")
def base():
    return jax.jit(init_params, static_argnums=0)(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {"tokens": jnp.asarray(rng.integers(0, 72, (2, 13)), jnp.int32)}


def _random_adapters(lora, seed=1):
    """Adapters with non-zero B, so every comparison below can fail."""
    ad = init_adapters(CONFIG, lora, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 16))
    return jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), ad)


# Jitted once per module (same shapes everywhere), so tests share the compiled programs.
PLAIN = jax.jit(GPTNeoX(CONFIG).apply)


@functools.cache
def _jitted_lora(lora: LoraConfig, deterministic: bool = True):
    return jax.jit(lora_apply_fn(CONFIG, lora, deterministic=deterministic))


def _logits(lora, adapters, base, tokens, rng=None, deterministic=True):
    return _jitted_lora(lora, deterministic)(adapters, base, tokens, None, None, rng)


def test_initial_adapters_leave_the_model_unchanged(base, batch):
    ad = init_adapters(CONFIG, ALL, jax.random.key(3))
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(ad) if x.shape[1] == 4)
    plain = PLAIN({"params": base}, batch["tokens"])
    adapted = _logits(ALL, ad, base, batch["tokens"])
    # B = 0 makes each update exactly 0.0 and y + 0.0 == y in IEEE arithmetic.
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(plain))
    a = ad["layers"]["attention"]["query_key_value"]["lora_a"]
    # PEFT's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), std 1/sqrt(3 in);
    # 256 draws estimate the std within a few percent.
    assert float(jnp.abs(a).max()) <= 1 / np.sqrt(32)
    assert abs(float(a.std()) * np.sqrt(3 * 32) - 1) < 0.2


def test_merged_equals_unmerged(base, batch):
    ad = _random_adapters(ALL)
    unmerged = _logits(ALL, ad, base, batch["tokens"])
    merged = PLAIN({"params": jax.jit(merge, static_argnums=2)(base, ad, ALL)}, batch["tokens"])
    plain = PLAIN({"params": base}, batch["tokens"])
    assert float(jnp.abs(unmerged - plain).max()) > 1e-2  # the adapters do something
    # (W + s A B) x vs W x + s (x A) B: the same sums in another order, fp32 round-off,
    # bounded as in hf_reference by 1e-5 of the largest logit.
    assert_logits_close(merged, unmerged)


def _state(tx, params, frozen):
    return TrainState(
        jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0), frozen
    )


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "qlora-int8"])
def test_training_changes_only_the_adapters(base, batch, quantized):
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.1)
    frozen = base
    if quantized:
        from neox_jax.quant import QuantConfig, is_quantized, quantize_params

        frozen = quantize_params(CONFIG, base, QuantConfig(bits=8))
        assert is_quantized(frozen["layers"]["attention"]["dense"]["kernel"])
    tx = optax.adam(1e-2)
    state = _state(tx, init_adapters(CONFIG, lora, jax.random.key(0)), frozen)
    before = jax.tree.map(np.asarray, (state.params, state.frozen))
    step = jax.jit(lambda s, b: train_step(s, b, tx=tx, apply_fn=lora_apply_fn(CONFIG, lora)))
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.frozen), before[1])
    after = jax.tree.leaves(state.params)
    assert all(
        not np.array_equal(a, b) for a, b in zip(after, jax.tree.leaves(before[0]), strict=True)
    )
    # Only the adapters carry optimizer moments.
    mu = state.opt_state[0].mu
    assert jax.tree.structure(mu) == jax.tree.structure(state.params)


def _dot_shapes(jaxpr) -> set[tuple[int, ...]]:
    """Output shapes of every dot_general in a jaxpr, sub-jaxprs (scan, jit, remat) included."""
    shapes = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.add(tuple(eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes |= _dot_shapes(inner)
    return shapes


def test_base_gets_no_gradient(base, batch):
    lora = LoraConfig(rank=4)  # attention only
    ad = init_adapters(CONFIG, lora, jax.random.key(0))
    grad_fn = lambda p, f: loss_and_grads(p, f, batch, None, lora_apply_fn(CONFIG, lora))[2]  # noqa: E731
    grads = jax.eval_shape(grad_fn, ad, base)
    assert jax.tree.structure(grads) == jax.tree.structure(ad)  # nothing but adapters
    kernels = {tuple(x.shape[1:]) for x in jax.tree.leaves(base["layers"]) if x.ndim == 3}
    kernels.add(tuple(base["embed_out"]["kernel"].shape))
    kernels |= {k[::-1] for k in kernels}  # a kernel gradient may be formed transposed
    lora_dots = _dot_shapes(jax.make_jaxpr(grad_fn)(ad, base).jaxpr)
    assert not kernels & lora_dots, kernels & lora_dots
    # Control: differentiating the base does produce those shapes, so the check can fail.
    full = lambda p: loss_and_grads(p, None, batch, None, model_apply_fn(CONFIG))[2]  # noqa: E731
    full_dots = _dot_shapes(jax.make_jaxpr(full)(base).jaxpr)
    assert all(k in full_dots or k[::-1] in full_dots for k in kernels)


def test_dropout_only_in_training(base, batch):
    lora = LoraConfig(rank=4, dropout=0.5)
    ad = _random_adapters(lora)
    key = jax.random.PRNGKey(0)
    train = _logits(lora, ad, base, batch["tokens"], key, deterministic=False)
    evals = _logits(lora, ad, base, batch["tokens"], key)
    nodrop = _logits(LoraConfig(rank=4), ad, base, batch["tokens"])
    np.testing.assert_array_equal(evals, nodrop)
    assert float(jnp.abs(train - evals).max()) > 1e-3


def test_adapter_axes_follow_the_adapted_kernels():
    kernel = param_logical_axes(CONFIG)["layers"]
    specs = adapter_logical_axes(CONFIG, ALL)["layers"]
    for group, name in (("attention", "query_key_value"), ("mlp", "dense_4h_to_h")):
        k = tuple(kernel[group][name]["kernel"])
        assert tuple(specs[group][name]["lora_a"]) == (k[0], k[1], "lora_rank")
        assert tuple(specs[group][name]["lora_b"]) == (k[0], "lora_rank", k[2])


def test_neox_20b_rank_8_attention_trains_under_one_percent():
    n_lora, n_base, frac = trainable_fraction(ModelConfig.from_preset("neox-20b"), LoraConfig())
    # 44 layers x r=8 x (6144 + 3 * 6144 for query_key_value + 2 * 6144 for dense).
    assert n_lora == 44 * 8 * 6 * 6144 and n_base == 20_554_567_680
    assert frac < 0.01


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"targets": ("c_attn",)}, "matches no linear layer.*valid targets: query_key_value"),
        ({"targets": ""}, "targets is empty"),
        ({"rank": 0}, "positive integer"),
        ({"dropout": 1.0}, r"dropout must lie in \[0, 1\)"),
        ({"init": "pissa"}, "Unknown lora.init"),
    ],
)
def test_bad_lora_settings_fail_clearly(kwargs, message):
    with pytest.raises(LoraError, match=message):
        LoraConfig(**kwargs)


def test_rank_above_the_dimension_fails_clearly():
    with pytest.raises(LoraError, match="not layers of this gpt_neox model.*query_key_value"):
        init_adapters(CONFIG, LoraConfig(targets="q_proj"), jax.random.key(0))  # Llama's name
    with pytest.raises(LoraError, match=r"lora.rank=40 exceeds .*attention.dense \(\[32, 32\]\)"):
        init_adapters(CONFIG, LoraConfig(targets="dense", rank=40), jax.random.key(0))
    assert LoraConfig(targets="attention.dense,mlp.dense_h_to_4h").targets == (
        "dense",
        "dense_h_to_4h",
    )


SHARDING_CHECK = """
import jax, optax
from neox_jax.finetune.lora import LoraConfig, abstract_adapters, adapter_logical_axes
from neox_jax.model import ModelConfig, abstract_params, param_logical_axes
from neox_jax.parallel.mesh import AXES
from neox_jax.training.state import abstract_train_state
import numpy as np
config = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64)
lora = LoraConfig(targets="query_key_value,dense,dense_h_to_4h,dense_4h_to_h", rank=4)
mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 1, 2, 1, 2), AXES)  # expert = 1
_, sh = abstract_train_state(optax.adam(1e-3), abstract_adapters(config, lora),
    adapter_logical_axes(config, lora), mesh, abstract_frozen=abstract_params(config),
    frozen_specs=param_logical_axes(config))
for group, name in [("attention", "query_key_value"), ("attention", "dense"),
                    ("mlp", "dense_h_to_4h"), ("mlp", "dense_4h_to_h")]:
    k = tuple(sh.frozen["layers"][group][name]["kernel"].spec)
    a = tuple(sh.params["layers"][group][name]["lora_a"].spec)
    b = tuple(sh.params["layers"][group][name]["lora_b"].spec)
    mu = sh.opt_state[0].mu["layers"][group][name]["lora_a"].spec
    assert "tensor" in k and "fsdp" in k, k
    assert a == (k[0], k[1], None) and b == (k[0], None, k[2]) and tuple(mu) == a, (k, a, b)
print("ok")
"""


def test_adapters_shard_like_their_kernels_on_a_mesh():
    """On a 2 x 2 (fsdp x tensor) mesh of fake CPU devices, in its own process."""
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags(4),
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-c", SHARDING_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]

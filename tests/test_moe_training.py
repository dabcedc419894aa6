"""Training terms of a mixture of experts: the load-balancing loss against transformers'
``load_balancing_loss_func`` (through ``Qwen3MoeForCausalLM``'s ``aux_loss``), the
router z-loss and expert load against direct numpy computations from transformers'
router logits, and the terms in the train step and the trainer's metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from helpers.train import logged, tiny_config, write_dataset
from test_moe import make_moe_model

from neox_jax.convert import load_hf
from neox_jax.model import GPTNeoX
from neox_jax.model.moe_terms import router_terms
from neox_jax.training.step import TrainState, eval_step, model_apply_fn, train_step
from neox_jax.training.trainer import train_and_evaluate


def _padded_batch(vocab):
    ids = np.random.default_rng(2).integers(0, vocab, (2, 10))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def test_router_terms_match_transformers(tmp_path):
    # 3 layers with a dense one between: only the sparse layers' router logits count.
    ref = make_moe_model(
        "qwen3_moe", tmp_path, num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=True
    )
    config, params = load_hf(tmp_path)
    ids, mask = _padded_batch(config.vocab_size)
    with torch.no_grad():
        out = ref(torch.tensor(ids), attention_mask=torch.tensor(mask), output_router_logits=True)
    _, state = GPTNeoX(config).apply(
        {"params": params}, jnp.asarray(ids), attention_mask=mask, mutable=["intermediates"]
    )
    terms = router_terms(config, state["intermediates"])
    # fp32 sums over ~40 tokens: agreement to round-off (1e-6 relative; the loss is O(1)).
    np.testing.assert_allclose(terms["aux_loss"], out.aux_loss.item(), rtol=1e-6)

    logits = np.stack([t.numpy() for t in out.router_logits])  # [sparse layers, N, X]
    real = mask.reshape(-1).astype(bool)
    lse = np.log(np.exp(logits).sum(-1))[:, real]
    np.testing.assert_allclose(terms["z_loss"], np.mean(lse**2), rtol=1e-5)
    top = np.argsort(-logits, axis=-1)[:, real, : config.num_experts_per_tok]
    counts = np.stack([np.bincount(t.ravel(), minlength=config.num_experts) for t in top])
    load = counts / (real.sum() * config.num_experts_per_tok) * config.num_experts
    np.testing.assert_allclose(terms["max_load"], load.max(-1).mean(), rtol=1e-6)
    np.testing.assert_allclose(terms["min_load"], load.min(-1).mean(), rtol=1e-6)


def test_train_step_adds_weighted_router_losses(tmp_path):
    """The step's loss is the cross entropy (what evaluation reports) plus the weighted
    router losses, and the step reports them (fp32 sums of a few dozen terms: 1e-5)."""
    make_moe_model("mixtral", tmp_path)
    config, params = load_hf(tmp_path, router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (4, 9))
    batch = {"tokens": jnp.asarray(tokens)}
    apply_fn = model_apply_fn(config)
    tx = optax.sgd(1e-2)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.key(0))
    step = jax.jit(lambda s, b: train_step(s, b, tx=tx, apply_fn=apply_fn))
    _, metrics = step(state, batch)
    assert {"moe/aux_loss", "moe/z_loss", "moe/max_load", "moe/min_load"} <= set(metrics)
    evaluated = eval_step(params, None, batch, apply_fn=apply_fn)
    ce = evaluated["loss_sum"] / evaluated["tokens"]
    expected = ce + 0.5 * metrics["moe/aux_loss"] + 0.1 * metrics["moe/z_loss"]
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    assert metrics["loss"] - ce > 0.1  # the router terms are there


def test_trainer_logs_expert_load(tmp_path):
    """A tiny MoE trains through the trainer (capacity mode) and logs the router terms."""
    data = write_dataset(tmp_path / "counting")
    config = tiny_config(
        data,
        **{
            "train.steps": 4,
            "train.eval_every": 4,
            "train.save_every": 4,
            "model.norm_type": "rmsnorm",
            "model.gated_mlp": True,
            "model.mlp_bias": False,
            "model.num_experts": 4,
            "model.moe_intermediate_size": 16,
            "model.moe_impl": "capacity",
            "model.router_aux_loss_coef": 0.01,
        },
    )
    train_and_evaluate(config, tmp_path / "run")
    losses = logged(tmp_path / "run")
    assert np.all(np.isfinite(list(losses.values())))
    import json

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert all("moe/aux_loss" in r and "moe/dropped" in r for r in train_rows)
    assert all(r["moe/max_load"] >= 1.0 >= r["moe/min_load"] for r in train_rows)


def test_pipeline_refuses_router_losses_it_would_drop():
    import pytest

    from neox_jax.errors import UserError
    from neox_jax.model import ModelConfig
    from neox_jax.training.step import pipeline_apply_fn

    config = ModelConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, gated_mlp=True, mlp_bias=False, num_experts=4,
        router_aux_loss_coef=0.01,
    )  # fmt: skip
    with pytest.raises(UserError, match="router losses would be silently missing"):
        pipeline_apply_fn(config, 2)
    pipeline_apply_fn(config.replace(router_aux_loss_coef=0.0), 2)  # no losses: allowed


# A tiny Mixtral: every field transformers' MixtralForCausalLM fixes, so that the expert
# width is the one thing that keeps it from exporting.
MIXTRAL = {
    "model.model_type": "mixtral", "model.norm_type": "rmsnorm", "model.gated_mlp": True,
    "model.mlp_bias": False, "model.fused_qkv": False, "model.attention_bias": False,
    "model.use_parallel_residual": False, "model.rotary_pct": 1.0, "model.num_experts": 4,
    "model.num_experts_per_tok": 2, "model.norm_topk_prob": True,
}  # fmt: skip


def test_trainer_warns_before_the_first_step_that_the_moe_cannot_be_exported(tmp_path, caplog):
    """Mixtral in transformers has one MLP width; a run with moe_intermediate_size !=
    intermediate_size trains, but export refuses it: say so when the run starts."""
    import logging

    import pytest

    from neox_jax.convert import save_hf
    from neox_jax.errors import UserError
    from neox_jax.loading import load_model
    from neox_jax.model import ModelConfig
    from neox_jax.training.config_checks import warn_if_not_exportable

    config = tiny_config(
        write_dataset(tmp_path / "counting"),
        **MIXTRAL,
        **{"train.steps": 2, "train.eval_every": 2, "train.save_every": 2},
        **{"model.moe_intermediate_size": 16},  # intermediate_size is 64
    )
    caplog.set_level(logging.INFO)
    train_and_evaluate(config, tmp_path / "run")
    messages = [r.getMessage() for r in caplog.records]
    warned = [i for i, m in enumerate(messages) if "cannot be exported" in m]
    first_step = next(i for i, m in enumerate(messages) if m.startswith("step 1/"))
    assert warned and warned[0] < first_step, messages
    assert "moe_intermediate_size=16, intermediate_size=64" in messages[warned[0]]
    # The warning tells the truth: export refuses the trained model...
    with pytest.raises(UserError, match="moe_intermediate_size"):
        save_hf(*load_model(tmp_path / "run"), tmp_path / "hf")
    # ...and the width is the only reason: with one width, or as qwen3_moe (both widths,
    # given its qk_norm), the same model exports without a warning.
    model = ModelConfig.from_dict(config.model.to_dict())
    assert warn_if_not_exportable(model.replace(moe_intermediate_size=None)) is None
    assert warn_if_not_exportable(model.replace(moe_intermediate_size=64)) is None
    assert warn_if_not_exportable(model.replace(model_type="qwen3_moe", qk_norm=True)) is None

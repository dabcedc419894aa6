"""The training loop: loss falls, exact resume, accumulation, recompiles, bad input."""

import functools
import signal
import subprocess
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.train import REPO, logged, run_train, tiny_config, train_command, write_dataset

from neox_jax.model import ModelConfig, init_params
from neox_jax.training.step import TrainState, loss_and_grads, model_apply_fn, train_step
from neox_jax.training.trainer import NonFiniteLossError, train_and_evaluate


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "counting")


def test_loss_falls_and_checkpoints(dataset, tmp_path):
    config = tiny_config(dataset, **{"train.steps": 30, "train.save_every": 15})
    result = train_and_evaluate(config, tmp_path)
    losses = logged(tmp_path)
    assert losses[30] < 0.5 * losses[1], losses
    assert result["eval_loss"] < losses[1]
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert steps == [15, 30]
    assert (tmp_path / "config.json").is_file()
    assert list((tmp_path / "tensorboard").iterdir())


def test_stdlib_corpus_end_to_end(tmp_path):
    """The README's main job, shrunk: stdlib source -> tokenizer -> dataset -> falling loss."""
    config = tiny_config(
        "",
        **{
            "data.source": "stdlib",
            "data.stdlib_max_mb": 0.3,
            "data.tokenizer_vocab_size": 512,
            "model.vocab_size": 512,
            "data.seq_len": 32,
            "train.steps": 30,
            "optimizer.lr": 3e-3,
        },
    )
    train_and_evaluate(config, tmp_path)
    losses = logged(tmp_path)
    assert losses[30] < losses[1] - 0.5, losses  # from ln(512) = 6.2 at initialisation
    assert (tmp_path / "data" / "tokenizer.model").is_file()
    assert (tmp_path / "tokenizer" / "tokenizer.model").is_file()


def test_exact_resume_after_sigkill(dataset, tmp_path):
    """20 steps straight == 10 steps, SIGKILL, resume for 10 (bitwise on CPU)."""
    config = tiny_config(
        dataset, **{"train.steps": 20, "train.save_every": 10, "train.eval_every": 100}
    )
    straight = run_train(config, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    # The interrupted run: killed once step 10's checkpoint is complete and it has moved on.
    proc = run_train(config, tmp_path / "killed", wait=False)
    ckpt = tmp_path / "killed" / "checkpoints" / "10"
    deadline = time.time() + 300
    while not (ckpt.is_dir() and max(logged(tmp_path / "killed"), default=0) >= 12):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_losses = logged(tmp_path / "killed")
    assert max(killed_losses) < 20
    resumed = run_train(config, tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = logged(tmp_path / "killed")  # resumed steps overwrite the killed ones
    ref = logged(tmp_path / "straight")
    assert [after[s] for s in range(1, 21)] == [ref[s] for s in range(1, 21)]


def test_sigterm_saves_and_exits(dataset, tmp_path):
    config = tiny_config(
        dataset, **{"train.steps": 100000, "train.save_every": 100000, "train.eval_every": 100000}
    )
    proc = run_train(config, tmp_path, wait=False)
    deadline = time.time() + 300
    while max(logged(tmp_path), default=0) < 3:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 3


SMALL = ModelConfig(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
)


def _state(tx, params):
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(0),
    )


def test_gradient_accumulation_equals_full_batch():
    params = init_params(SMALL, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (8, 17)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (8, 17)), jnp.int32)  # uneven counts per row
    batch = {"tokens": tokens, "loss_mask": mask}
    apply_fn = model_apply_fn(SMALL)
    key = jax.random.PRNGKey(0)
    # Jitted: one program per microbatch count instead of one per op of the eager model.
    grads = jax.jit(loss_and_grads, static_argnums=(4, 5))
    full = grads(params, None, batch, key, apply_fn, 1)
    for k in (2, 4):
        acc = grads(params, None, batch, key, apply_fn, k)
        # Same sums in a different order: fp32 round-off only.
        np.testing.assert_allclose(acc[0], full[0], rtol=1e-6)
        assert float(acc[1]) == float(full[1])
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), acc[2], full[2]
        )


def test_train_step_compiles_once():
    tx = optax.adamw(1e-3)
    params = init_params(SMALL, jax.random.key(1))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, batch):
        return train_step(state, batch, tx=tx, apply_fn=model_apply_fn(SMALL))

    state = _state(tx, params)
    rng = np.random.default_rng(1)
    for _ in range(4):
        batch = {"tokens": jnp.asarray(rng.integers(0, 64, (4, 9)), jnp.int32)}
        state, metrics = step(state, batch)
    assert int(state.step) == 4 and np.isfinite(float(metrics["loss"]))


def test_nonfinite_skip_keeps_state():
    tx = optax.sgd(1e-2)
    params = init_params(SMALL, jax.random.key(2))
    bad = jax.tree.map(lambda x: x, params)
    bad["embed_out"]["kernel"] = bad["embed_out"]["kernel"].at[0, 0].set(jnp.nan)
    state = _state(tx, bad)
    batch = {"tokens": jnp.ones((2, 5), jnp.int32)}
    step = jax.jit(functools.partial(train_step, tx=tx, apply_fn=model_apply_fn(SMALL)),
                   static_argnames="skip_nonfinite")  # fmt: skip
    new, metrics = step(state, batch, skip_nonfinite=True)
    assert int(metrics["skipped"]) == 1 and int(new.step) == 1
    chex.assert_trees_all_equal(new.params, state.params)


def test_nonfinite_stop_keeps_last_good_checkpoint(dataset, tmp_path):
    config = tiny_config(
        dataset,
        **{
            "optimizer.lr": 1e9,
            "optimizer.grad_clip": 0.0,
            "train.steps": 40,
            "train.save_every": 1,
            "train.log_every": 1,
        },
    )
    with pytest.raises(NonFiniteLossError, match="non-finite.*latest complete checkpoint"):
        train_and_evaluate(config, tmp_path)
    for step_dir in (tmp_path / "checkpoints").iterdir():
        # Every checkpoint on disk holds finite parameters.
        from neox_jax.convert import load_checkpoint

        _, params = load_checkpoint(step_dir)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mesh.data": 3}, "does not divide|has 3 devices"),
        ({"data.global_batch_size": 6, "train.microbatches": 4}, "not divisible by"),
        ({"data.paths": "/nonexistent/prefix"}, "not found"),
        ({"data.source": "s3"}, "Unknown data.source"),
        (
            {
                "model.vocab_size": 8,
                "data.source": "stdlib",
                "data.paths": "",  # stdlib refuses paths it would ignore
                "data.stdlib_max_mb": 0.05,
                "data.tokenizer_vocab_size": 512,
            },
            "tokenizer has 512 tokens",
        ),
    ],
)
def test_bad_config_errors(dataset, tmp_path, overrides, message):
    config = tiny_config(dataset, **overrides)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train_and_evaluate(config, tmp_path)


def test_cli_runs_and_locked_config_rejects_unknown_keys(dataset, tmp_path):
    r = run_train(tiny_config(dataset), tmp_path / "ok")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 12/12" in r.stdout
    cmd = train_command(tiny_config(dataset), tmp_path / "bad")
    bad = subprocess.run(
        [*cmd, "--config.optimizer.learning_rate=1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert bad.returncode != 0 and "learning_rate" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_changed_model_refuses_to_resume(dataset, tmp_path):
    train_and_evaluate(tiny_config(dataset, **{"train.steps": 6}), tmp_path)
    config = tiny_config(dataset, **{"train.steps": 12, "model.hidden_size": 64})
    with pytest.raises(ValueError, match="hidden_size: checkpoint 32 vs config 64"):
        train_and_evaluate(config, tmp_path)

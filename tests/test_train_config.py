"""Training-config validation: every bad value is refused before anything is written,
loaded or compiled, naming the field and what is allowed."""

import jax
import pytest
from helpers.train import tiny_config, write_dataset

from neox_jax.convert import save_hf
from neox_jax.errors import UserError
from neox_jax.model import ModelConfig, init_params
from neox_jax.training.trainer import train_and_evaluate


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "counting")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data.seq_len": 4096}, r"data.seq_len=4096 exceeds the model's context of 2048"),
        ({"train.steps": 0}, r"train.steps=0 must be a whole number >= 1"),
        ({"optimizer.lr": -1e-3}, r"optimizer.lr=-0.001 must be a number in \(0, inf\)"),
        ({"optimizer.b2": 1.0}, r"optimizer.b2=1.0 must be a number in \[0, 1\)"),
        ({"train.eval_batches": 0}, r"eval_batches=0 .*set train.eval_every above"),
        ({"train.nonfinite": "ignore"}, r"nonfinite='ignore' .*'stop', 'skip'"),
        ({"train.save_every": 0}, r"train.save_every=0 must be a whole number >= 1"),
        ({"train.log_every": 0}, r"train.log_every=0"),
        ({"train.eval_every": 0}, r"train.eval_every=0"),
        ({"optimizer.warmup_steps": -2}, r"warmup_steps=-2 .* >= -1"),
        ({"data.global_batch_size": 0}, r"global_batch_size=0"),
    ],
)
def test_bad_values_are_refused_before_the_workdir_is_made(dataset, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        train_and_evaluate(tiny_config(dataset, **overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_model_section_missing_a_field_is_named(dataset, tmp_path):
    config = tiny_config(dataset)
    config.unlock()
    del config.model["vocab_size"]  # would default to the 20B's 50432
    with pytest.raises(UserError, match="lacks vocab_size; set --config.model.vocab_size"):
        train_and_evaluate(config, tmp_path / "run")


def test_a_workdir_that_is_a_file(dataset, tmp_path):
    (tmp_path / "f").write_text("not a folder")
    with pytest.raises(UserError, match="is a file"):
        train_and_evaluate(tiny_config(dataset), tmp_path / "f")
    with pytest.raises(UserError, match="is a file, not a folder"):
        train_and_evaluate(tiny_config(dataset), tmp_path / "f" / "run")
    assert (tmp_path / "f").read_text() == "not a folder"


def test_init_from_a_truncated_safetensors_file(dataset, tmp_path):
    config = ModelConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64,
    )  # fmt: skip
    hf = save_hf(config, init_params(config, jax.random.key(0)), tmp_path / "hf")
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match="model.safetensors is truncated"):
        train_and_evaluate(tiny_config(dataset, **{"train.init_from": str(hf)}), tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoints").exists() or not any(
        (tmp_path / "r" / "checkpoints").iterdir()
    )


def test_seq_len_is_checked_against_init_from_s_model(dataset, tmp_path):
    config = ModelConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=8,
    )  # fmt: skip
    hf = save_hf(config, init_params(config, jax.random.key(0)), tmp_path / "hf")
    overrides = {"train.init_from": str(hf), "data.seq_len": 16}
    with pytest.raises(UserError, match="seq_len=16 exceeds the model's context of 8"):
        train_and_evaluate(tiny_config(dataset, **overrides), tmp_path / "r")

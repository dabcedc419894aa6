"""Which data source a config trains on: fields of another source are never ignored silently."""

import pytest

from configs import pretrain
from neox_jax.errors import UserError
from neox_jax.training.data import resolve_tokenizer_and_paths


@pytest.mark.parametrize(
    "field, value",
    [("paths", "data/train"), ("tokenizer", "tokenizer.json"), ("eval_paths", "data/val")],
)
def test_tiny_preset_with_indexed_fields_says_how_to_select_them(tmp_path, field, value):
    # #14 item 3: the tiny preset keeps data.source="stdlib", which read neither field and
    # trained a fresh stdlib tokenizer instead of the user's data.
    config = pretrain.get_config("tiny")
    setattr(config.data, field, value)
    with pytest.raises(UserError, match=f"data.{field} .*--config.data.source=indexed"):
        resolve_tokenizer_and_paths(config.data, tmp_path)
    assert not (tmp_path / "data").exists()  # nothing prepared before the error


def test_indexed_source_with_paths_is_accepted(tmp_path):
    from helpers.train import write_dataset

    prefix = str(tmp_path / "train")
    write_dataset(prefix)
    config = pretrain.get_config("tiny")
    config.data.source, config.data.paths = "indexed", prefix
    assert resolve_tokenizer_and_paths(config.data, tmp_path) == (None, [prefix])


def test_eval_paths_blend_by_eval_weights(tmp_path):
    """data.eval_weights weigh data.eval_paths (GPT-NeoX's valid_data_weights); unset, the
    eval blend keeps data.weights as before."""
    from helpers.train import write_dataset

    from neox_jax.training.data import make_sources

    a, b = write_dataset(tmp_path / "a"), write_dataset(tmp_path / "b", seed=1)
    config = pretrain.get_config("tiny")
    config.data.update(source="indexed", paths=a, eval_paths=f"{a},{b}", seq_len=8,
                       weights="", eval_weights="1,3")  # fmt: skip
    _, evals = make_sources(config.data, [a], None, 4)
    assert evals.weights.tolist() == [0.25, 0.75]
    config.data.update(eval_weights="", weights="2,2")
    _, evals = make_sources(config.data, [a], None, 4)
    assert evals.weights.tolist() == [0.5, 0.5]
    config.data.eval_weights = "1,x"
    with pytest.raises(UserError, match="data.eval_weights='1,x' must be comma-separated"):
        make_sources(config.data, [a], None, 4)

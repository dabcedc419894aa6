"""``ModelConfig`` owns its field list: the config files' model block and the fields a
checkpoint dictates are derived from it, so a new field needs one edit."""

import dataclasses
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from neox_jax.model import PRESETS, ModelConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _parse(*args: str):
    """Parse ``--config=...`` flags as the entry points do (locked config)."""
    argv = ["prog", *args]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return values.config


def test_field_groups_partition_the_dataclass():
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    arch, runtime = ModelConfig.architecture_fields(), ModelConfig.runtime_fields()
    assert sorted(arch + runtime) == sorted(names)
    assert not set(arch) & set(runtime)
    # What a checkpoint must not override: how this run computes.
    assert set(runtime) == {
        "dtype", "param_dtype", "attention_impl", "remat", "scan_unroll", "rope_scaling",
        # A mixture of experts' dispatch and training terms (the function is the same).
        "moe_impl", "capacity_factor", "router_aux_loss_coef", "router_z_loss_coef",
    }  # fmt: skip


def test_with_architecture_of_keeps_runtime_fields():
    run = ModelConfig.from_preset("pythia-14m", dtype="bfloat16", remat="full")
    loaded = ModelConfig.from_preset("pythia-70m", tie_word_embeddings=True)
    merged = run.with_architecture_of(loaded)
    for f in ModelConfig.architecture_fields():
        assert getattr(merged, f) == getattr(loaded, f), f
    for f in ModelConfig.runtime_fields():
        assert getattr(merged, f) == getattr(run, f), f


@pytest.mark.parametrize("arg", ["tiny", *PRESETS])
def test_pretrain_model_block_has_every_field(arg):
    config = _parse(f"--config={CONFIGS / 'pretrain.py'}:{arg}")
    assert set(config.model) == {f.name for f in dataclasses.fields(ModelConfig)}
    model = ModelConfig.from_dict(config.model.to_dict())  # valid as written
    if arg != "tiny":
        expected = ModelConfig.from_preset(arg)
        for f in ModelConfig.architecture_fields():
            assert getattr(model, f) == getattr(expected, f), f


@pytest.mark.parametrize("file", ["pretrain.py:tiny", "finetune.py:sft-lora"])
def test_model_overrides_and_locked_typos(file):
    config = _parse(
        f"--config={CONFIGS / file}",
        "--config.model.num_hidden_layers=2",
        "--config.model.attention_bias=False",
    )
    model = ModelConfig.from_dict(config.model.to_dict())
    assert model.num_hidden_layers == 2 and model.attention_bias is False
    with pytest.raises(AttributeError, match='Did you mean "num_hidden_layers"'):
        _parse(f"--config={CONFIGS / file}", "--config.model.num_hidden_layer=2")

"""train.extra_save_steps (GPT-NeoX's extra_save_iters): saved besides every save_every,
and kept whatever train.keep says; here in a run on GPT-NeoX's data order."""

import glob

from helpers.train import tiny_config, write_dataset

from neox_jax.training.checkpoints import parse_steps
from neox_jax.training.trainer import train_and_evaluate


def test_extra_steps_are_saved_and_kept_in_a_neox_order_run(tmp_path):
    prefix = write_dataset(tmp_path / "corpus")
    config = tiny_config(
        prefix,
        **{"train.keep": 1, "train.extra_save_steps": "0,1,3", "data.order": "neox",
           "data.neox_split": "9,1"},
    )  # fmt: skip
    result = train_and_evaluate(config, tmp_path / "run")
    assert result["step"] == 12
    steps = sorted(int(p.rsplit("/", 1)[1]) for p in glob.glob(f"{tmp_path}/run/checkpoints/*"))
    # 6 is an interval save that keep=1 drops; 0 (the initial weights), 1 and 3 are kept.
    assert steps == [0, 1, 3, 12]
    # GPT-NeoX's index files for 12 steps x 8 rows, beside the dataset, for GPT-NeoX to reuse.
    built = glob.glob(f"{prefix}_train_indexmap_96ns_16sl_1234s_packedpi_ac_*_idx.npy")
    assert len(built) == 3


def test_parse_steps_refuses_words():
    import pytest

    from neox_jax.errors import UserError

    assert parse_steps(" 4, 1 ,") == {1, 4}
    with pytest.raises(UserError, match="comma-separated step numbers"):
        parse_steps("1,two")

"""neox_jax.sweep: a grid (or random search) of overrides through the real trainer, one table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers.train import REPO, config_flags, tiny_config, write_dataset
from helpers.xla import xla_flags

from neox_jax import sweep

SWEEP = ["-m", "neox_jax.sweep"]


def test_parse_grid_and_names():
    axes = sweep.parse_grid("optimizer.lr=1e-3,3e-3; --config.model.num_hidden_layers=2,4")
    assert axes == [("optimizer.lr", ["1e-3", "3e-3"]), ("model.num_hidden_layers", ["2", "4"])]
    points = sweep.grid_points(axes)
    assert len(points) == 4 and points[1] == {
        "optimizer.lr": "1e-3",
        "model.num_hidden_layers": "4",
    }
    assert sweep.run_name(points[1]) == "lr=1e-3,num_hidden_layers=4"
    for bad in ("", "optimizer.lr", "optimizer.lr=", "a=1;a=2"):
        with pytest.raises(ValueError):
            sweep.parse_grid(bad)


def test_grid_key_overrides_the_fixed_flags(tmp_path):
    cmd = sweep.train_command(
        "c.py:tiny", tmp_path, {"optimizer.lr": "0.1"}, ["--config.optimizer.lr=9", "--x=1"]
    )
    assert "--config.optimizer.lr=9" not in cmd
    assert cmd[-2:] == ["--x=1", "--config.optimizer.lr=0.1"]


def test_two_by_one_sweep(tmp_path):
    """Two learning rates x one depth on the tiny config: two runs, one table."""
    data = write_dataset(tmp_path / "counting")
    fixed = config_flags(tiny_config(data, **{"train.eval_every": 12}))
    work = tmp_path / "sweep"
    cmd = [
        sys.executable,
        *SWEEP,
        f"--config.train_config={REPO / 'configs' / 'pretrain.py'}:tiny",
        f"--workdir={work}",
        "--config.grid=optimizer.lr=1e-2,1e-4;model.num_hidden_layers=2",
        "--config.parallel=2",
        "--",
        *fixed,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}  # no device count
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((work / "sweep.json").read_text())
    assert [r["run"] for r in rows] == [
        "lr=1e-2,num_hidden_layers=2",
        "lr=1e-4,num_hidden_layers=2",
    ]
    for row in rows:
        assert row["status"] == "ok" and row["step"] == 12
        assert all(isinstance(row[k], float) for k in ("loss", "eval_loss", "tokens_per_sec"))
        # The run really used its grid value (the trainer saves the resolved config).
        saved = json.loads((work / row["run"] / "config.json").read_text())
        assert saved["optimizer"]["lr"] == float(row["optimizer.lr"])
    # 1e-2 learns the counting data within 12 steps; 1e-4 barely moves.
    assert rows[0]["eval_loss"] < rows[1]["eval_loss"] - 0.5
    table = (work / "sweep.md").read_text()
    assert table.count("| lr=1e-2,num_hidden_layers=2 | 1e-2 | 2 | ok | 12 |") == 1
    assert len(table.strip().splitlines()) == 2 + 2 + 2  # header, rule, 2 runs, blank, best
    assert "Best eval_loss" in table and "lr=1e-2" in table.splitlines()[-1]
    assert table in proc.stdout


def test_bad_grid_exits_with_a_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, *SWEEP, "--config=c.py", "--workdir",
         str(tmp_path), "--grid=optimizer.lr"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "Bad grid axis 'optimizer.lr'" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("neox_jax.sweep: error: config.grid")


def test_the_old_spelling_means_the_new_one(capsys):
    """The README's spelling before configs/sweep.py: the same config, and a note."""
    old = sweep.COMMAND.parse(
        ["s", "--config=configs/pretrain.py:tiny", "--workdir=/w", "--grid", "a.b=1,2",
         "--parallel=2", "--random=3", "--seed=4", "--", "--config.train.steps=5", "--x=a b"]
    )  # fmt: skip
    note = capsys.readouterr().err
    assert "--config.train_config=" in note and len(note.strip().splitlines()) == 1
    new = sweep.COMMAND.parse(
        ["s", "--config.train_config=configs/pretrain.py:tiny", "--workdir=/w",
         "--config.grid=a.b=1,2", "--config.parallel=2", "--config.random=3",
         "--config.seed=4", "--config.train_args=--config.train.steps=5 '--x=a b'"]
    )  # fmt: skip
    assert capsys.readouterr().err == ""
    assert old.config.to_dict() == new.config.to_dict() and old.extras == new.extras == {
        "workdir": "/w"
    }


def test_random_search_draws_reproducible_points_within_the_ranges():
    axes = sweep.parse_grid("optimizer.lr=loguniform(1e-4,1e-2);model.num_hidden_layers=2,4")
    assert axes[0] == ("optimizer.lr", ["loguniform(1e-4,1e-2)"])
    points = sweep.random_points(axes, 50, seed=3)
    assert points == sweep.random_points(axes, 50, seed=3)
    lrs = [float(p["optimizer.lr"]) for p in points]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs)
    # Log-uniform: about half the draws fall below the geometric middle (1e-3).
    assert 15 <= sum(lr < 1e-3 for lr in lrs) <= 35
    assert {p["model.num_hidden_layers"] for p in points} == {"2", "4"}
    ints = sweep.random_points(sweep.parse_grid("train.seed=randint(1,3)"), 30, seed=0)
    assert {p["train.seed"] for p in ints} == {"1", "2", "3"}
    with pytest.raises(ValueError, match="need --config.random"):
        sweep.train_command("c.py", REPO, points and {"optimizer.lr": "uniform(0,1)"}, [])


def test_runs_share_one_corpus_unless_told_otherwise(tmp_path):
    shared = sweep._shared_corpus(tmp_path, ["--x=1"], ["optimizer.lr"])
    assert shared == ["--x=1", f"--config.data.corpus_dir={tmp_path.absolute() / 'data'}"]
    mine = ["--config.data.corpus_dir=/c"]
    assert sweep._shared_corpus(tmp_path, mine, ["optimizer.lr"]) == mine

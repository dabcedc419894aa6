"""Profiling, device memory in the console line, and Weights & Biases logging (#14)."""

import json

import jax
import pytest
from helpers.train import tiny_config, write_dataset

from neox_jax.errors import UserError
from neox_jax.training import metrics
from neox_jax.training.trainer import train_and_evaluate


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "counting")


def test_profile_steps_write_a_trace_tensorboard_opens(dataset, tmp_path, capsys):
    config = tiny_config(dataset, **{"train.steps": 5, "train.profile_steps": "2,3"})
    train_and_evaluate(config, tmp_path)
    # TensorBoard's profile plugin reads <logdir>/plugins/profile/<run>/<host>.xplane.pb.
    traces = list((tmp_path / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert "profile of steps 2..3 written to" in capsys.readouterr().out


@pytest.mark.parametrize("text, steps", [("10,12", (10, 12)), ("7", (7, 7)), ("", None)])
def test_profile_steps_parse(text, steps):
    assert metrics.parse_profile_steps(text) == steps


@pytest.mark.parametrize("text", ["12,10", "a,b", "-1,2", "1,2,3"])
def test_bad_profile_steps_are_refused(text):
    with pytest.raises(UserError, match="train.profile_steps"):
        metrics.parse_profile_steps(text)


class _Device:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_console_line_shows_device_memory_only_where_known(monkeypatch):
    writer = metrics.MetricWriter(None, total_steps=10)
    assert "mem" not in writer.progress(1, {"loss": 1.0})  # CPU: memory_stats() is None
    gib = 2**30
    devices = [_Device({"bytes_in_use": 3 * gib, "bytes_limit": 16 * gib}), _Device(None)]
    monkeypatch.setattr(jax, "local_devices", lambda: devices)
    assert "mem 3.0/16.0 GiB" in writer.progress(2, {"loss": 1.0})


def test_wandb_offline_run_logs_the_metrics(dataset, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_config(dataset, **{"train.steps": 3, "train.wandb_project": "neox-test"})
    train_and_evaluate(config, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # The offline run file is wandb's record log: each history item is its key and the
    # value as JSON. Every train loss of metrics.jsonl must be in it under train/loss.
    data = runs[0].read_bytes()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if r["split"] == "train"]
    assert len(losses) == 3 and b"train/loss" in data and b"eval/eval_loss" in data
    for loss in losses:
        assert json.dumps(loss).encode() in data, loss

"""Fault injection: every way a run can stop keeps the last complete checkpoint restorable,
and what the program prints about checkpoints is true.

Faults: a non-finite loss with asynchronous saving, a full disk during a save (an injected
ENOSPC from orbax's writer thread) and during an export, SIGTERM and SIGKILL during saves,
Ctrl-C, and a corrupt newest checkpoint on resume. Signals need a subprocess; the rest runs
in this process on the tests' tiny model.
"""

import errno
import json
import math
import os
import re
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers.train import logged, run_train, tiny_config, write_dataset

from neox_jax.convert import load_checkpoint
from neox_jax.errors import UserError
from neox_jax.training.trainer import NonFiniteLossError, train_and_evaluate


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "counting")


def _config(dataset, **overrides):
    # A fixed peak_flops skips the CPU matmul benchmark that MFU would otherwise run; no
    # evaluation, so no second program to compile (these tests are about checkpoints).
    return tiny_config(
        dataset, **{"train.peak_flops": 1e12, "train.eval_every": 100000, **overrides}
    )


def _on_disk(workdir) -> list[str]:
    folder = Path(workdir) / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _complete(workdir) -> list[int]:
    return sorted(int(n) for n in _on_disk(workdir) if n.isdigit())


def _assert_restorable(workdir, step):
    """The step's params load and are finite (what a rerun or an export would read)."""
    _, params = load_checkpoint(Path(workdir) / "checkpoints" / str(step))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def _named_step(text: str) -> int | None:
    found = re.findall(r"latest complete checkpoint is step (\d+)", text)
    return int(found[-1]) if found else None


def test_nonfinite_stop_with_async_saving_keeps_the_checkpoint_it_names(dataset, tmp_path):
    # lr 1e30 after a 2-step warm-up: step 2's update is finite but huge, step 3's loss NaN.
    # Step 2's asynchronous save is still in flight when the stop is decided.
    config = _config(
        dataset,
        **{
            "optimizer.lr": 1e30,
            "train.steps": 40,
            "train.save_every": 2,
            "train.log_every": 10,
            "train.async_checkpoint": True,
        },
    )
    with pytest.raises(NonFiniteLossError) as info:
        train_and_evaluate(config, tmp_path)
    named = _named_step(str(info.value))
    assert named is not None, str(info.value)
    assert _on_disk(tmp_path) == [str(named)]  # complete, and no half-written folder
    _assert_restorable(tmp_path, named)


def _fail_json_writes_at(monkeypatch, step: int):
    """orbax's JSON writer (run in its commit thread) hits a full disk at ``step``."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch

    original = jch.JsonCheckpointHandler._save_fn

    def full_disk(self, item, directory):
        if Path(str(directory)).parent.name.startswith(f"{step}.orbax-checkpoint-tmp"):
            path = str(directory / self._filename)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return original(self, item, directory)

    monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", full_disk)


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(
    dataset, tmp_path, monkeypatch, capsys
):
    # Asynchronous: the failure surfaces in a later save's or the final wait, not at the call.
    config = _config(
        dataset,
        **{"train.steps": 8, "train.save_every": 2, "train.async_checkpoint": True},
    )
    with monkeypatch.context() as patch:
        _fail_json_writes_at(patch, 4)
        with pytest.raises(UserError, match="No space left on device") as info:
            train_and_evaluate(config, tmp_path)
    assert _named_step(str(info.value)) == 2 == max(_complete(tmp_path))
    _assert_restorable(tmp_path, 2)
    # The disk has room again: the rerun resumes from step 2 and drops the half save.
    capsys.readouterr()
    result = train_and_evaluate(config, tmp_path)
    assert "Resumed from step 2" in capsys.readouterr().out
    assert result["step"] == 8 and _on_disk(tmp_path) == ["4", "6", "8"]


def test_sigterm_saves_within_two_steps_of_the_signal(dataset, tmp_path):
    """Python dispatches steps ahead of the device; the SIGTERM save must not wait for them.

    Logs every 40 steps, so between logs nothing but the in-flight bound stops the loop
    from running ahead. The signal is sent just after step L is logged (the device has
    finished L then); the saved step may exceed L by the two steps in flight plus the
    steps the device ran while this test noticed the log and signalled.
    """
    config = _config(
        dataset,
        **{
            "train.steps": 100000,
            "train.save_every": 100000,
            "train.eval_every": 100000,
            "train.log_every": 40,
            # Steps of tens of ms, so that this test's polling is short against a step.
            "model.hidden_size": 128,
            "data.seq_len": 64,
            "data.global_batch_size": 16,
        },
    )
    proc = run_train(config, tmp_path, wait=False)
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 300
    while max(logged(tmp_path), default=0) < 80:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.002)
    record = [json.loads(x) for x in metrics.read_text().splitlines()][-1]
    # Mid-interval: the old loop had dispatched all 40 steps to the next log by then.
    time.sleep(8 * record["step_time"])
    proc.send_signal(signal.SIGTERM)
    late = time.time() - metrics.stat().st_mtime
    assert proc.wait(timeout=120) == 0
    # Steps the device ran between the log and the signal, at the logged pace; doubled
    # because a shared CPU's pace varies (the old loop overshot by 40 - 8 = 32 steps).
    lag = 2 * math.ceil(late / record["step_time"])
    (saved,) = _complete(tmp_path)
    assert record["step"] <= saved <= record["step"] + 2 + lag < record["step"] + 40, (
        record,
        saved,
        late,
    )
    _assert_restorable(tmp_path, saved)


# ------------------------------------------------------------------ writers and exports
WRITER_CONFIG = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
)


def _write_with(kind, config, params, dst, **kw):
    """One writer of each on-disk format, given float params made for ``config``."""
    from neox_jax.convert import save_checkpoint, save_hf
    from neox_jax.finetune.lora import LoraConfig, init_adapters
    from neox_jax.finetune.peft_format import save_peft_adapter
    from neox_jax.quant import QuantConfig, quantize_params, save_quantized

    if kind == "hf":
        return save_hf(config, params, dst, **kw)
    if kind == "checkpoint":
        return save_checkpoint(config, params, dst, **kw)
    if kind == "quantized":
        qconfig = QuantConfig(bits=8)
        return save_quantized(config, qconfig, quantize_params(config, params, qconfig), dst, **kw)
    lora = LoraConfig(targets=("query_key_value",), rank=4, alpha=8.0)
    adapters = init_adapters(config, lora, jax.random.key(0))
    return save_peft_adapter(config, adapters, lora, dst, **kw)


@pytest.mark.parametrize("kind", ["hf", "checkpoint", "quantized", "peft"])
def test_writers_refuse_params_of_another_shape_and_write_nothing(tmp_path, kind):
    from neox_jax.model import ModelConfig, init_params

    made_for = ModelConfig(**WRITER_CONFIG)
    params = init_params(made_for, jax.random.key(0))
    if kind == "peft":  # adapters are shaped by the config passed to init_adapters
        from neox_jax.finetune.lora import LoraConfig, init_adapters
        from neox_jax.finetune.peft_format import save_peft_adapter

        lora = LoraConfig(targets=("query_key_value",), rank=4, alpha=8.0)
        adapters = init_adapters(made_for, lora, jax.random.key(0))
        claimed = made_for.replace(num_hidden_layers=3)
        with pytest.raises(UserError, match=r"lora_a has shape \(2, 32, 4\).*\(3, 32, 4\)"):
            save_peft_adapter(claimed, adapters, lora, tmp_path / "out")
    else:
        # A 3-layer config with 2-layer params: JAX would clamp layer 2 to layer 1.
        claimed = made_for.replace(num_hidden_layers=3)
        with pytest.raises(UserError, match=r"layers/.*\(2, .*\(3, "):
            if kind == "quantized":  # quantize for the true config, save under the wrong one
                from neox_jax.quant import QuantConfig, quantize_params, save_quantized

                qconfig = QuantConfig(bits=8)
                qparams = quantize_params(made_for, params, qconfig)
                save_quantized(claimed, qconfig, qparams, tmp_path / "out")
            else:
                _write_with(kind, claimed, params, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # not even a temporary folder


@pytest.mark.parametrize("kind", ["hf", "checkpoint", "peft"])
def test_full_disk_during_an_export_keeps_the_previous_export(tmp_path, monkeypatch, kind):
    """A write fails half way (ENOSPC); the export already at the destination survives."""
    import safetensors.numpy
    import tensorstore

    from neox_jax.finetune import peft_format
    from neox_jax.model import ModelConfig, init_params

    config = ModelConfig(**WRITER_CONFIG)
    params = init_params(config, jax.random.key(0))
    dst = tmp_path / "export"
    _write_with(kind, config, params, dst)
    before = {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    if kind == "checkpoint":  # orbax writes arrays through tensorstore
        monkeypatch.setattr(tensorstore, "open", full_disk)
    else:  # safetensors' writer, wherever it was imported by name
        monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
        monkeypatch.setattr(peft_format, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _write_with(kind, config, params, dst, overwrite=True)
    after = {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary left behind


# ------------------------------------------------------------------------ resuming
def test_a_corrupt_newest_checkpoint_resumes_from_the_previous_one(dataset, tmp_path, capsys):
    config = _config(dataset, **{"train.steps": 4, "train.save_every": 2, "train.log_every": 2})
    train_and_evaluate(config, tmp_path)
    assert _complete(tmp_path) == [2, 4]
    for f in (tmp_path / "checkpoints" / "4" / "params").rglob("*"):
        if f.is_file():  # damaged after the save: every byte of step 4's params
            f.write_bytes(b"\0garbage" * 4)
    capsys.readouterr()
    config6 = _config(dataset, **{"train.steps": 6, "train.save_every": 2, "train.log_every": 2})
    result = train_and_evaluate(config6, tmp_path)
    out = capsys.readouterr().out
    assert "step(s) 4" in out and "resuming from step 2" in out
    assert "Resumed from step 2" in out
    assert result["step"] == 6 and _complete(tmp_path) == [2, 4, 6]
    (aside,) = (tmp_path / "unreadable_checkpoints").iterdir()  # kept, not deleted
    assert aside.name.startswith("4-")
    for step in (4, 6):
        _assert_restorable(tmp_path, step)


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(dataset, tmp_path):
    config = _config(dataset, **{"train.steps": 2, "train.save_every": 2})
    train_and_evaluate(config, tmp_path)
    for f in (tmp_path / "checkpoints" / "2").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0garbage")
    with pytest.raises(UserError, match="No checkpoint in .* can be read"):
        train_and_evaluate(_config(dataset, **{"train.steps": 4}), tmp_path)
    assert (tmp_path / "checkpoints" / "2").is_dir()  # nothing moved or deleted


def test_resuming_with_a_function_changing_field_needs_the_override(dataset, tmp_path):
    train_and_evaluate(_config(dataset, **{"train.steps": 2, "train.save_every": 2}), tmp_path)
    changed = {"train.steps": 4, "model.hidden_act": "relu", "model.rotary_pct": 0.5}
    with pytest.raises(UserError, match="hidden_act: checkpoint 'gelu' vs config 'relu'") as info:
        train_and_evaluate(_config(dataset, **changed), tmp_path)
    assert "rotary_pct" in str(info.value) and "allow_model_change" in str(info.value)
    allowed = _config(dataset, **changed, **{"train.allow_model_change": True})
    assert train_and_evaluate(allowed, tmp_path)["step"] == 4


# ------------------------------------------------------------- signals during saves
def _start(dataset, workdir, **overrides):
    """A subprocess run saving (asynchronously) after every step; output to files."""
    config = _config(
        dataset,
        **{
            "train.steps": 100000,
            "train.save_every": 1,
            "train.keep": 2,
            "train.eval_every": 100000,
            "train.async_checkpoint": True,
            **overrides,
        },
    )
    workdir.mkdir()
    out, err = open(workdir / "stdout.txt", "w"), open(workdir / "stderr.txt", "w")  # noqa: SIM115
    return config, run_train(config, workdir, wait=False, stdout=out, stderr=err)


def _wait_for_step(proc, workdir, step):
    deadline = time.time() + 300
    while max(logged(workdir), default=0) < step:
        assert proc.poll() is None, (workdir / "stderr.txt").read_text()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)


def _output(workdir) -> str:
    return (workdir / "stdout.txt").read_text() + (workdir / "stderr.txt").read_text()


def test_sigterm_during_saves_exits_with_the_named_checkpoint_complete(dataset, tmp_path):
    run = tmp_path / "run"
    _, proc = _start(dataset, run)
    _wait_for_step(proc, run, 4)
    proc.send_signal(signal.SIGTERM)  # a save of the step before is in flight
    assert proc.wait(timeout=120) == 0, _output(run)[-2000:]
    step = int(re.search(r"Preempted at step (\d+): checkpoint saved", _output(run)).group(1))
    assert _on_disk(run) == [str(s) for s in _complete(run)] and max(_complete(run)) == step
    for s in _complete(run):
        _assert_restorable(run, s)


def test_ctrl_c_waits_for_the_save_in_flight_and_exits_130(dataset, tmp_path):
    run = tmp_path / "run"
    _, proc = _start(dataset, run)
    _wait_for_step(proc, run, 4)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, _output(run)[-2000:]
    named = _named_step(_output(run))
    assert named is not None and named == max(_complete(run)), _output(run)[-2000:]
    assert "Traceback" not in _output(run)
    assert _on_disk(run) == [str(s) for s in _complete(run)]  # nothing half written
    _assert_restorable(run, named)


def test_sigkill_during_a_save_resumes_from_the_last_complete_one(dataset, tmp_path):
    run = tmp_path / "run"
    config, proc = _start(dataset, run)
    _wait_for_step(proc, run, 4)
    proc.send_signal(signal.SIGKILL)  # no handler runs: a save may be cut anywhere
    proc.wait()
    complete = _complete(run)
    assert complete, _on_disk(run)
    _assert_restorable(run, complete[-1])
    config.train.steps = complete[-1] + 2
    again = run_train(config, run)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"Resumed from step {complete[-1]}" in again.stdout
    assert not [n for n in _on_disk(run) if not n.isdigit()]  # the cut save was cleaned up


def test_an_error_in_the_loop_lets_the_save_in_flight_finish(
    dataset, tmp_path, monkeypatch, capsys
):
    """The data pipeline fails at step 5 while step 4's asynchronous save is in flight."""
    from neox_jax.training import data as data_lib

    real = data_lib.global_batch

    def failing(source, step, *args, **kwargs):
        if step == 5:
            raise RuntimeError("the dataset's disk went away")
        return real(source, step, *args, **kwargs)

    monkeypatch.setattr(data_lib, "global_batch", failing)
    config = _config(
        dataset, **{"train.steps": 8, "train.save_every": 2, "train.async_checkpoint": True}
    )
    with pytest.raises(RuntimeError, match="disk went away"):
        train_and_evaluate(config, tmp_path)
    named = _named_step(capsys.readouterr().out)
    assert named == 4 == max(_complete(tmp_path)), _on_disk(tmp_path)
    assert _on_disk(tmp_path) == ["2", "4"]
    _assert_restorable(tmp_path, 4)

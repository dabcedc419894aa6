"""Multi-host training: two local processes under ``jax.distributed`` == one process.

Two processes with 2 fake CPU devices each form one 4-device runtime (coordinator on
127.0.0.1, gloo collectives) and train the tiny model through the real trainer on a
data=2 x fsdp=2 mesh; a single process with 4 fake devices trains the same config.
Each process records which global batch rows it asked the data source for.

Checks: same losses; each host read only its own rows; only process 0 wrote the
run's files; orbax wrote complete checkpoints to the shared directory from both
processes, and the 2-process checkpoint resumes on one device (in this process).

Run this file as a script (``python tests/test_multihost.py --worker ...``) to get a
worker process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.train import REPO, logged, tiny_config, write_dataset
from helpers.xla import xla_flags

STEPS = 8
SAVE_EVERY = 4
BATCH = 8
MESH = {"mesh.data": 2, "mesh.fsdp": 2}

# Same fp32 model and batch; the processes change only how the cross-device sums are
# done (gloo's all-reduce over the network instead of XLA's in-process one), i.e. the
# summation order: round-off of ~1e-7 relative. Observed: 6 of 8 losses bitwise
# equal, the others 1.0e-7 relative apart (one fp32 ulp). 1e-5 leaves margin yet
# fails on any real bug (a host reading the wrong rows or a missing all-reduce
# changes the loss in the first or second digit).
LOSS_RTOL = 1e-5


def _config(data_prefix, **overrides):
    settings = {
        **MESH,
        "train.steps": STEPS,
        "train.save_every": SAVE_EVERY,
        "train.eval_every": SAVE_EVERY,
        "train.keep": 0,
        "data.global_batch_size": BATCH,
        "train.peak_flops": 1e11,  # skip the CPU matmul measurement (speed)
    }
    return tiny_config(data_prefix, **{**settings, **overrides})


# ------------------------------------------------------------------- the workers
def worker(data_prefix: str, workdir: Path, out: Path, distributed: dict, overrides: dict) -> None:
    """Train ``_config`` (as process ``distributed['process_id']``), report what it read."""
    from neox_jax.training import data as data_lib
    from neox_jax.training.trainer import train_and_evaluate

    reads: dict[str, list[list[int]]] = {"train": [], "eval": []}
    make_sources = data_lib.make_sources

    def recording_sources(*args, **kwargs):
        # Wrap the sources the trainer builds so every row it reads is logged.
        sources = make_sources(*args, **kwargs)
        for split, source in zip(("train", "eval"), sources, strict=True):
            if source is not None:
                read = source.samples

                def samples(indices, read=read, split=split):
                    reads[split].append([int(i) for i in indices])
                    return read(indices)

                source.samples = samples
        return sources

    data_lib.make_sources = recording_sources
    config = _config(
        data_prefix, **{f"distributed.{k}": v for k, v in distributed.items()}, **overrides
    )
    result = train_and_evaluate(config, workdir)

    import jax

    out.write_text(
        json.dumps(
            {
                "process_index": jax.process_index(),
                "process_count": jax.process_count(),
                "local_devices": jax.local_device_count(),
                "devices": jax.device_count(),
                "reads": reads,
                "final_step": result["step"],
                "preempted": bool(result.get("preempted")),
                "eval_loss": result.get("eval_loss"),
            }
        )
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(data, workdir, out, devices, distributed=None, overrides=None):
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags(devices),
        "JAX_PLATFORMS": "cpu",
    }
    cmd = [sys.executable, __file__, "--worker", data, str(workdir), str(out)]
    cmd += [f"--distributed={json.dumps(distributed or {})}"]
    cmd += [f"--overrides={json.dumps(overrides or {})}"]
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _spawn_two(data, workdir: Path, overrides=None) -> list[subprocess.Popen]:
    """Two processes of one 4-device runtime, sharing ``workdir`` (as a shared
    filesystem would be); process i reports to ``<workdir>_<i>.json``."""
    coordinator = f"127.0.0.1:{_free_port()}"
    return [
        _spawn(
            data,
            workdir,
            workdir.with_name(f"{workdir.name}_{i}.json"),
            devices=2,
            distributed={"coordinator_address": coordinator, "num_processes": 2, "process_id": i},
            overrides=overrides,
        )
        for i in range(2)
    ]


# ---------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    data = write_dataset(root / "counting")
    procs = _spawn_two(data, root / "two")
    procs.append(_spawn(data, root / "one", root / "one.json", devices=4))
    try:
        outputs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output[-4000:]
    reports = [json.loads((root / f"two_{i}.json").read_text()) for i in range(2)]
    single = json.loads((root / "one.json").read_text())
    return root, data, reports, single


def test_runtime_is_two_hosts(runs):
    _, _, reports, single = runs
    for i, r in enumerate(reports):
        assert (r["process_index"], r["process_count"]) == (i, 2)
        assert (r["local_devices"], r["devices"]) == (2, 4)
        assert r["final_step"] == STEPS
    assert (single["process_count"], single["devices"]) == (1, 4)


def test_same_losses_as_one_process(runs):
    root, _, reports, single = runs
    two, one = logged(root / "two"), logged(root / "one")
    assert sorted(one) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [two[s] for s in sorted(one)], [one[s] for s in sorted(one)], rtol=LOSS_RTOL
    )
    evals_two, evals_one = (
        logged(root / "two", "eval", "eval_loss"),
        logged(root / "one", "eval", "eval_loss"),
    )
    assert sorted(evals_two) == sorted(evals_one) == [SAVE_EVERY, STEPS]
    np.testing.assert_allclose(
        [evals_two[s] for s in evals_one], list(evals_one.values()), rtol=LOSS_RTOL
    )
    # Every process computes the same global metrics (they are replicated arrays).
    assert reports[0]["eval_loss"] == reports[1]["eval_loss"]


def test_each_host_reads_only_its_rows(runs):
    _, _, reports, single = runs
    half = BATCH // 2
    for r in reports:
        p = r["process_index"]
        # The trainer probes the source once with sample 0 to learn the batch keys;
        # every other read is one step's rows of this host.
        train = [rows for rows in r["reads"]["train"] if rows != [0]]
        assert train == [[s * BATCH + p * half + j for j in range(half)] for s in range(STEPS)], p
        for rows in r["reads"]["eval"]:
            assert len(rows) == half and rows[0] % BATCH == p * half, p
    # One process with 4 devices reads whole batches.
    train = [rows for rows in single["reads"]["train"] if rows != [0]]
    assert train == [list(range(s * BATCH, (s + 1) * BATCH)) for s in range(STEPS)]


def test_only_process_zero_writes_run_files(runs):
    root, _, _, _ = runs
    lines = (root / "two" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if '"split": "train"' in line]
    assert steps == list(range(1, STEPS + 1))  # each once: no second writer
    assert (root / "two" / "config.json").is_file()
    assert len(list((root / "two" / "tensorboard").iterdir())) == 1


def test_two_process_checkpoint_resumes_on_one_device(runs, tmp_path):
    """orbax's multi-process save is complete and restores onto 1 device in this process."""
    root, data, _, _ = runs
    saved = sorted(int(p.name) for p in (root / "two" / "checkpoints").iterdir())
    assert saved == [SAVE_EVERY, STEPS]
    shutil.copytree(
        root / "two" / "checkpoints" / str(SAVE_EVERY),
        tmp_path / "checkpoints" / str(SAVE_EVERY),
    )
    from neox_jax.training.trainer import train_and_evaluate

    train_and_evaluate(_config(data, **{"mesh.data": -1, "mesh.fsdp": 1}), tmp_path)
    resumed, two = logged(tmp_path), logged(root / "two")
    later = list(range(SAVE_EVERY + 1, STEPS + 1))
    assert sorted(resumed) == later
    np.testing.assert_allclose([resumed[s] for s in later], [two[s] for s in later], rtol=LOSS_RTOL)


def test_sigterm_on_one_host_stops_all_at_the_same_step(tmp_path):
    """A preemption notice reaching one host only: every host saves the same step and
    exits cleanly (a host that stopped alone would leave the other one hung)."""
    data = write_dataset(tmp_path / "counting")
    workdir = tmp_path / "run"
    long = {"train.steps": 100_000, "train.save_every": 100_000, "train.eval_every": 100_000}
    procs = _spawn_two(data, workdir, long)
    try:
        deadline = time.time() + 300
        while max(logged(workdir), default=0) < 2:
            assert all(p.poll() is None for p in procs) and time.time() < deadline
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output[-3000:]
    reports = [json.loads((tmp_path / f"run_{i}.json").read_text()) for i in range(2)]
    assert all(r["preempted"] for r in reports)
    assert reports[0]["final_step"] == reports[1]["final_step"] >= 2
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir()]
    assert saved == [reports[0]["final_step"]]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=3, metavar=("DATA", "WORKDIR", "OUT"), required=True)
    parser.add_argument("--distributed", default="{}")
    parser.add_argument("--overrides", default="{}")
    args = parser.parse_args()
    data, workdir, out = args.worker
    worker(data, Path(workdir), Path(out), json.loads(args.distributed), json.loads(args.overrides))

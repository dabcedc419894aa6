"""launch_tpu.sh: the gcloud commands it prints (--dry_run) and runs (fake gcloud)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
from helpers.train import REPO

SCRIPT = REPO / "launch_tpu.sh"
TRAIN = [
    "--config=configs/pretrain.py:pythia-160m",
    "--workdir=gs://bucket/run 1",
    '--config.sample.prompt=it\'s a "quoted" prompt; with $HOME and spaces',
    "--config.optimizer.lr=3e-4",
]
BASE = ["--name=neox-tpu", "--zone=us-central2-b", "--project=my-proj"]


def launch(*flags, train=TRAIN, env=None):
    return subprocess.run(
        ["bash", str(SCRIPT), *flags, "--", *train],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def commands(stdout: str) -> list[list[str]]:
    """The printed commands as argv lists (a shell's reading of each line)."""
    return [shlex.split(line) for line in stdout.splitlines() if not line.startswith("#")]


def remote(argv: list[str]) -> str:
    """The --command of a `gcloud ... ssh` argv."""
    (cmd,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    return cmd


def check_train(argv: list[str]) -> None:
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "neox-tpu"]
    assert {"--zone=us-central2-b", "--project=my-proj", "--worker=all"} <= set(argv)
    words = shlex.split(remote(argv))  # what bash on every worker will run
    assert words[:3] == ["cd", "neox_jax", "&&"]
    assert words[3:7] == ["NEOX_JAX_DISTRIBUTED=1", "python3", "-m", "neox_jax.train"]
    assert words[7:] == TRAIN  # every override intact, spaces and quotes included


def test_dry_run_prints_create_install_train():
    r = launch(*BASE, "--accelerator_type=v5litepod-16", "--spot", "--repo=https://x/neox.git",
               "--ref=v1.0", "--dry_run")  # fmt: skip
    assert r.returncode == 0, r.stderr
    describe, create, install, train = commands(r.stdout)
    assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "neox-tpu"]
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "neox-tpu"]
    assert {
        "--zone=us-central2-b",
        "--project=my-proj",
        "--accelerator-type=v5litepod-16",
        "--version=v2-alpha-tpuv5-lite",
        "--spot",
    } <= set(create)
    assert install[4] == "ssh" and "--worker=all" in install
    steps = remote(install)
    assert "git clone -q https://x/neox.git neox_jax" in steps
    assert "git checkout -q v1.0" in steps
    pip = shlex.split(steps.split(";")[-1])
    assert pip == ["python3", "-m", "pip", "install", "-q", "-e", ".[tpu]"]
    check_train(train)


def test_copy_and_detach():
    r = launch(*BASE, "--accelerator_type=v4-32", "--copy", "--detach", "--log=run.log",
               "--dry_run")  # fmt: skip
    assert r.returncode == 0, r.stderr
    _, create, tar, scp, install, train = commands(r.stdout)
    assert "--version=tpu-ubuntu2204-base" in create
    assert tar[:2] == ["tar", "-czf"] and "--exclude=.git" in tar and tar[-1] == "."
    assert scp[4] == "scp" and scp[5] == tar[2] and "--worker=all" in scp
    assert "tar -xzf neox_jax.tgz -C neox_jax" in remote(install)
    words = shlex.split(remote(train))
    assert words[3:5] == ["nohup", "env"]
    assert words[-6:] == [">", "run.log", "2>&1", "<", "/dev/null", "&"]
    assert words[5:9] == ["NEOX_JAX_DISTRIBUTED=1", "python3", "-m", "neox_jax.train"]
    assert words[9 : 9 + len(TRAIN)] == TRAIN


def _fake_gcloud(tmp_path, exists: bool):
    """A gcloud on PATH that records its argv; `describe` succeeds iff ``exists``."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.jsonl"
    stub = bindir / "gcloud"
    stub.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(['gcloud', *sys.argv[1:]]) + '\\n')\n"
        f"sys.exit(0 if {exists} or 'describe' not in sys.argv else 1)\n"
    )
    stub.chmod(0o755)
    return {"PATH": f"{bindir}:{os.environ['PATH']}"}, log


@pytest.mark.parametrize("exists", [False, True])
def test_runs_what_dry_run_prints(tmp_path, exists):
    flags = [*BASE, "--accelerator_type=v5p-16", "--repo=https://x/neox.git", "--ref=abc"]
    printed = commands(launch(*flags, "--dry_run").stdout)
    env, log = _fake_gcloud(tmp_path, exists)
    r = launch(*flags, env=env)
    assert r.returncode == 0, r.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    # Created only when describe failed; otherwise exactly the printed commands.
    expected = printed if not exists else [printed[0], *printed[2:]]
    assert calls == expected
    check_train(calls[-1])


@pytest.mark.parametrize(
    "flags, train, message",
    [
        (["--zone=z"], TRAIN, "--name is required"),
        (["--name=n", "--zone=z"], [], "nothing to train"),
        (["--name=n", "--zone=z", "--accelerator_type=v9-8", "--dry_run"], TRAIN,
         "no default --runtime_version"),
        (["--name=n", "--zone=z", "--bogus"], TRAIN, "unknown flag --bogus"),
    ],
)  # fmt: skip
def test_bad_flags(flags, train, message):
    r = launch(*flags, train=train)
    assert r.returncode == 2 and message in r.stderr


def test_launcher_env_turns_on_jax_distributed(monkeypatch):
    from neox_jax.parallel import mesh

    for var in (
        "TPU_WORKER_HOSTNAMES",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        mesh.DISTRIBUTED_ENV,
    ):
        monkeypatch.delenv(var, raising=False)
    assert not mesh._cluster_detected()
    monkeypatch.setenv(mesh.DISTRIBUTED_ENV, "1")
    assert mesh._cluster_detected()

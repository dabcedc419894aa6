"""Ahead-of-time compilation of the train step for a TPU topology, on this CPU.

As MaxText's compile tests: libtpu describes a TPU slice (here v5e 2x2, 4 chips) and
the real train step is lowered and compiled for it without any TPU. The CLI runs in a
subprocess (libtpu and the topology stay out of the pytest process).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from helpers.train import REPO

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'jax[tpu]==<jax version>'); "
    "it is what describes TPU topologies and compiles for them.",
)

# A one-layer model: XLA's cost analysis counts a scanned layer stack's body once, so
# with one layer its FLOPs are comparable with the formula's. Small sizes keep the
# compile at ~20 s.
MODEL = dict(
    vocab_size=1024, hidden_size=128, num_hidden_layers=1, num_attention_heads=4,
    intermediate_size=512,
)  # fmt: skip
BATCH, SEQ, CHIPS = 8, 128, 4


def _aot(tmp_path, *overrides: str, topology="v5e:2x2"):
    out = tmp_path / "aot.json"
    cmd = [
        sys.executable,
        "-m",
        "neox_jax.aot",
        f"--config={REPO / 'configs' / 'pretrain.py'}:tiny",
        f"--topology={topology}",
        f"--json_out={out}",
        "--config.data.source=indexed",
        f"--config.data.seq_len={SEQ}",
        f"--config.data.global_batch_size={BATCH}",
        *[f"--config.model.{k}={v}" for k, v in MODEL.items()],
        *overrides,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.fixture(scope="module")
def fsdp_report(tmp_path_factory):
    proc, report = _aot(
        tmp_path_factory.mktemp("aot"), "--config.mesh.data=1", "--config.mesh.fsdp=-1"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, report


def test_compiles_for_v5e_and_reports(fsdp_report):
    stdout, r = fsdp_report
    assert r["topology"] == "v5e:2x2" and r["devices"] == CHIPS
    assert r["device_kind"].startswith("TPU v5")
    assert r["mesh"] == {"data": 1, "stage": 1, "fsdp": CHIPS, "expert": 1, "tensor": 1}
    for key in ("per_device_gib", "fits", "model_flops_per_step", "xla_flops_per_device"):
        assert key in stdout


def test_memory_is_sensible(fsdp_report):
    _, r = fsdp_report
    gib = 2**30
    # fp32 params + Adam mu + nu = 12 bytes per parameter, split 4 ways by fsdp (the
    # norms and biases the rules leave replicated are a few percent here).
    sharded_state = 12 * r["params"] / CHIPS / gib
    assert sharded_state <= r["state_gib"] < 1.1 * sharded_state, r
    # The program's arguments are that state plus this device's [2, SEQ + 1] tokens;
    # 2% because TPU layouts pad small arrays to whole tiles (observed +0.4%).
    batch_gib = BATCH // CHIPS * (SEQ + 1) * 4 / gib
    assert r["argument_gib"] == pytest.approx(r["state_gib"] + batch_gib, rel=0.02)
    # The new state is donated into the old one's buffers.
    assert r["alias_gib"] == pytest.approx(r["state_gib"], rel=0.02)
    # Temporaries (activations, gradients) are tiny here: XLA may even keep them all in
    # on-chip memory and report 0 bytes of HBM.
    assert 0 <= r["temp_gib"] < 0.1 and r["per_device_gib"] < 0.1
    # The compiler's own count of what a v5e leaves to programs (of 16 GiB physical).
    assert r["fits"] is True and r["hbm_source"] == "compiler" and r["hbm_gib"] == 15.75


def test_flops_are_sensible(fsdp_report):
    _, r = fsdp_report
    # 6N + attention, N = matmul params (1 layer of 12 E^2 + 2 E F ... + the E x V head).
    e, f, v, layers = (MODEL[k] for k in ("hidden_size", "intermediate_size", "vocab_size",
                                         "num_hidden_layers"))  # fmt: skip
    n = layers * (4 * e * e + 2 * e * f) + e * v
    expected = (6 * n + 12 * layers * e * SEQ) * BATCH * SEQ
    assert r["model_flops_per_step"] == expected
    # XLA's count over all chips also includes LayerNorms, softmax, GELU, the loss and
    # AdamW (a few percent for this model); with one layer there is no scan to
    # undercount, so it must land just above the formula's.
    ratio = r["xla_flops_per_device"] * CHIPS / expected
    assert 1.0 <= ratio < 1.3, ratio


def test_unknown_topology_is_a_clear_error(tmp_path):
    proc, _ = _aot(tmp_path, topology="v9z:1x1")
    assert proc.returncode == 2
    assert "Cannot describe TPU topology 'v9z:1x1'" in proc.stderr


def test_expert_parallel_step_compiles_for_tpu(tmp_path):
    """A one-layer mixture of experts on expert=2 x fsdp=2: the all-to-all dispatch
    (``neox_jax.model.expert_parallel``) compiles for TPU, and model FLOPs count the
    routed experts only (top 2 of 4)."""
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
               gated_mlp=True, mlp_bias=False, hidden_act="silu")  # fmt: skip
    proc, r = _aot(
        tmp_path,
        "--config.mesh.data=1",
        "--config.mesh.fsdp=2",
        "--config.mesh.expert=2",
        *[f"--config.model.{k}={v}" for k, v in moe.items()],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert r["mesh"]["expert"] == 2 and r["mesh"]["fsdp"] == 2 and r["fits"] is True
    e, v, f = MODEL["hidden_size"], MODEL["vocab_size"], moe["moe_intermediate_size"]
    assert r["active_params"] == r["params"] - 2 * 3 * e * f  # two idle experts
    n = 4 * e * e + e * 4 + 2 * 3 * e * f + e * v  # attention, router, 2 experts, head
    assert r["model_flops_per_step"] == (6 * n + 12 * e * SEQ) * BATCH * SEQ
    # The compiled step does at least the model's work (more: the dropless dispatch
    # runs the grouped matmuls over its worst-case buffer).
    assert r["xla_flops_per_device"] * CHIPS >= r["model_flops_per_step"]

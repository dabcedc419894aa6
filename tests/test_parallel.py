"""Sharded training: every mesh layout gives the same initial params and the same losses.

The meshes run in ONE subprocess with 8 fake CPU devices
(``--xla_force_host_platform_device_count=8``, never set in the pytest process), which
trains the tiny model through the real trainer (``train_and_evaluate`` with
``config.mesh.*`` overrides) on each layout and writes a JSON report. The 1-device
reference trains in the pytest process meanwhile. Each layout costs a JAX compile of
the step, so one subprocess for all of them keeps the test at about a minute.

Run this file as a script (``python tests/test_parallel.py --worker ...``) to get the
subprocess side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.train import REPO, logged, tiny_config, write_dataset
from helpers.xla import xla_flags

DEVICES = 8
STEPS = 8

# Layouts on 8 devices (the 1-device reference runs in the pytest process).
MESHES = {
    "data8": {"mesh.data": 8},
    "fsdp8": {"mesh.data": 1, "mesh.fsdp": 8},
    "data2_fsdp2_tensor2": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
    "tensor8": {"mesh.data": 1, "mesh.tensor": 8},
}  # data x fsdp without tensor (data=2 x fsdp=4) would repeat data8, fsdp8 and the 3-way mix
# The step-4 checkpoint of this layout is resumed on other meshes / device counts.
RESUME_FROM = "fsdp8"
RESUME_STEP = 4

# Eight heads (head size 8, rotary on 2 dims) so tensor=8 gives each device one
# whole head; every dimension divides 8, so every layout really shards every axis
# the rules name (no silent "not divisible, left unsharded" fallback).
MODEL = {
    "model.hidden_size": 64,
    "model.num_attention_heads": 8,
    "model.intermediate_size": 128,
    "model.vocab_size": 64,
}

# Losses and parameters are fp32. The layouts change only the order of reductions
# (a data-parallel mean is a tree of partial sums, a tensor-parallel matmul adds
# per-shard partial products): round-off of ~1e-7 relative per op, which Adam (it
# divides by sqrt(v)) and 8 steps can compound. Observed: at most 2.1e-7 relative
# (fp32 eps is 1.2e-7). 1e-5 leaves a 50x margin and still catches real bugs: a
# wrong shard or a missed all-reduce changes the loss in the first or second digit.
LOSS_RTOL = 1e-5


def _config(data_prefix, save_every=STEPS, **overrides):
    return tiny_config(
        data_prefix,
        **MODEL,
        **{
            "train.steps": STEPS,
            "train.save_every": save_every,
            "train.keep": 0,  # keep every checkpoint: step 4 is resumed from
            # Speed: no eval split (so no eval compile) and a fixed peak instead of
            # the trainer's matmul measurement; neither is what this file tests.
            "data.eval_fraction": 0.0,
            "train.peak_flops": 1e11,
        },
        **overrides,
    )


# ----------------------------------------------------------------- the subprocess
def _initial_state_report(config) -> dict:
    """Compile and run the trainer's initialiser on ``config``'s mesh; report values,
    layout and the per-device memory of the compiled program."""
    import flax.linen as nn
    import jax

    from neox_jax.model import ModelConfig, abstract_params, init_params, param_logical_axes
    from neox_jax.parallel.rules import RULES
    from neox_jax.training import trainer
    from neox_jax.training.optimizer import optimizer_from_config
    from neox_jax.training.state import abstract_train_state, init_train_state

    mesh = trainer.build_mesh(config.mesh)
    tx, _ = optimizer_from_config(config)
    model_config = ModelConfig.from_dict(config.model.to_dict())
    abstract, shardings = abstract_train_state(
        tx, abstract_params(model_config), param_logical_axes(model_config), mesh
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        # ``init_train_state`` exactly as the trainer calls it for a scratch start,
        # traced into one program: its inner jit's out_shardings become the program's
        # output shardings, and memory_analysis() tells what each device allocates.
        compiled = (
            jax.jit(
                lambda: init_train_state(
                    lambda rng: init_params(model_config, rng), tx, shardings, config.train.seed
                )
            )
            .lower()
            .compile()
        )
        state = compiled()
    mem = compiled.memory_analysis()
    report = {
        "mesh": dict(mesh.shape),
        "params": {},
        "params_hash": {},
        "init_memory": {
            "full_param_bytes": int(
                sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract.params))
            ),
            "output_bytes": int(mem.output_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes),
        },
    }
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        report["params"][name] = {
            "shape": list(leaf.shape),
            "spec": _spec(leaf.sharding.spec, leaf.ndim),
            "shard_shapes": sorted({tuple(s.data.shape) for s in leaf.addressable_shards}),
        }
        report["params_hash"][name] = hashlib.sha256(np.asarray(leaf).tobytes()).hexdigest()
    mu = state.opt_state[1][0].mu["layers"]["attention"]["query_key_value"]["kernel"]
    report["adam_mu_qkv_shard_shapes"] = sorted(
        {tuple(s.data.shape) for s in mu.addressable_shards}
    )
    return report


def _spec(spec, ndim: int) -> list:
    """A PartitionSpec as JSON, padded with None to one entry per dimension."""
    entries = list(spec) + [None] * (ndim - len(spec))
    return [e if e is None or isinstance(e, str) else list(e) for e in entries]


def worker(data_prefix: str, root: Path, out: Path) -> None:
    """Train every layout in ``MESHES``; then resume ``RESUME_FROM`` on tensor=8."""
    import jax

    from neox_jax.training.trainer import train_and_evaluate

    report = {"device_count": jax.device_count(), "runs": {}}
    for name, mesh in MESHES.items():
        save_every = RESUME_STEP if name == RESUME_FROM else STEPS
        config = _config(data_prefix, save_every, **mesh)
        init = _initial_state_report(config)
        train_and_evaluate(config, root / name)
        report["runs"][name] = {"init": init, "losses": logged(root / name)}
    # Restore onto a different mesh with the same device count: Megatron-sharded
    # optimizer state from an FSDP-sharded checkpoint.
    resumed = _copy_checkpoint(root / RESUME_FROM, RESUME_STEP, root / "resume_tensor8")
    train_and_evaluate(_config(data_prefix, **MESHES["tensor8"]), resumed)
    report["runs"]["resume_tensor8"] = {"losses": logged(resumed)}
    out.write_text(json.dumps(report))


def _copy_checkpoint(workdir: Path, step: int, dest: Path) -> Path:
    """A fresh run directory holding only ``workdir``'s checkpoint ``step``."""
    shutil.copytree(workdir / "checkpoints" / str(step), dest / "checkpoints" / str(step))
    return dest


# ---------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(8-device report, 1-device losses, 1-device initial report, resumed losses)."""
    root = tmp_path_factory.mktemp("parallel")
    data = write_dataset(root / "counting")
    out = root / "report.json"
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags(DEVICES),
        "JAX_PLATFORMS": "cpu",
    }
    cmd = [sys.executable, __file__, "--worker", data, str(root), str(out)]
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # Meanwhile, the 1-device reference in this process (the trainer's default
        # mesh, data=-1, is all of this process's single CPU device).
        from neox_jax.training.trainer import train_and_evaluate

        single = _config(data)
        single_init = _initial_state_report(single)
        train_and_evaluate(single, root / "single")
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]
    report = json.loads(out.read_text())
    # Restore onto a different device count: the 8-device fsdp8 checkpoint of
    # step 4, continued on this process's single device.
    resumed = _copy_checkpoint(root / RESUME_FROM, RESUME_STEP, root / "resume_single")
    train_and_evaluate(_config(data), resumed)
    return report, logged(root / "single"), single_init, logged(resumed)


def test_runs_on_eight_devices(runs):
    report, single, single_init, _ = runs
    assert report["device_count"] == DEVICES
    assert sorted(single) == list(range(1, STEPS + 1))
    assert single_init["mesh"] == {"data": 1, "stage": 1, "fsdp": 1, "expert": 1, "tensor": 1}


@pytest.mark.parametrize("mesh", list(MESHES))
def test_same_initial_params(runs, mesh):
    report, _, single_init, _ = runs
    init = report["runs"][mesh]["init"]
    # Initialisation is sharded (each device draws only its shard) but the values do
    # not depend on the layout: threefry random bits are a function of the element
    # index, so the params are bitwise equal to the 1-device ones.
    assert init["params_hash"] == single_init["params_hash"]


@pytest.mark.parametrize("mesh", list(MESHES))
def test_same_losses(runs, mesh):
    report, single, _, _ = runs
    losses = {int(k): v for k, v in report["runs"][mesh]["losses"].items()}
    assert sorted(losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [losses[s] for s in range(1, STEPS + 1)],
        [single[s] for s in range(1, STEPS + 1)],
        rtol=LOSS_RTOL,
        err_msg=f"mesh {mesh}",
    )
    assert losses[STEPS] < losses[1]  # and it actually trains


def test_params_sharded_as_the_rules_say(runs):
    """fsdp=8: every kernel's embed dimension is split 8 ways; nothing else is."""
    report, _, _, _ = runs
    params = report["runs"]["fsdp8"]["init"]["params"]
    qkv = params["layers/attention/query_key_value/kernel"]  # [L, E, 3E]
    assert qkv["spec"] == [None, "fsdp", None]
    assert qkv["shard_shapes"] == [[2, 64 // 8, 3 * 64]]
    assert params["layers/mlp/dense_4h_to_h/kernel"]["spec"] == [None, None, "fsdp"]
    assert params["embed_in/embedding"]["spec"] == [None, "fsdp"]  # [V, E]
    assert params["embed_out/kernel"]["spec"] == ["fsdp", None]  # [E, V]
    assert params["final_layer_norm/scale"]["spec"] == [None]  # norms replicated
    # Adam's first moment follows its parameter (ZeRO-3: no replicated optimizer state).
    assert report["runs"]["fsdp8"]["init"]["adam_mu_qkv_shard_shapes"] == [[2, 8, 192]]

    # tensor=8: Megatron layout, heads and MLP columns split, residual dim whole.
    params = report["runs"]["tensor8"]["init"]["params"]
    assert params["layers/attention/query_key_value/kernel"]["spec"] == [None, None, "tensor"]
    assert params["layers/attention/dense/kernel"]["spec"] == [None, "tensor", None]
    assert params["layers/mlp/dense_h_to_4h/kernel"]["spec"] == [None, None, "tensor"]
    assert params["embed_out/kernel"]["spec"] == [None, "tensor"]

    # data=2 x fsdp=2 x tensor=2: both splits on one kernel.
    params = report["runs"]["data2_fsdp2_tensor2"]["init"]["params"]
    qkv = params["layers/attention/query_key_value/kernel"]
    assert qkv["spec"] == [None, "fsdp", "tensor"]
    assert qkv["shard_shapes"] == [[2, 32, 96]]


def test_full_params_never_on_one_device(runs):
    """On fsdp=8 and tensor=8 each device creates only its eighth of the state."""
    report, _, single_init, _ = runs
    for mesh in ("fsdp8", "tensor8"):
        init = report["runs"][mesh]["init"]
        for name, p in init["params"].items():
            if name.endswith("kernel") or name.endswith("embedding"):
                assert np.prod(p["shard_shapes"][0]) * 8 == np.prod(p["shape"]), (mesh, name)
        # The compiled initialiser's per-device buffers against the 1-device one's:
        # outputs (params + two Adam moments) are an eighth (plus the replicated norms
        # and biases), and so are the temporaries (the random bits drawn per shard),
        # so nothing is built whole and sliced afterwards.
        mem, whole = init["init_memory"], single_init["init_memory"]
        assert mem["output_bytes"] < whole["output_bytes"] / 6, (mesh, mem, whole)
        assert mem["temp_bytes"] < whole["temp_bytes"] / 6, (mesh, mem, whole)


def test_restore_onto_other_device_count_and_mesh(runs):
    """fsdp8's step-4 checkpoint continues identically on 1 device and on tensor=8."""
    report, single, _, resumed_single = runs
    source = {int(k): v for k, v in report["runs"][RESUME_FROM]["losses"].items()}
    tensor8 = {int(k): v for k, v in report["runs"]["resume_tensor8"]["losses"].items()}
    later = range(RESUME_STEP + 1, STEPS + 1)
    assert sorted(resumed_single) == list(later)
    assert sorted(tensor8) == list(later)
    for resumed in (resumed_single, tensor8):
        got = [resumed[s] for s in later]
        np.testing.assert_allclose(got, [source[s] for s in later], rtol=LOSS_RTOL)
        np.testing.assert_allclose(got, [single[s] for s in later], rtol=LOSS_RTOL)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=3, metavar=("DATA", "ROOT", "OUT"), required=True)
    args = parser.parse_args()
    worker(args.worker[0], Path(args.worker[1]), Path(args.worker[2]))

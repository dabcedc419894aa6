"""The Pallas kernels compile for the platform a program is placed on, checked on a CPU.

tests/helpers/kernel_programs.py builds the model's programs with
``attention_impl="pallas"`` (a training gradient, a decode step, and a quantized
forward with ``matmul_impl="pallas"``) for head dims 64, 128 and 256 and a length of
200 (no kernel block divides it), places them on a TPU v5e device and compiles them
with the TPU compiler, and lowers them for CUDA, all on this CPU-only host. It
records the kernels each program contains. A kernel that chose its compiler from the
host (``jax.default_backend()`` is "cpu" here) would contain none: the interpreter
lowers to plain HLO. On a 4-chip mesh the kernels must also run per chip.

libtpu is loaded in one subprocess for the whole file. Under pytest-xdist every worker
shares its result: the first one to take the file lock runs it, the others read it.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'jax[tpu]==<jax version>'); "
    "it is what describes TPU topologies and compiles for them.",
)

HEAD_DIMS = (64, 128, 256)
FLASH = ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv")


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the same folder for every worker of this run
    result = shared / "kernel_programs.json"
    with open(shared / "kernel_programs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.exists():
            script = REPO / "tests" / "helpers" / "kernel_programs.py"
            proc = subprocess.run(
                [sys.executable, str(script), str(result)],
                env={**os.environ, "JAX_PLATFORMS": "cpu"},
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(result.read_text())


def test_programs_are_built_on_a_cpu_host(programs):
    assert programs["host_backend"] == "cpu"


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_training_gets_mosaic_on_tpu_and_triton_on_cuda(programs, head_dim):
    p = programs[f"train/d{head_dim}"]
    # One layer: the forward kernel and both backward kernels, once each.
    assert p["tpu"] == {f"tpu:{k}": 1 for k in FLASH}
    assert p["tpu_compiled_custom_calls"] == 3  # they survive the TPU compiler
    assert p["cuda"] == {f"cuda:{k}": 1 for k in FLASH}


def test_32k_attention_gradient_compiles_for_tpu(programs):
    """The flash kernels stream K/V blocks through the grid: their VMEM use does not grow
    with the sequence, so a 32,768-token gradient (GQA, segment ids) compiles for TPU."""
    p = programs["flash/32k"]
    assert p["tpu"] == {f"tpu:{k}": 1 for k in FLASH}
    assert p["tpu_compiled_custom_calls"] == 3
    assert p["cuda"] == {f"cuda:{k}": 1 for k in FLASH}


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_decoding_gets_mosaic_on_tpu_and_triton_on_cuda(programs, head_dim):
    p = programs[f"decode/d{head_dim}"]
    assert p["tpu"] == {"tpu:decode_attention": 1}
    assert p["tpu_compiled_custom_calls"] == 1
    assert p["cuda"] == {"cuda:decode_attention": 1}


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_matmul_gets_mosaic_on_tpu_and_triton_on_cuda(programs, bits):
    p = programs[f"quantized/int{bits}"]
    # The four Linear kernels of the block (embed_out stays float by default).
    assert p["tpu"] == {f"tpu:quantized_matmul_int{bits}": 4}
    assert p["tpu_compiled_custom_calls"] == 4
    assert p["cuda"] == {f"cuda:quantized_matmul_int{bits}": 4}


def test_explicit_target_overrides_the_placement(programs):
    p = programs["flash/d64/interpret"]
    assert p["tpu"] == {} and p["cuda"] == {}
    # The interpreter's grid loops: forward, dq and dkv kernels.
    assert p["tpu_while_loops"] >= 3


def test_sharded_programs_run_the_kernels_per_chip(programs):
    # A batch of 8 split over 4 chips (fsdp): each chip's kernels see its 2 rows. (A
    # kernel left to XLA's partitioner would not lower at all for TPU.)
    p = programs["sharded"]
    assert p["train"]["tpu"] == {f"tpu:{k}": 1 for k in FLASH}
    assert p["train"]["kernel_batches"] == [2, 2, 2]
    assert p["decode"]["tpu"] == {"tpu:decode_attention": 1}
    assert p["decode"]["kernel_batches"] == [2]
    assert p["quantized"]["tpu"] == {"tpu:quantized_matmul_int4": 4}

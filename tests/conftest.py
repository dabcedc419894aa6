"""Test-suite settings: CPU only, quiet JAX, one device per process unless a test asks.

Multi-device tests start their own subprocess with
``--xla_force_host_platform_device_count``; nothing here changes the device count.
"""

import gc
import os
import sys
from pathlib import Path

import pytest

# The suite is CPU-only; this also stops an installed libtpu from probing for a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _compilation_cache() -> None:
    """A fresh XLA compilation cache for this run, one folder per pytest worker, shared
    with the subprocesses each starts.

    Most of the suite's time is XLA compiling small programs, and many tests (and the CLI
    subprocesses they start) compile the same ones. With JAX's persistent cache each
    identical program compiles once per worker and run: every program is still compiled
    by this run, and a hit returns that same executable, so no check sees anything else.
    One folder per worker, not one for all: without ``filelock`` JAX writes cache files
    unlocked, and two workers writing one key at once could race. A cache folder the user
    set is kept.
    """
    ours = os.environ.get("NEOX_JAX_TEST_XLA_CACHE")  # made by this file in the controller
    if "JAX_COMPILATION_CACHE_DIR" in os.environ and not ours:
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if ours and worker:  # an xdist worker: a subfolder the controller removes at exit
        folder = os.path.join(ours, worker)
        os.makedirs(folder, exist_ok=True)
    else:
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="neox_jax_test_xla_cache_")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["NEOX_JAX_TEST_XLA_CACHE"] = folder
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    # Cache every program: the suite's are small, most compile in under a second.
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


_compilation_cache()

# Compile the suite's programs with XLA's backend at -O0 and without LLVM's expensive
# passes (JAX's own switch; an environment variable, so the CLI and fake-device
# subprocesses the tests start inherit it). Most of the suite's time is compiling tiny
# programs that then run for milliseconds; this cut the CPU time of compile-bound files
# by ~30-40% (tests/test_pipeline.py: 77-92 -> 53-56 CPU-s). It changes code generation
# only: the HLO graph and fusion are the same and fast-math stays off; a few emitters (the
# plain dot) sum in another order at -O0, so values move by round-off (a tiny model's fp32
# logits by < 1e-6, its gradients by < 1e-8), inside every test's stated tolerance.
# Tests only: importing neox_jax never sets it. A value the user set is kept (0 tests the
# optimized build).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# And with XLA's older CPU loop emitters, which compile faster, and without YNNPACK's
# fusions, which can segfault on jaxlib 0.10.2 (tests/helpers/xla.py says why and what
# each changes); also inherited by subprocesses, and kept by those that set a
# fake device count (helpers.xla.xla_flags). A choice the user made in XLA_FLAGS is kept.
from helpers.xla import SUITE_FLAGS  # noqa: E402

for _flag in SUITE_FLAGS.split():
    if _flag.split("=")[0] + "=" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

# Threads enough for the fake-device subprocesses the tests start (up to 8 devices):
# XLA:CPU's pools are max(cores, devices) threads, and a program whose devices each run two
# collectives at once can hold them all in a rendezvous and abort after 40 s (CI, stop 20:
# the pipeline decode on 4 fake devices; about one run in three under load here, none in
# 8 with 32 threads). neox_jax's own commands set this for themselves
# (cli.threads_for_fake_devices, which says more); the suite's scripts import JAX directly,
# so it is set here, for the processes the tests start only: this process's CPU client is
# made first, with XLA's default pools, as in every run before this setting. A value the
# user set is kept.
if "NPROC" not in os.environ and "PJRT_NPROC" not in os.environ:
    import jax

    jax.devices()  # reads PJRT_NPROC once, now, while it is unset
    os.environ["PJRT_NPROC"] = "32"

# `configs/` is not a package on the install path; make `import configs.pretrain` work.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Shared fixtures (module scope), defined once in tests/helpers/.
from helpers.tokenizer import corpus_file, hf, hf_dir  # noqa: E402, F401

# Files whose tests take longest (summed from full-suite --durations), roughly slowest
# first. With ``--dist=loadfile`` (pyproject.toml) each file runs on one xdist worker, so a
# module-scoped fixture (a fake-device subprocess, a trained run) is built once, not once
# per worker; starting the long files first lets the short ones fill the end, so neither
# worker idles long while the other finishes a long file.
SLOW_FIRST = [
    "test_readme_run.py",
    "test_kernels.py",
    "test_expert_mesh.py",
    "test_moe_capabilities.py",
    "test_train.py",
    "test_serving_engine.py",
    "test_families_kernels.py",
    "test_parallel.py",
    "test_parallel_inference.py",
    "test_pipeline.py",
    "test_model_pallas.py",
    "test_faults.py",
    "test_moe.py",
    "test_model.py",
    "test_quant_gptq.py",
    "test_families_sharding.py",
    "test_head_loss.py",
    "test_families_parallel_decode.py",
    "test_multihost.py",
    "test_expert_parallel.py",
    "test_families_capabilities.py",
    "test_lm_eval.py",
    "test_families_train.py",
    "test_finetune.py",
    "test_kernel_compile.py",
]


def pytest_collection_modifyitems(config, items):
    """Put the slow files first; the order inside each file, and of the rest, is kept."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After each file's last test (and its module fixtures), free the programs it compiled.

    XLA:CPU maps each compiled kernel's code, constants and data into memory as three
    separate mappings, which stay until the executable is freed, and JAX's jit caches keep
    executables alive. One file can leave 15,000 mappings (tests/test_serving_engine.py),
    and Linux allows a process 65,530 (``vm.max_map_count``): past that, XLA's LLVM
    compile fails with "Cannot allocate memory" and the process segfaults in
    ``backend_compile_and_load`` (reproduced by filling the mappings first). That is how
    pytest workers died late in three full runs, CI's included, each compiling a
    Generator's prefill after half the suite (once as it wrote the compilation cache);
    never a file alone. Clearing the caches at a file's end keeps a worker near one
    file's worth (test_generate.py after test_serving_engine.py: 20,759 mappings without
    this, 6,405 with it); done past a third of the limit only, so that until then a later
    file reuses what an earlier one compiled (the persistent compilation cache serves it
    after a clear).
    """
    import jax

    result = yield
    if nextitem is None or nextitem.path != item.path:
        count, limit = _mappings()
        if count is None or count > limit // 3:
            jax.clear_caches()
            gc.collect()
    return result


def _mappings() -> tuple[int | None, int]:
    """(this process's memory mappings, the most Linux allows it); None off Linux."""
    try:
        with open("/proc/self/maps", "rb") as f:
            count = sum(1 for _ in f)
        with open("/proc/sys/vm/max_map_count") as f:
            return count, int(f.read())
    except (OSError, ValueError):
        return None, 0

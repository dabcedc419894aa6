"""Test-suite settings: CPU only, quiet JAX, one device per process unless a test asks.

Multi-device tests start their own subprocess with
``--xla_force_host_platform_device_count``; nothing here changes the device count.
"""

import os
import sys
from pathlib import Path

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

# `configs/` is not a package on the install path; make `import configs.pretrain` work.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Shared fixtures (module scope), defined once in tests/helpers/.
from helpers.tokenizer import corpus_file, hf, hf_dir  # noqa: E402, F401

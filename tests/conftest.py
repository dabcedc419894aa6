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

# `configs/` is not a package on the install path; make `import configs.pretrain` work.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Shared fixtures (module scope), defined once in tests/helpers/.
from helpers.tokenizer import corpus_file, hf, hf_dir  # noqa: E402, F401

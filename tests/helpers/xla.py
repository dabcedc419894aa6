"""XLA flags for the suite's processes: conftest.py sets ``SUITE_FLAGS`` in this
process's ``XLA_FLAGS``; subprocesses that need a fake device count keep them."""

import os
import re

# The suite's programs are tiny: compiling them costs far more than running them. XLA's
# CPU "fusion emitters" (the MLIR code generator for fused loops) compile much more
# slowly than the older elemental emitters they replace, and cost this suite's
# compile-bound files ~35% of their CPU time (tests/test_head_loss.py +
# tests/test_causal_split.py: 82 -> 52 CPU-s). Like -O0 (conftest.py), this changes
# code generation only, not the HLO graph or its fusion: a tiny model's fp32 logits move
# by < 1.1e-6 and its gradients by < 3e-8 (as much as -O0 moves them), inside every
# test's stated tolerance. Tests only; importing neox_jax never sets it. XLA aborts on a
# flag it does not know: if a future jaxlib drops this one, drop it here.
SUITE_FLAGS = "--xla_cpu_use_fusion_emitters=false"
_DEVICES = re.compile(r"--xla_force_host_platform_device_count=\S*")


def xla_flags(devices: int | None = None) -> str:
    """``XLA_FLAGS`` for a subprocess: this process's flags (the suite's, conftest.py)
    with ``devices`` fake CPU devices in place of any device count they name (none if
    ``devices`` is None)."""
    flags = _DEVICES.sub("", os.environ.get("XLA_FLAGS", "")).split()
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)

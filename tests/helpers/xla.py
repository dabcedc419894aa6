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
#
# And without XLA:CPU's YNNPACK fusions. jaxlib 0.10.2 (the newest for Python 3.11, so
# what CI installs) and 0.11.0 ship a YNNPACK/slinky bug that segfaults on x86-64 (on the
# AMD EPYC CPUs of this project's machines) when it runs some reductions and products
# (jax-ml/jax#39257, #40412; fixed in XNNPACK after 0.11.0). The fault is on an Eigen
# worker thread, after the program was queued, so it kills the whole xdist worker
# wherever its Python happens to be; one such crash in a full run took CI's worker down
# and left pytest-xdist's loadfile scheduler waiting for good (pytest-dev/pytest-xdist#1378).
# The 7-line reproducer from #40412 segfaults on this machine and runs with this flag.
# Without YNNPACK every dot and reduction is XLA's own (Eigen's); values move by
# round-off, inside every test's stated tolerance. Users are told in the README.
SUITE_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_cpu_experimental_ynn_fusion_type="
_DEVICES = re.compile(r"--xla_force_host_platform_device_count=\S*")


def xla_flags(devices: int | None = None) -> str:
    """``XLA_FLAGS`` for a subprocess: this process's flags (the suite's, conftest.py)
    with ``devices`` fake CPU devices in place of any device count they name (none if
    ``devices`` is None)."""
    flags = _DEVICES.sub("", os.environ.get("XLA_FLAGS", "")).split()
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)

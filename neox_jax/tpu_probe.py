"""Keep an installed libtpu quiet on machines without a TPU.

With ``jax[tpu]`` installed (the test and ``tpu`` extras), JAX initialises libtpu in
every program, and on a machine without TPU chips libtpu prints a screen of warnings
(no accelerator type, no worker hostnames) before JAX falls back to the GPU or CPU.
Entry points call ``quiet_tpu_probe()`` first: when the user has not chosen platforms,
libtpu is installed and no TPU chip is on the PCI bus, JAX is told to use the other
platforms, which is where it would have ended up anyway. On a TPU VM nothing changes.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# PCI vendor id of Google's TPU chips (what JAX's own TPU detection looks for).
GOOGLE_PCI_VENDOR = "0x1ae0"


def tpu_chips_present(pci_root: Path = Path("/sys/bus/pci/devices")) -> bool:
    """Whether a Google TPU chip is on the PCI bus (or /dev/accel*, older TPU VMs)."""
    if any(Path("/dev").glob("accel[0-9]*")):
        return True
    try:
        vendors = (d / "vendor" for d in pci_root.iterdir())
        return any(v.is_file() and v.read_text().strip() == GOOGLE_PCI_VENDOR for v in vendors)
    except OSError:
        return False


def _other_platforms() -> str:
    cuda_plugin = any(
        importlib.util.find_spec(name) is not None
        for name in ("jax_cuda12_plugin", "jax_cuda13_plugin")
    )
    return "cuda,cpu" if cuda_plugin and Path("/dev/nvidiactl").exists() else "cpu"


def quiet_tpu_probe(environ=os.environ, pci_root: Path = Path("/sys/bus/pci/devices")) -> str:
    """Sets ``jax_platforms`` away from TPU when libtpu is installed but no TPU is here.

    Returns:
      The platforms chosen, or "" when nothing was changed (the user set JAX_PLATFORMS,
      libtpu is not installed, or a TPU is present).
    """
    if environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return ""
    if tpu_chips_present(pci_root):
        return ""
    import jax

    platforms = _other_platforms()
    jax.config.update("jax_platforms", platforms)  # before any backend is initialised
    return platforms

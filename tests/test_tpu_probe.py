"""Entry points print no libtpu warnings on machines without a TPU (#14 item 8)."""

import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from neox_jax.convert import save_hf
from neox_jax.model import ModelConfig, init_params
from neox_jax.tpu_probe import quiet_tpu_probe, tpu_chips_present


def _pci(tmp_path, vendors):
    for i, vendor in enumerate(vendors):
        (tmp_path / f"0000:00:0{i}.0").mkdir(parents=True)
        (tmp_path / f"0000:00:0{i}.0" / "vendor").write_text(vendor + "\n")
    return tmp_path


def test_tpu_chips_are_found_by_pci_vendor(tmp_path):
    assert tpu_chips_present(_pci(tmp_path / "tpu", ["0x8086", "0x1ae0"]))
    assert not tpu_chips_present(_pci(tmp_path / "gpu", ["0x8086", "0x10de"]))
    assert not tpu_chips_present(tmp_path / "missing")


def test_a_platform_chosen_by_the_user_or_a_tpu_is_left_alone(tmp_path):
    assert quiet_tpu_probe({"JAX_PLATFORMS": "tpu"}) == ""
    if importlib.util.find_spec("libtpu") is not None:
        assert quiet_tpu_probe({}, _pci(tmp_path, ["0x1ae0"])) == ""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu installed")
def test_entry_point_prints_no_libtpu_warnings(tmp_path):
    if tpu_chips_present():
        pytest.skip("this machine has a TPU")
    config = ModelConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16,
    )  # fmt: skip
    save_hf(config, jax.device_get(init_params(config, jax.random.key(0))), tmp_path / "hf")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    cmd = [sys.executable, "-m", "neox_jax.convert", f"--src={tmp_path / 'hf'}",
           f"--dst={tmp_path / 'ckpt'}", "--to=neox"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TPU" not in out.stderr and "libtpu" not in out.stderr, out.stderr[-2000:]

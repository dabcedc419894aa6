"""FLOPs, MFU, throughput and the metric writers (console line + TensorBoard).

FLOPs per trained token (forward + backward = 3x forward), following the PaLM paper
(Chowdhery et al. 2022, appendix B) with attention counted:

    6 * N  +  12 * L * E * T

where ``N`` counts the parameters that take part in matrix multiplies (every layer
weight and the output projection, but not the input embedding, which is a gather),
``L`` is the layer count, ``E`` the hidden size and ``T`` the sequence length. The
second term is the ``QK^T`` and ``AV`` products over the full (unmasked) ``T x T``
score matrix, as PaLM counts it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import numpy as np

from neox_jax.model import ModelConfig

# Dense bf16 peak FLOP/s per chip (vendor datasheets).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def matmul_params(config: ModelConfig) -> int:
    """Parameters used in matrix multiplies per token (excludes the embedding gather)."""
    e, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_layer = e * 3 * e + e * e + 2 * e * f
    return layers * per_layer + e * config.vocab_size  # + output projection (tied or not)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), attention included."""
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return 6.0 * matmul_params(config) + attention


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak FLOP/s of one accelerator from the table, None if unknown (e.g. CPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(name):
            return peak
    return None


def measure_matmul_peak(size: int = 1024, dtype=np.float32, repeats: int = 5) -> float:
    """Best FLOP/s of a square matmul on the default device (the CPU's practical peak)."""
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best


def say(message: str) -> None:
    """A line for the person running the job (process 0 only), also sent to the log."""
    logging.info(message)
    if jax.process_index() == 0:
        print(message, flush=True)


class MetricWriter:
    """Console progress line, TensorBoard events and a JSON-lines log; process 0 only."""

    def __init__(
        self,
        workdir: str | Path | None,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
    ):
        self.total_steps = total_steps
        self.enabled = enabled and jax.process_index() == 0
        self.tb = None
        self.jsonl = None
        if self.enabled and workdir is not None:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
            self.jsonl = open(Path(workdir) / "metrics.jsonl", "a")  # noqa: SIM115
        self.start = time.time()
        self.start_step = start_step

    def write(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
            self.tb.flush()
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
            self.jsonl.flush()

    def progress(self, step: int, scalars: dict[str, float]) -> str:
        done = step - self.start_step
        # The first interval includes compilation, so the ETA settles after a few logs.
        eta = (time.time() - self.start) / done * (self.total_steps - step) if done else 0.0
        parts = [f"step {step}/{self.total_steps}"]
        for key, fmt in (
            ("loss", "{:.4f}"),
            ("eval_loss", "{:.4f}"),
            ("grad_norm", "{:.3f}"),
            ("lr", "{:.2e}"),
            ("tokens_per_sec", "{:,.0f} tok/s"),
            ("mfu", "MFU {:.1%}"),
        ):
            if key in scalars:
                label = "" if key in ("tokens_per_sec", "mfu") else f"{key} "
                parts.append(label + fmt.format(scalars[key]))
        parts.append(f"ETA {_hms(eta)}")
        line = " | ".join(parts)
        if self.enabled:
            say(line)
        return line

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

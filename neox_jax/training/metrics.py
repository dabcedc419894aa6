"""FLOPs, MFU, throughput and the metric writers (console line, TensorBoard, W&B), profiling.

FLOPs per trained token (forward + backward = 3x forward), following the PaLM paper
(Chowdhery et al. 2022, appendix B) with attention counted:

    6 * N  +  12 * L * E * T

where ``N`` counts the parameters that take part in matrix multiplies (every layer
weight and the output projection, but not the input embedding, which is a gather; for
a mixture of experts only the experts a token is routed to), ``L`` is the layer count,
``E`` the width of the attention heads (the hidden size for GPT-NeoX) and ``T`` the
sequence length. The
second term is the ``QK^T`` and ``AV`` products over the full (unmasked) ``T x T``
score matrix, as PaLM counts it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.errors import UserError
from neox_jax.model import ModelConfig
from neox_jax.optional import require

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
    """Parameters one token multiplies by (excludes the embedding gather, norms, biases).

    Attention's q/k/v/o projections (grouped KV heads counted as they are); each dense
    layer's MLP (three matrices when gated); each sparse layer's router, its
    ``num_experts_per_tok`` experts (a mixture of experts' "active" parameters) and any
    shared expert; and the output projection.
    """
    e, layers = config.hidden_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.kv_heads * config.head_dim
    attention = e * (q + 2 * kv) + q * e
    mlp = (3 if config.gated_mlp else 2) * e * config.intermediate_size
    sparse = len(config.sparse_layers)
    moe = e * config.num_experts + config.num_experts_per_tok * 3 * e * config.expert_size
    if config.shared_expert_intermediate_size:  # gate/up/down and its sigmoid gate
        moe += 3 * e * config.shared_expert_intermediate_size + e
    per_model = layers * attention + (layers - sparse) * mlp + sparse * moe
    return per_model + e * config.vocab_size  # + output projection (tied or not)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), attention included."""
    heads_width = config.num_attention_heads * config.head_dim  # hidden_size for NeoX
    attention = 12 * config.num_hidden_layers * heads_width * seq_len
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


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """``"10,12"`` -> ``(10, 12)`` (first and last step traced); ``""`` -> None."""
    if not text:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        first, last = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        first = last = None
    if first is None or not 0 <= first <= last:
        raise UserError(
            f"train.profile_steps={text!r}: expected 'FIRST,LAST' step numbers with "
            "0 <= FIRST <= LAST (e.g. '10,12'), or one step"
        )
    return first, last


class StepProfiler:
    """A ``jax.profiler`` trace of steps ``first..last`` into ``trace_dir``.

    ``trace_dir`` is the TensorBoard log folder: the trace lands in its
    ``plugins/profile/<run>/``, where TensorBoard's profile plugin finds it.
    """

    def __init__(self, steps: tuple[int, int] | None, trace_dir: Path):
        self.steps, self.trace_dir, self.active = steps, trace_dir, False

    def before_step(self, step: int, state) -> None:
        """Call before running ``step``; ``state`` is waited on so a trace holds whole steps."""
        if self.steps is None:
            return
        first, last = self.steps
        if step == first and not self.active:
            jax.block_until_ready(state)
            jax.profiler.start_trace(str(self.trace_dir))
            self.active = True
        elif step == last + 1:
            self.stop(state)

    def stop(self, state=None) -> None:
        if self.active:
            if state is not None:
                jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            say(f"profile of steps {self.steps[0]}..{self.steps[1]} written to {self.trace_dir}")


def device_memory() -> str | None:
    """``"mem 1.2/16.0 GiB"``: the fullest local device's use and limit (None on CPU)."""
    stats = [s for s in (d.memory_stats() for d in jax.local_devices()) if s]
    if not stats:
        return None
    used = max(s.get("bytes_in_use", 0) for s in stats)
    limit = max(s.get("bytes_limit", 0) for s in stats)
    return f"mem {used / 2**30:.1f}/{limit / 2**30:.1f} GiB"


class _Wandb:
    """Weights & Biases run (the ``wandb`` extra); honours ``WANDB_MODE=offline``."""

    def __init__(self, project: str, name: str, workdir: Path, config: dict | None):
        wandb = require("wandb", "train.wandb_project")
        self.run = wandb.init(
            project=project, name=name, dir=str(workdir), config=config, resume="allow"
        )

    def log(self, step: int, scalars: dict[str, float], prefix: str) -> None:
        self.run.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def _tensorboard_writer(tb_dir: Path):
    """A TensorBoard event writer for ``tb_dir``.

    tensorboardX is imported here, not at the top, and without torch: at import it tries
    ``import torch`` only to accept torch tensors as values (2-4 s where torch is
    installed, as with the test extra), and this writer is given Python floats only. So
    unless torch is already loaded, the import runs with torch marked missing
    (``sys.modules["torch"] = None`` makes ``import torch`` raise ImportError, which
    tensorboardX catches), and the mark is removed right after, so a later
    ``import torch`` anywhere works as before.
    """
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None  # type: ignore[assignment]
        try:
            from tensorboardX import SummaryWriter
        finally:
            if sys.modules.get("torch", 0) is None:
                del sys.modules["torch"]
    return SummaryWriter(str(tb_dir))


class MetricWriter:
    """Console progress line, TensorBoard events, a JSON-lines log and optionally W&B;
    process 0 only. Also runs the profiler (``before_step``) for the trainer."""

    def __init__(
        self,
        workdir: str | Path | None,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        *,
        train_config=None,
        run_config: dict | None = None,
    ):
        self.total_steps = total_steps
        self.enabled = enabled and jax.process_index() == 0
        self.tb = None
        self.jsonl = None
        self.wandb = None
        train_config = train_config or {}
        profile = parse_profile_steps(train_config.get("profile_steps", ""))
        tb_dir = Path(workdir or ".") / "tensorboard"
        # Every process traces its own devices (a trace per host, as the profiler expects).
        self.profiler = StepProfiler(profile if workdir is not None else None, tb_dir)
        if self.enabled and workdir is not None:
            self.tb = _tensorboard_writer(tb_dir)
            self.jsonl = open(Path(workdir) / "metrics.jsonl", "a")  # noqa: SIM115
            if project := train_config.get("wandb_project", ""):
                name = train_config.get("wandb_run", "") or Path(workdir).absolute().name
                self.wandb = _Wandb(project, name, Path(workdir), run_config)
        self.start = time.time()
        self.start_step = start_step

    def before_step(self, step: int, state) -> None:
        """Starts or stops the profiler trace around the configured steps."""
        self.profiler.before_step(step, state)

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
        if self.wandb is not None:
            self.wandb.log(step, scalars, prefix)

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
        if (memory := device_memory()) is not None:  # accelerators only
            parts.append(memory)
        parts.append(f"ETA {_hms(eta)}")
        line = " | ".join(parts)
        if self.enabled:
            say(line)
        return line

    def close(self):
        self.profiler.stop()
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

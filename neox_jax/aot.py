"""Compile the train step for a TPU pod topology ahead of time, without the hardware.

    pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"
    JAX_PLATFORMS=cpu python -m neox_jax.aot --config=configs/pretrain.py:neox-20b \\
        --topology=v5e:16x16 --config.mesh.data=1 --config.mesh.fsdp=-1 \\
        --config.data.global_batch_size=256

Prints what each device needs (arguments, outputs, temporaries, from XLA's
``memory_analysis()`` of the real compiled program), whether that fits the HBM the
chip leaves to programs (asked of the TPU compiler, see ``usable_hbm_bytes``), the
train state's own share, the step's FLOPs and the compile time. A program whose
temporaries alone exceed HBM is refused by the compiler; that is reported as not
fitting, with the compiler's count of what it needed.

FLOPs are reported two ways. ``model_flops_per_step`` is the formula of
``neox_jax.training.metrics.flops_per_token`` (6N plus attention, PaLM appendix B), the
number MFU is defined with. ``xla_flops_per_device`` is XLA's ``cost_analysis()``,
which counts the body of a while loop once whatever its trip count: the layers are one
``nn.scan``, so it covers the embedding, the output layer, the optimizer and ONE
layer's forward and backward (with its remat recompute). It equals the formula's count
only for a one-layer model (tests/test_aot.py checks that).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from neox_jax import cli

# HBM per chip in bytes (Google Cloud TPU system architecture pages), the fallback
# when the compiler cannot be asked (``usable_hbm_bytes``); device_kind prefixes as
# libtpu names them.
HBM_BYTES = {
    "TPU v4": 32 * 2**30,
    "TPU v5 lite": 16 * 2**30,  # v5e
    "TPU v5": 96 * 2**30,  # v5p
    "TPU v6 lite": 32 * 2**30,  # v6e
}
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def allow_shared_libtpu() -> None:
    """Let this process load libtpu while another one holds it.

    libtpu takes an exclusive lock (/tmp/libtpu_lockfile) to guard the TPU chips; an
    ahead-of-time compile only reads the topology and never touches a chip, so the
    lock would just make two compiles (or a compile beside a test) fail for nothing.
    Must run before libtpu is loaded.
    """
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


# Generations whose chips have two TensorCores that JAX runs as one device
# ("megacore"), as on a real slice; libtpu's default config would list one device per
# core (v4:2x2x4 would give 32 devices instead of the slice's 16).
MEGACORE = ("v4", "v5p")


def topology_devices(name: str):
    """The devices of a TPU topology (needs libtpu; no TPU needed), one per chip."""
    allow_shared_libtpu()
    from jax.experimental import topologies

    kwargs = {"chip_config_name": "megacore"} if name.startswith(MEGACORE) else {}
    try:
        return topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices
    except Exception as e:  # noqa: BLE001 - libtpu raises several types
        raise ValueError(
            f"Cannot describe TPU topology {name!r} ({e}). Install libtpu with "
            "pip install 'jax[tpu]==<your jax version>' and use names like "
            "v4:2x2x4, v5e:16x16, v5p:4x4x8."
        ) from None


def hbm_bytes(device_kind: str) -> int | None:
    """Physical HBM of one chip of ``device_kind``, None if unknown."""
    for kind, size in sorted(HBM_BYTES.items(), key=lambda kv: -len(kv[0])):
        if device_kind.startswith(kind):
            return size
    return None


def usable_hbm_bytes(device) -> int | None:
    """The HBM a program may use on ``device``, as the TPU compiler counts it.

    The runtime reserves part of the physical HBM (v4: 30.75 of 32 GiB), and a program
    compiles even when its buffers exceed the rest: the compiler only refuses when
    its temporaries alone do not fit. So ask it: compile a program that needs 512 GiB
    of temporaries and read "available HBM (30.75G)" from the refusal (binary units,
    as XLA prints byte counts). None if the compiler says something else.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    x = jax.ShapeDtypeStruct((2**16,), jnp.float32, sharding=SingleDeviceSharding(device))

    def huge(x):  # two [2^20, 2^16] fp32 temporaries: 512 GiB, more than any chip has
        return (
            jnp.broadcast_to(x, (2**20, 2**16)).sum(0)
            + jnp.broadcast_to(2 * x, (2**20, 2**16)).cumsum(0)[-1]
        )

    try:
        jax.jit(huge).lower(x).compile()
    except jax.errors.JaxRuntimeError as e:
        sizes = _sizes(str(e).split("\n")[0])
        return int(sizes[1]) if "RESOURCE_EXHAUSTED" in str(e) and len(sizes) == 2 else None
    return None


def _sizes(message: str) -> list[float]:
    """Byte counts printed by XLA ("32.26G", "512.00M") in a message, in bytes."""
    import re

    return [float(v) * _UNITS[u] for v, u in re.findall(r"(\d+(?:\.\d+)?)([KMGT])\b", message)]


def _bytes_per_device(abstract, shardings) -> int:
    """Bytes each device holds of a tree of arrays under ``shardings`` (the most
    loaded device's: an axis that does not divide evenly is padded)."""
    import math

    import jax

    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
        total += math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def lower_train_step(config, devices):
    """The trainer's step (``training.step.build_train_step``) lowered for ``devices``.

    Returns:
      ``(lowered, abstract train state, its shardings, mesh, model config)``.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from neox_jax.model import ModelConfig, abstract_params, param_logical_axes
    from neox_jax.parallel.rules import RULES, batch_sharding
    from neox_jax.training.optimizer import optimizer_from_config
    from neox_jax.training.state import abstract_train_state
    from neox_jax.training.step import build_train_step
    from neox_jax.training.trainer import build_mesh, check_batch

    model_config = ModelConfig.from_dict(config.model.to_dict())
    mesh = build_mesh(config.mesh, devices)
    check_batch(config, mesh)
    tx, schedule = optimizer_from_config(config)
    batch, seq = config.data.global_batch_size, config.data.seq_len
    # Shapes and shardings first, outside the mesh context: no op may run on the
    # (non-existent) TPU devices.
    abstract, shardings = abstract_train_state(
        tx, abstract_params(model_config), param_logical_axes(model_config), mesh
    )
    # Pretraining batches: tokens, plus per-document segments and positions when
    # attention resets at end-of-document (neox_jax.data.pretrain_data).
    keys = ("tokens", "segment_ids", "positions") if config.data.reset_at_eod else ("tokens",)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        batch_spec = {k: batch_sharding(mesh) for k in keys}
        step = build_train_step(config, model_config, tx, schedule, shardings, batch_spec)
        row = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32, sharding=batch_sharding(mesh))
        lowered = step.lower(abstract, {k: row for k in keys})
    return lowered, abstract, shardings, mesh, model_config


def compile_train_step(config, devices) -> dict[str, Any]:
    """Lower and compile the real train step for ``devices``; report memory and FLOPs.

    Args:
      config: a training config (``configs/pretrain.py``), mesh sizes included.
      devices: the devices to build the mesh from, e.g. ``topology_devices(...)``.
    Returns:
      A dict of the figures printed by the CLI (sizes in GiB).
    """
    import jax

    from neox_jax.model import count_params
    from neox_jax.training.metrics import flops_per_token

    start = time.time()
    lowered, abstract, shardings, mesh, model_config = lower_train_step(config, devices)
    batch, seq = config.data.global_batch_size, config.data.seq_len
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled, error = None, str(e).split("\n")[0]
    compile_seconds = time.time() - start
    gib = 2**30
    kind = devices[0].device_kind
    usable = usable_hbm_bytes(devices[0])
    hbm = usable or hbm_bytes(kind)
    model_flops = flops_per_token(model_config, seq) * batch * seq
    report = {
        "devices": len(devices),
        "device_kind": kind,
        "mesh": {a: int(s) for a, s in mesh.shape.items()},
        "params": count_params(model_config),
        # What one token uses (a mixture of experts' "activated" count; = params if dense).
        "active_params": count_params(model_config, active=True),
        "global_batch_size": batch,
        "seq_len": seq,
        "microbatches": config.train.microbatches,
        **({"moe_impl": model_config.moe_impl} if model_config.is_moe else {}),
        "remat": model_config.remat,
        "attention_impl": model_config.attention_impl,
        "dtype": model_config.dtype,
        "state_gib": _bytes_per_device(abstract, shardings) / gib,
        "hbm_gib": None if hbm is None else hbm / gib,
        "hbm_source": "compiler" if usable else "datasheet",
        "model_flops_per_step": model_flops,
        "model_flops_per_device": model_flops / len(devices),
        "compile_seconds": compile_seconds,
    }
    if compiled is None:
        # The TPU compiler refuses programs whose buffers exceed HBM: a legitimate
        # "does not fit" answer, with its own count of what was needed.
        return {**report, "fits": False, "error": error, **_parse_oom(error)}
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # Donated state aliases the new state: count those bytes once.
    per_device = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    return {
        **report,
        "argument_gib": mem.argument_size_in_bytes / gib,
        "output_gib": mem.output_size_in_bytes / gib,
        "alias_gib": mem.alias_size_in_bytes / gib,
        "temp_gib": mem.temp_size_in_bytes / gib,
        "per_device_gib": per_device / gib,
        "fits": None if hbm is None else per_device <= hbm,
        "xla_flops_per_device": float(cost.get("flops", 0.0)) if cost else None,
    }


def _parse_oom(message: str) -> dict[str, float]:
    """Required and available HBM from a TPU out-of-memory refusal, in GiB: "the total
    memory required for HLO temporaries (32.26G) exceeds available HBM (30.75G)"."""
    sizes = _sizes(message)
    if len(sizes) < 2:
        return {}
    return {"required_gib": sizes[0] / 2**30, "available_gib": sizes[1] / 2**30}


def main(config, topology: str, json_out: str) -> dict[str, Any]:
    """Compile ``config``'s train step for ``topology``; print (and save) the report."""
    report = {"topology": topology, **compile_train_step(config, topology_devices(topology))}
    for key, value in report.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:>24}: {text}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(report, f, indent=2)
    return report


COMMAND = cli.Command(
    main,
    "neox_jax.aot",
    extra_flags={
        "topology": ("v5e:2x2", "TPU topology, e.g. v4:2x2x4, v5e:16x16, v5p:4x4x8."),
        "json_out": ("", "Also write the report as JSON here."),
    },
)

if __name__ == "__main__":
    COMMAND.run()

"""Device meshes over the axes ``data``, ``fsdp``, ``expert``, ``tensor`` (and ``stage``),
and multi-host init.

A mesh is described by per-axis sizes; one of them may be -1 ("the rest of the
devices"). On multi-slice TPU (or several GPU nodes) the ``dcn_*`` sizes give the
part of each axis that spans slices over the data-centre network, so the
bandwidth-hungry axes (``tensor``, ``fsdp``) stay inside a slice.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

# Later axes vary fastest over the devices, so on a TPU slice they get the nearest
# neighbours: ``tensor`` (two all-reduces per layer) innermost, then ``expert`` (two
# all-to-alls per sparse layer), then ``fsdp``.
AXES = ("data", "stage", "fsdp", "expert", "tensor")


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Replace a single -1 by whatever makes the product ``num_devices``.

    Raises:
      ValueError: unknown axes, several -1, or sizes that do not multiply to the count.
    """
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise ValueError(f"Unknown mesh axes {sorted(unknown)}; valid axes: {AXES}.")
    sizes = {a: int(sizes.get(a, 1)) for a in AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got {free}.")
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ValueError(f"Mesh axis sizes must be positive or -1, got {sizes}.")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"The mesh {sizes} does not divide the {num_devices} devices: the fixed axes "
                f"multiply to {fixed}. Choose sizes whose product divides {num_devices}."
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"The mesh {sizes} has {fixed} devices but {num_devices} are available; make the "
            "product equal the device count or set one axis to -1."
        )
    return sizes


def create_mesh(
    ici: Mapping[str, int],
    dcn: Mapping[str, int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
    """A ``Mesh`` with axes ``("data", "stage", "fsdp", "expert", "tensor")``.

    Args:
      ici: axis sizes inside a slice (or the whole machine), -1 allowed once.
      dcn: axis sizes across slices (multi-slice); None or all ones for one slice.
      devices: defaults to ``jax.devices()``.
    """
    devices = list(devices if devices is not None else jax.devices())
    dcn = {a: int((dcn or {}).get(a, 1)) for a in AXES}
    num_slices = math.prod(dcn.values())
    if len(devices) % num_slices:
        raise ValueError(f"{len(devices)} devices cannot form {num_slices} slices (dcn={dcn}).")
    per_slice = resolve_axis_sizes(ici, len(devices) // num_slices)
    ici_shape = [per_slice[a] for a in AXES]
    if num_slices > 1:
        array = mesh_utils.create_hybrid_device_mesh(
            ici_shape, [dcn[a] for a in AXES], devices, allow_split_physical_axes=True
        )
    else:
        try:
            array = mesh_utils.create_device_mesh(
                ici_shape, devices, allow_split_physical_axes=True
            )
        except (ValueError, NotImplementedError, AssertionError):
            # Topology-aware placement is unavailable (e.g. fake CPU devices in tests).
            array = np.asarray(devices).reshape(ici_shape)
    return jax.sharding.Mesh(array, AXES)


# Set by launch_tpu.sh on every worker: a TPU VM's shell has no environment variable
# naming its peers (jax.distributed finds them from the TPU metadata server), so the
# launcher says explicitly that this is one process of many.
DISTRIBUTED_ENV = "NEOX_JAX_DISTRIBUTED"


def _cluster_detected() -> bool:
    """True when the environment describes more than one process (TPU pod, SLURM, MPI)."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return (
        os.environ.get(DISTRIBUTED_ENV, "").lower() in ("1", "true")
        or len([h for h in hosts.split(",") if h]) > 1
        or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Start JAX's multi-controller runtime when running on several hosts.

    On TPU pods, SLURM and Open MPI, ``jax.distributed.initialize()`` discovers its
    peers by itself; elsewhere (e.g. several local processes) pass the coordinator
    address, process count and id. Must run before any other JAX call. Returns whether
    the runtime is (now) initialised; a lone process with no cluster does nothing.
    """
    if jax.distributed.is_initialized():
        return True
    if coordinator_address:
        # CPU collectives across processes need gloo; the setting is ignored elsewhere.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
        return True
    if _cluster_detected():
        jax.distributed.initialize()
        return True
    return False

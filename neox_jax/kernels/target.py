"""Which compiler a Pallas kernel is lowered with: Mosaic (TPU), Triton (GPU) or the interpreter.

The choice follows the platform the computation is *lowered for*, i.e. the devices its
inputs are placed on, not the host that traces it: ``jax.default_backend()`` is "cpu"
when a TPU program is compiled ahead of time on a CPU machine (``neox_jax.aot``), or
when a CUDA program is lowered with ``lowering_platforms=("cuda",)``, and choosing from
it would put the interpreter in those programs. With ``kernel_target="auto"`` every
variant is traced and ``jax.lax.platform_dependent`` keeps, at lowering time, only the
one for the lowering platform: a jit placed on TPU devices gets Mosaic kernels, on GPU
devices Triton kernels, on CPU devices the interpreter. Under ``jax.grad`` the
residuals of the dropped variants are zeros that XLA removes (checked: the compiled TPU
train step needs the same memory as with the target forced to "tpu").
"""

from __future__ import annotations

from collections.abc import Callable

from jax import lax

from neox_jax.errors import UserError

# "auto": from the lowering platform; "tpu": Mosaic; "gpu": Triton; "interpret": the
# Pallas interpreter (any platform, slow; for tests and debugging).
KERNEL_TARGETS = ("auto", "tpu", "gpu", "interpret")


def check_kernel_target(kernel_target: str) -> None:
    if kernel_target not in KERNEL_TARGETS:
        raise UserError(
            f"kernel_target must be one of {KERNEL_TARGETS}, got {kernel_target!r}; "
            "'auto' compiles for the devices the computation is placed on."
        )


def dispatch(kernel_target: str, fn: Callable, *args):
    """``fn(layout, interpret, *args)`` for the kernel target.

    Args:
      kernel_target: one of ``KERNEL_TARGETS``.
      fn: the kernel wrapper; ``layout`` is "tpu" (Mosaic) or "gpu" (Triton, also the
        interpreter's layout), ``interpret`` a bool. Static parameters must be bound
        into ``fn``; ``args`` are arrays (pytrees, None allowed).

    Returns:
      What the selected variant returns (every variant must return the same shapes).
    """
    check_kernel_target(kernel_target)
    if kernel_target == "tpu":
        return fn("tpu", False, *args)
    if kernel_target == "gpu":
        return fn("gpu", False, *args)
    if kernel_target == "interpret":
        return fn("gpu", True, *args)
    triton = lambda *a: fn("gpu", False, *a)  # noqa: E731 - one object: cuda and rocm share it
    return lax.platform_dependent(
        *args,
        tpu=lambda *a: fn("tpu", False, *a),
        cuda=triton,
        rocm=triton,
        default=lambda *a: fn("gpu", True, *a),  # CPU (and any other platform): interpret
    )

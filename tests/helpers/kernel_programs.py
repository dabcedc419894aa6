"""Lower the model's Pallas kernels for a TPU topology and for CUDA on this CPU; print JSON.

Run by tests/test_kernel_compile.py in a subprocess (libtpu stays out of pytest):
``python tests/helpers/kernel_programs.py OUT.json``. The host is a CPU
(``JAX_PLATFORMS=cpu``), so a kernel that chose its compiler from the host would put
the Pallas interpreter in these programs; what is recorded is which kernels each
program actually contains.

* TPU: abstract inputs placed on a device of ``v5e:2x2`` (libtpu describes it, no TPU
  needed); the program is lowered and compiled by the TPU compiler. Mosaic kernels are
  ``tpu_custom_call``s.
* CUDA: ``jit(f).trace(...).lower(lowering_platforms=("cuda",))``; Triton kernels are
  ``__gpu$xla.gpu.triton`` custom calls. (Compiling would need a GPU.)
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # as neox_jax.aot: no chip is used

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding  # noqa: E402

from neox_jax.kernels.flash_attention import flash_attention  # noqa: E402
from neox_jax.model import GPTNeoX, ModelConfig, abstract_params, init_cache  # noqa: E402
from neox_jax.parallel.rules import RULES  # noqa: E402
from neox_jax.quant import QuantConfig, abstract_quantized_params  # noqa: E402

HEAD_DIMS = (64, 128, 256)
LENGTH = 200  # not a multiple of any kernel block: the kernels pad
BATCH = 2
TARGETS = {"tpu_custom_call": "tpu", "__gpu$xla.gpu.triton": "cuda"}


def kernel_batches(text: str) -> list[int]:
    """Leading dim of the first operand of rank >= 4 of every Mosaic kernel: its rows
    of the batch (q in both the flash and the decode kernels' layouts)."""
    batches = []
    for line in text.splitlines():
        if "custom_call @tpu_custom_call(" in line:
            operands = re.search(r"\} : \((.*?)\) ->", line).group(1)
            dims = [t.split("x") for t in re.findall(r"tensor<([^>]*)>", operands)]
            batches += [int(d[0]) for d in dims if len(d) >= 4][:1]
    return batches


def kernels(text: str) -> dict[str, int]:
    """{"<target>:<kernel name>": count} over the custom calls of a lowered module."""
    found = collections.Counter()
    for line in text.splitlines():
        call = re.search(r"custom_call @([\w$.]+)\(", line)
        if call and call.group(1) in TARGETS:
            name = re.search(r'(?:kernel_name|[{ ,]name) = "(\w+)"', line)
            found[f"{TARGETS[call.group(1)]}:{name.group(1) if name else '?'}"] += 1
    return dict(found)


def config(head_dim: int, **kw) -> ModelConfig:
    return ModelConfig(
        vocab_size=256, hidden_size=2 * head_dim, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=256, max_position_embeddings=256, attention_impl="pallas", **kw,
    )  # fmt: skip


def train_grad(cfg, batch=BATCH):
    def loss(params, ids):
        return jnp.mean(GPTNeoX(cfg).apply({"params": params}, ids) ** 2)

    return jax.grad(loss), (abstract_params(cfg), jax.ShapeDtypeStruct((batch, LENGTH), jnp.int32))


def decode_step(cfg, batch=BATCH):
    def step(params, cache, ids):
        return GPTNeoX(cfg).apply({"params": params}, ids, cache=cache).logits

    cache = jax.eval_shape(lambda: init_cache(cfg, batch, LENGTH))
    return step, (abstract_params(cfg), cache, jax.ShapeDtypeStruct((batch, 1), jnp.int32))


def quantized_forward(cfg, bits, batch=BATCH):
    qcfg = QuantConfig(bits=bits, group_size=64, matmul_impl="pallas")

    def forward(qparams, ids):
        return GPTNeoX(cfg.replace(attention_impl="xla")).apply({"params": qparams}, ids)

    ids = jax.ShapeDtypeStruct((batch, 16), jnp.int32)
    return forward, (abstract_quantized_params(cfg, qcfg), ids)


def on_device(tree, device):
    place = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=SingleDeviceSharding(device))
    return jax.tree.map(place, tree)


def programs():
    for d in HEAD_DIMS:
        yield f"train/d{d}", *train_grad(config(d))
        yield f"decode/d{d}", *decode_step(config(d))
    for bits in (8, 4):
        yield f"quantized/int{bits}", *quantized_forward(config(64), bits)
    # An explicit target wins over the placement.
    yield "flash/d64/interpret", *flash_grad(64, "interpret")
    yield "flash/32k", *flash_grad_32k()


def flash_grad_32k(length=32768):
    """Qwen3-1.7B's attention at 32k tokens (head_dim 128, grouped K/V heads, packed
    documents, bf16). Kernels that held a (batch, head)'s whole K/V in VMEM (8 MiB per
    operand here) failed to compile (CompileTimeScopedVmemOom); streamed K/V blocks fit."""

    def loss(q, k, v, seg):
        return jnp.sum(flash_attention(q, k, v, seg).astype(jnp.float32) ** 2)

    q = jax.ShapeDtypeStruct((1, length, 2, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, length, 1, 128), jnp.bfloat16)
    return jax.grad(loss, argnums=(0, 1, 2)), (
        q,
        kv,
        kv,
        jax.ShapeDtypeStruct((1, length), jnp.int32),
    )


def flash_grad(head_dim, kernel_target):
    def loss(q, k, v):
        return jnp.sum(flash_attention(q, k, v, kernel_target=kernel_target) ** 2)

    qkv = jax.ShapeDtypeStruct((BATCH, LENGTH, 2, head_dim), jnp.float32)
    return jax.grad(loss, argnums=(0, 1, 2)), (qkv,) * 3


def sharded(devices) -> dict:
    """Training and decoding on a 4-chip mesh, the batch of 8 split over fsdp: the
    kernels must run per chip (Mosaic refuses a kernel the partitioner would split)."""
    names = ("data", "stage", "fsdp", "expert", "tensor")  # create_mesh's axes
    mesh = Mesh(np.asarray(devices).reshape(1, 1, 4, 1, 1), names)
    replicated, split = (
        NamedSharding(mesh, PartitionSpec()),
        NamedSharding(mesh, PartitionSpec(("data", "fsdp"))),
    )
    report = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        for name, (fn, args) in {
            "train": train_grad(config(64), batch=8),
            "decode": decode_step(config(64), batch=8),
            "quantized": quantized_forward(config(64), 4, batch=8),
        }.items():
            *state, ids = args  # params (and cache) replicated, token ids split
            state = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), state
            )
            ids = jax.ShapeDtypeStruct(ids.shape, ids.dtype, sharding=split)
            text = jax.jit(fn).lower(*state, ids).as_text()
            report[name] = {"tpu": kernels(text), "kernel_batches": kernel_batches(text)}
    return report


def main(out_path: str) -> None:
    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    tpu = devices[0]
    report = {"host_backend": jax.default_backend(), "sharded": sharded(devices)}
    print("sharded", report["sharded"], file=sys.stderr, flush=True)
    for name, fn, args in programs():
        lowered = jax.jit(fn).lower(*on_device(args, tpu))
        compiled = "" if name.endswith("/interpret") else lowered.compile().as_text()
        cuda = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        report[name] = {
            "tpu": kernels(lowered.as_text()),
            "tpu_compiled_custom_calls": compiled.count('custom_call_target="tpu_custom_call"'),
            "tpu_while_loops": lowered.as_text().count("stablehlo.while"),
            "cuda": kernels(cuda),
        }
        print(name, report[name], file=sys.stderr, flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])

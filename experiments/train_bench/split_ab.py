"""The compiled train step (pythia-70m, fp32, layers unrolled) with the training attention
split in causal query blocks (``kernels.causal_split``) and without, alternating one step
each inside one process; wall and CPU seconds and the load beside. Not a test.

    python experiments/train_bench/split_ab.py 512
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(seq: int, rounds: int = 3) -> None:
    import flax.linen as nn
    import jax
    import numpy as np

    from configs.pretrain import get_config
    from neox_jax.kernels import causal_split
    from neox_jax.model import ModelConfig, abstract_params, init_params, param_logical_axes
    from neox_jax.parallel.mesh import create_mesh
    from neox_jax.parallel.rules import RULES, batch_sharding
    from neox_jax.training import step as step_lib
    from neox_jax.training.optimizer import optimizer_from_config
    from neox_jax.training.state import abstract_train_state, init_train_state

    c = get_config("pythia-70m")
    c.model.update(dtype="float32", remat="none", attention_impl="xla", scan_unroll=1000)
    c.data.update(global_batch_size=8, seq_len=seq)
    c.train.steps = 10_000
    mc = ModelConfig.from_dict(c.model.to_dict())
    mesh = create_mesh({"data": 1}, devices=jax.devices()[:1])
    tx, schedule = optimizer_from_config(c)
    _, sh = abstract_train_state(tx, abstract_params(mc), param_logical_axes(mc), mesh)
    tokens = np.random.default_rng(0).integers(0, mc.vocab_size, (8, seq + 1), dtype=np.int32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        batch = {"tokens": jax.device_put(tokens, batch_sharding(mesh))}
        compiled, states = {}, {}
        for mode in ("reference", "split"):
            causal_split.MIN_LENGTH = 10**9 if mode == "reference" else 2
            step = step_lib.build_train_step(
                c, mc, tx, schedule, sh, {"tokens": batch_sharding(mesh)}
            )
            states[mode] = init_train_state(lambda r: init_params(mc, r), tx, sh, 0)
            compiled[mode] = step.lower(states[mode], batch).compile()
            states[mode], m = compiled[mode](states[mode], batch)  # warm-up
            jax.block_until_ready(m["loss"])
        for r in range(rounds):
            for mode in ("reference", "split"):
                w, cpu = time.perf_counter(), time.process_time()
                states[mode], m = compiled[mode](states[mode], batch)
                jax.block_until_ready(m["loss"])
                w, cpu = time.perf_counter() - w, time.process_time() - cpu
                loss, load = float(m["loss"]), os.getloadavg()[0]
                print(f"round {r} {mode:9s} wall {w:6.2f} s, CPU {cpu:6.2f} s, "
                      f"loss {loss:.7f}, load {load:.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 512)

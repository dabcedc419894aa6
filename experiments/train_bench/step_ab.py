"""Compiled train steps of several configs (pythia-70m, fp32, layers unrolled) alternating
one step each inside one process; wall and CPU seconds, the loss and the load beside.
A mode is ``name:field=value,...`` overriding the training config
(e.g. ``scanned:model.scan_unroll=1``); a field ``xla.<option>`` is an XLA compiler option of
that step alone (``compile(compiler_options=...)``, e.g.
``xla.xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED``). Not a test.

    python experiments/train_bench/step_ab.py --seq=256 unrolled: scanned:model.scan_unroll=1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _parse(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _config(seq: int, overrides: str):
    """The training config of a mode and its XLA compiler options."""
    from configs.pretrain import get_config

    c = get_config("pythia-70m")
    c.model.update(dtype="float32", remat="none", attention_impl="xla", scan_unroll=1000)
    c.data.update(global_batch_size=8, seq_len=seq)
    c.train.steps = 10_000
    options = {}
    for item in filter(None, overrides.split(",")):
        field, value = item.split("=", 1)
        section, name = field.split(".", 1)
        if section == "xla":
            options[name] = _parse(value)
        else:
            c[section][name] = _parse(value)
    return c, options


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="")
    p.add_argument("modes", nargs="+")
    args = p.parse_args()
    import flax.linen as nn
    import jax
    import numpy as np

    from neox_jax.model import ModelConfig, abstract_params, init_params, param_logical_axes
    from neox_jax.parallel.mesh import create_mesh
    from neox_jax.parallel.rules import RULES, batch_sharding
    from neox_jax.training import step as step_lib
    from neox_jax.training.optimizer import optimizer_from_config
    from neox_jax.training.state import abstract_train_state, init_train_state

    mesh = create_mesh({"data": 1}, devices=jax.devices()[:1])
    tokens = np.random.default_rng(0).integers(0, 50304, (8, args.seq + 1), dtype=np.int32)
    compiled, states, rows = {}, {}, []
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        batch = {"tokens": jax.device_put(tokens, batch_sharding(mesh))}
        for mode in args.modes:
            name, overrides = mode.split(":", 1)
            c, options = _config(args.seq, overrides)
            mc = ModelConfig.from_dict(c.model.to_dict())
            tx, schedule = optimizer_from_config(c)
            _, sh = abstract_train_state(tx, abstract_params(mc), param_logical_axes(mc), mesh)
            step = step_lib.build_train_step(
                c, mc, tx, schedule, sh, {"tokens": batch_sharding(mesh)}
            )
            states[name] = init_train_state(lambda r, mc=mc: init_params(mc, r), tx, sh, 0)
            compiled[name] = step.lower(states[name], batch).compile(options or None)
            states[name], m = compiled[name](states[name], batch)  # warm-up
            jax.block_until_ready(m["loss"])
        for r in range(args.rounds):
            for name in compiled:
                w, cpu = time.perf_counter(), time.process_time()
                states[name], m = compiled[name](states[name], batch)
                jax.block_until_ready(m["loss"])
                w, cpu = time.perf_counter() - w, time.process_time() - cpu
                row = dict(round=r, mode=name, wall_s=w, cpu_s=cpu, loss=float(m["loss"]),
                           load=os.getloadavg()[0])  # fmt: skip
                rows.append(row)
                print(f"round {r} {name:12s} wall {w:6.2f} s, CPU {cpu:6.2f} s, "
                      f"loss {row['loss']:.7f}, load {row['load']:.2f}", flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"seq": args.seq, "modes": args.modes,
                                              "rows": rows}, indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()

"""experiments/op_profile.py: FLOPs and bytes per HLO instruction from the optimized HLO.

Checked against XLA's own whole-program ``cost_analysis()`` and closed forms."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import op_profile  # noqa: E402


def test_op_costs_add_up_to_xla_cost_analysis():
    def f(a, b, c):
        return jnp.tanh(a @ b).sum(0) + jnp.exp(c)

    args = (jnp.ones((64, 32)), jnp.ones((32, 16)), jnp.ones((16,)))
    compiled = jax.jit(f).lower(*args).compile()
    costs = op_profile.op_costs(compiled.as_text())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    total = sum(c["flops"] for c in costs.values())
    # Same counting rules as HloCostAnalysis (dots, elementwise, reductions); 1% leaves
    # room for XLA counting an op we do not (a compare in a reducer, say).
    assert abs(total - cost["flops"]) <= 0.01 * cost["flops"]
    dots = [c for c in costs.values() if "dot_general" in c["what"]]
    assert sum(c["flops"] for c in dots) == 2 * 64 * 32 * 16  # 2 M N K
    # A fusion moves at least its operands and result once: here the dot's.
    assert max(c["bytes"] for c in dots) >= 4 * (64 * 32 + 32 * 16 + 64 * 16)


def test_while_bodies_are_listed_once_per_instruction():
    def f(x):
        return jax.lax.fori_loop(0, 5, lambda i, y: jnp.sin(y) @ y, x)

    compiled = jax.jit(f).lower(jnp.ones((8, 8))).compile()
    costs = op_profile.op_costs(compiled.as_text())
    dots = [c for c in costs.values() if c["flops"] >= 2 * 8**3]
    assert len(dots) == 1  # the body's product, counted per call by the trace
    assert all(c["opcode"] != "while" for c in costs.values())

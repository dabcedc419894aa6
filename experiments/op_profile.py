"""Op-by-op profile of a compiled XLA program and of a PyTorch step, as tables.

Shared by ``experiments/train_bench`` and ``experiments/decode_bench`` (``--profile``).

XLA side, from XLA's own data:
  * time: the ``jax.profiler`` trace of the program running, with
    ``--xla_cpu_enable_xprof_traceme=true`` so XLA:CPU emits one event per executed HLO
    instruction (thunk), named like the instruction (``fusion.12``, ``dot.3``);
  * FLOPs and bytes: the optimized HLO of the same compiled program
    (``compiled.as_text()``), per instruction. FLOPs follow ``HloCostAnalysis``:
    ``2 * prod(out) * prod(contracted)`` per dot, one per output element of every
    arithmetic elementwise op (transcendentals not counted), one per input element of
    a reduce;
    a fusion counts what it calls. Bytes are what the op must move at least: its
    operands plus its result (a fusion reads each operand once; an in-place
    dynamic-update-slice moves only the update, a slice only what it returns). The sum of the FLOPs
    is checked against ``compiled.cost_analysis()["flops"]`` in the report.

Instructions inside a ``while`` body (the scanned layers) run once per iteration; the
trace counts the calls, so FLOPs and bytes are multiplied by them.

PyTorch side: ``torch.profiler`` over the same step, ``key_averages()`` by op, with
FLOPs where torch counts them (matmuls).
"""

from __future__ import annotations

import collections
import gzip
import json
import math
import re
import tempfile
import time
from pathlib import Path

XPROF_FLAG = "--xla_cpu_enable_xprof_traceme=true"

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}  # fmt: skip
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+) .*\{\s*$")
# Ops that move no data or only steer others: not rows of the table.
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while",
         "call", "conditional", "after-all", "partition-id", "replica-id"}  # fmt: skip
# One FLOP per output element (HloCostAnalysis counts transcendentals - exp, log, tanh,
# erf, sqrt... - separately, and so do we: they are not in the FLOPs).
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "negate",
                "abs", "compare", "select", "and", "or", "xor", "not", "clamp", "floor",
                "ceil", "sign", "remainder", "round-nearest-even", "round-nearest-afz",
                "is-finite"}  # fmt: skip


def _shapes(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(type_text)
    ]


def _nbytes(shapes) -> int:
    return sum(_DTYPE_BYTES.get(dt, 4) * math.prod(dims) for dt, dims in shapes)


def _operands(args: str) -> list[str]:
    """Names of the operands in the text after ``opcode(`` (up to the closing paren)."""
    depth, end = 1, len(args)
    for i, ch in enumerate(args):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            end = i
            break
    return re.findall(r"%([\w.\-]+)", args[:end])


def parse_hlo(text: str) -> dict[str, dict]:
    """Every instruction of an optimized HLO module: ``{name: info}``.

    ``info``: ``opcode``, ``shapes`` (result), ``operands`` (names), ``calls`` (the
    computations it runs), ``dims`` (lhs contracting dims of a dot), ``what`` (the
    JAX op it came from, from the metadata), ``computation``.
    """
    ops, comp = {}, None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and " = " not in line.split("{")[0]:
            comp = m.group(1)
            continue
        m = _INSTR.match(line)
        if not m or comp is None:
            continue
        name, type_text, opcode, rest = m.groups()
        called = re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", rest)
        for group in re.findall(r"branch_computations=\{([^}]*)\}", rest):
            called += re.findall(r"%([\w.\-]+)", group)
        dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        what = re.search(r'op_name="([^"]*)"', rest)
        ops[name] = {
            "opcode": opcode,
            "shapes": _shapes(type_text),
            "operands": _operands(rest),
            "calls": called,
            "dims": [int(d) for d in dims.group(1).split(",") if d] if dims else [],
            "what": what.group(1) if what else "",
            "computation": comp,
        }
    return ops


def _flops(name: str, ops: dict, by_comp: dict) -> float:
    op = ops[name]
    out = sum(math.prod(d) for _, d in op["shapes"][:1])
    code = op["opcode"]
    if code == "dot":
        lhs = ops.get(op["operands"][0], {}).get("shapes", [("f32", ())])[0][1]
        return 2.0 * out * math.prod(lhs[d] for d in op["dims"] if d < len(lhs))
    if code == "fusion":
        return sum(_flops(n, ops, by_comp) for c in op["calls"] for n in by_comp.get(c, []))
    if code in ("reduce", "reduce-window"):
        src = ops.get(op["operands"][0], {}).get("shapes", [])
        return float(sum(math.prod(d) for _, d in src[:1]))
    return float(out) if code in _ELEMENTWISE else 0.0


def op_costs(hlo_text: str) -> dict[str, dict]:
    """FLOPs and bytes of every instruction the runtime executes (not those inside a
    fusion or a reducer), keyed by instruction name (the trace's event names)."""
    ops = parse_hlo(hlo_text)
    by_comp = collections.defaultdict(list)
    for name, op in ops.items():
        by_comp[op["computation"]].append(name)
    inner = set()  # computations run inside an op: fusions' and reducers' bodies
    for op in ops.values():
        if op["opcode"] not in ("while", "call", "conditional"):
            inner.update(op["calls"])
    costs = {}
    for name, op in ops.items():
        if op["computation"] in inner or op["opcode"] in _FREE:
            continue
        operand_shapes = [s for o in op["operands"] for s in ops.get(o, {}).get("shapes", [])]
        nbytes = _nbytes(operand_shapes) + _nbytes(op["shapes"])
        if "dynamic-update-slice" in name:  # in place: reads and writes only the update
            nbytes = 2 * _nbytes(operand_shapes[1:])
        elif "dynamic-slice" in name or op["opcode"] in ("slice", "dynamic-slice"):
            nbytes = 2 * _nbytes(op["shapes"])  # reads only what it returns
        costs[name] = {
            "opcode": op["opcode"],
            "flops": _flops(name, ops, by_comp),
            "bytes": nbytes,
            "shape": " ".join(f"{dt}[{','.join(map(str, d))}]" for dt, d in op["shapes"][:2]),
            "what": _short(op["what"]),
        }
    return costs


def _short(op_name: str) -> str:
    """``jit(step)/jvp(GPTNeoX)/layers/.../dot_general`` -> its last three parts."""
    parts = [p for p in op_name.split("/") if p]
    return "/".join(parts[-3:])


# ---------------------------------------------------------------- the trace
def trace_op_times(run, names, steps: int) -> tuple[dict, float]:
    """Run ``run()`` ``steps`` times under ``jax.profiler`` and return
    ``({instruction: (seconds per step, calls per step)}, wall seconds per step)`` for
    the trace events named like an instruction in ``names``."""
    import jax

    logdir = tempfile.mkdtemp(prefix="neox_op_profile_")
    jax.profiler.start_trace(logdir, create_perfetto_trace=True)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    wall = (time.perf_counter() - start) / steps
    jax.profiler.stop_trace()
    events = []  # one file per host (and per run); a GPU run may write several
    for trace in Path(logdir).glob("plugins/profile/*/*.trace.json.gz"):
        with gzip.open(trace) as f:
            events += json.load(f)["traceEvents"]
    # XLA:CPU names its per-thunk events after the instruction; on a GPU the kernels'
    # events carry it as ``args.hlo_op`` (their names are kernel names), and those are
    # the device time, so they win when present. Not yet checked on a GPU.
    spans = [e for e in events if e.get("ph") == "X"]
    device = [(e.get("args") or {}).get("hlo_op") for e in spans]
    use_device = any(op in names for op in device)
    seconds, calls = collections.Counter(), collections.Counter()
    for e, op in zip(spans, device, strict=True):
        name = op if use_device else e.get("name")
        if name in names:
            seconds[name] += e.get("dur", 0) / 1e6 / steps
            calls[name] += 1 / steps
    return {n: (seconds[n], calls[n]) for n in seconds}, wall


def xla_op_table(compiled, run, steps: int = 2, per: int = 1) -> dict:
    """The per-op table of ``compiled`` while ``run()`` (one step, blocking) executes it.

    ``per``: report per ``1/per`` of a call (a decode call of 128 tokens with
    ``per=128`` gives the table per token).

    Returns ``{"step_wall_s", "op_time_s", "xla_flops_total", "table_flops_total",
    "rows": [{op, opcode, what, shape, calls, s, flops, bytes, gflops, gbps, share}]}``,
    rows sorted by time. ``share`` is the op's time over the step's wall time (ops on
    different threads overlap, so shares can add up to more than 1).
    """
    costs = op_costs(compiled.as_text())
    times, wall = trace_op_times(run, set(costs), steps)
    wall /= per
    rows = []
    for name, (seconds, calls) in times.items():
        seconds, calls, c = seconds / per, calls / per, costs[name]
        flops, nbytes = c["flops"] * calls, c["bytes"] * calls
        rows.append({
            "op": name, "opcode": c["opcode"], "what": c["what"], "shape": c["shape"],
            "calls": round(calls, 2), "s": seconds, "flops": flops, "bytes": nbytes,
            "gflops": flops / seconds / 1e9 if seconds else 0.0,
            "gbps": nbytes / seconds / 1e9 if seconds else 0.0,
            "share": seconds / wall,
        })  # fmt: skip
    rows.sort(key=lambda r: -r["s"])
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "step_wall_s": wall,
        "op_time_s": sum(r["s"] for r in rows),
        "xla_flops_total": float(cost.get("flops", 0.0)),
        "table_flops_total": sum(r["flops"] for r in rows),
        "categories_s": categories(rows),
        "rows": rows,
    }


def categories(rows) -> dict[str, float]:
    """Seconds per step by kind: matmuls (a dot, or a fusion doing mostly dot FLOPs),
    copies/transposes, other fusions (elementwise, reductions), the rest."""
    out = collections.Counter()
    for r in rows:
        if r["opcode"] == "dot" or ("dot_general" in r["what"] and r["gflops"] > 5):
            kind = "matmul"
        elif r["opcode"] in ("copy", "transpose") or r["op"].startswith(("copy", "transpose")):
            kind = "copy/transpose"
        elif r["opcode"] == "fusion":
            kind = "fusion (elementwise/reduce)"
        else:
            kind = r["opcode"]
        out[kind] += r["s"]
    return dict(out.most_common())


def xla_markdown(profile: dict, top: int = 20) -> str:
    """The table as markdown: the ``top`` ops by time, then the totals."""
    lines = [
        "| op | what | shape | calls | ms | GFLOP | MB | GFLOP/s | GB/s | share |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in profile["rows"][:top]:
        lines.append(
            f"| {r['op']} | `{r['what']}` | {r['shape']} | {r['calls']:.3g} | {r['s'] * 1e3:.2f} "
            f"| {r['flops'] / 1e9:.3f} | {r['bytes'] / 1e6:.1f} | {r['gflops']:.1f} "
            f"| {r['gbps']:.1f} | {r['share']:.1%} |"
        )
    cats = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in profile["categories_s"].items())
    lines += [
        "",
        f"Step {profile['step_wall_s'] * 1e3:.1f} ms wall; ops {profile['op_time_s'] * 1e3:.1f} ms "
        f"({cats}); FLOPs in the table {profile['table_flops_total'] / 1e9:.2f} G, "
        f"XLA cost analysis {profile['xla_flops_total'] / 1e9:.2f} G (a loop body counted once).",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ PyTorch
def torch_op_table(step, steps: int = 2, top: int = 20, per: int = 1) -> dict:
    """``torch.profiler`` over ``steps`` calls of ``step()``: rows of
    ``key_averages()`` by self CPU time, per step (per ``1/per`` of one, as in
    ``xla_op_table``), with FLOPs where torch counts them."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities, with_flops=True) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - start) / steps / per
    rows = []
    for e in prof.key_averages():
        s = e.self_cpu_time_total / 1e6 / steps / per
        flops = (e.flops or 0) / steps / per
        rows.append({
            "op": e.key, "calls": e.count / steps / per, "s": s, "flops": flops,
            "gflops": flops / s / 1e9 if s and flops else 0.0, "share": s / wall,
        })  # fmt: skip
    rows.sort(key=lambda r: -r["s"])
    return {"step_wall_s": wall, "op_time_s": sum(r["s"] for r in rows), "rows": rows[:top]}


def torch_markdown(profile: dict) -> str:
    lines = [
        "| op (self time) | calls | ms | GFLOP | GFLOP/s | share |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in profile["rows"]:
        lines.append(
            f"| {r['op']} | {r['calls']:.3g} | {r['s'] * 1e3:.2f} | {r['flops'] / 1e9:.3f} "
            f"| {r['gflops']:.1f} | {r['share']:.1%} |"
        )
    lines += ["", f"Step {profile['step_wall_s'] * 1e3:.1f} ms wall (under the profiler)."]
    return "\n".join(lines) + "\n"


def dump_trace_names(path: str) -> None:
    """Write what a trace calls its events beside the optimized HLO's instruction names,
    for a small jitted program on the default device (how the table matches them on a
    new backend)."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def f(x, w):
        return jax.nn.softmax((x @ w).astype(jnp.float32), axis=-1).sum()

    x = jnp.ones((512, 1024), jnp.bfloat16)
    w = jnp.ones((1024, 2048), jnp.bfloat16)
    compiled = f.lower(x, w).compile()
    compiled(x, w).block_until_ready()
    logdir = tempfile.mkdtemp(prefix="neox_trace_names_")
    jax.profiler.start_trace(logdir, create_perfetto_trace=True)
    for _ in range(2):
        compiled(x, w).block_until_ready()
    jax.profiler.stop_trace()
    events = []
    for trace in Path(logdir).glob("plugins/profile/*/*.trace.json.gz"):
        with gzip.open(trace) as fh:
            events += json.load(fh)["traceEvents"]
    names = sorted(op_costs(compiled.as_text()))
    threads = {
        (e.get("pid"), e.get("tid")): (e.get("args") or {}).get("name")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }

    def wanted(e):  # the program's own events, not the profiler's mutexes
        thread = str(threads.get((e.get("pid"), e.get("tid"))))
        hlo = any("hlo" in k for k in e.get("args") or {})
        return e.get("name") in names or hlo or "Stream" in thread or "GPU" in thread

    spans = [e for e in events if e.get("ph") == "X" and wanted(e)]
    report = {
        "backend": jax.default_backend(),
        "hlo_instructions": names,
        "events": [
            {
                "name": e.get("name"),
                "args": e.get("args"),
                "dur": e.get("dur"),
                "thread": threads.get((e.get("pid"), e.get("tid"))),
            }
            for e in spans[:300]
        ],  # fmt: skip
    }
    Path(path).write_text(json.dumps(report, indent=1, default=str))
    print(f"{len(spans)} events; {len(report['hlo_instructions'])} HLO instructions -> {path}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Debug aid of the per-op tables.")
    parser.add_argument("--dump_trace_names", required=True, help="JSON to write")
    dump_trace_names(parser.parse_args().dump_trace_names)

"""Which XLA:CPU thread runs each op of a decode loop, and how often both are busy.

``op_profile.xla_op_table`` sums each op's time; on two cores that cannot say whether
a slow op kept one core idle. This reads the same ``jax.profiler`` trace (one event
per executed HLO instruction with ``--xla_cpu_enable_xprof_traceme=true``) by thread:
per step, each thread's busy time, the time both were busy at once, and for each op
the time it ran while no other op ran (``alone``: the other core idle).
"""

from __future__ import annotations

import bisect
import collections
import gzip
import json
import tempfile
from pathlib import Path


def _events(run, steps: int) -> list[dict]:
    import jax

    logdir = tempfile.mkdtemp(prefix="neox_thread_use_")
    jax.profiler.start_trace(logdir, create_perfetto_trace=True)
    for _ in range(steps):
        run()
    jax.profiler.stop_trace()
    events = []
    for trace in Path(logdir).glob("plugins/profile/*/*.trace.json.gz"):
        with gzip.open(trace) as fh:
            events += json.load(fh)["traceEvents"]
    return events


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def _covered(start: float, end: float, spans: list[tuple[float, float]], starts) -> float:
    """Time of ``[start, end)`` covered by ``spans`` (disjoint, sorted; ``starts`` theirs)."""
    total, i = 0.0, max(0, bisect.bisect_right(starts, start) - 1)
    while i < len(spans) and spans[i][0] < end:
        total += max(0.0, min(end, spans[i][1]) - max(start, spans[i][0]))
        i += 1
    return total


def thread_use(run, names: set[str], steps: int = 1, per: int = 1, top: int = 15) -> dict:
    """Per-thread busy time of the HLO ops in ``names`` while ``run()`` executes
    ``steps`` times; times per ``1/per`` of a run (per token with ``per`` = tokens).

    Returns ``{"threads": {tid: busy_s}, "both_busy_s", "any_busy_s",
    "ops": [{op, s, alone_s, threads}]}`` (``alone_s``: no op of this program ran on
    another thread meanwhile), ops sorted by time, the ``top`` first."""
    spans = [
        (e["tid"], e["ts"], e["ts"] + e.get("dur", 0), e["name"])
        for e in _events(run, steps)
        if e.get("ph") == "X" and e.get("name") in names
    ]
    scale = 1e-6 / steps / per  # trace microseconds -> seconds per step
    by_tid = collections.defaultdict(list)
    for tid, start, end, _ in spans:
        by_tid[tid].append((start, end))
    unions = {tid: _union(s) for tid, s in by_tid.items()}
    busy = {tid: sum(b - a for a, b in u) for tid, u in unions.items()}
    any_busy = _union([s for u in unions.values() for s in u])
    both = sum(busy.values()) - sum(b - a for a, b in any_busy)
    ops = collections.defaultdict(lambda: {"s": 0.0, "alone_s": 0.0, "threads": set()})
    others = {tid: _union([s for t, u in unions.items() if t != tid for s in u]) for tid in unions}
    starts = {tid: [a for a, _ in u] for tid, u in others.items()}
    for tid, start, end, name in spans:
        row = ops[name]
        row["s"] += (end - start) * scale
        covered = _covered(start, end, others[tid], starts[tid])
        row["alone_s"] += (end - start - covered) * scale
        row["threads"].add(tid)
    rows = sorted(
        ({"op": n, **r, "threads": len(r["threads"])} for n, r in ops.items()),
        key=lambda r: -r["s"],
    )
    return {
        "threads": {str(t): b * scale for t, b in busy.items()},
        "both_busy_s": both * scale,
        "any_busy_s": sum(b - a for a, b in any_busy) * scale,
        "ops": rows[:top],
    }


def markdown(use: dict) -> str:
    threads = ", ".join(f"{t}: {s * 1e3:.1f} ms" for t, s in use["threads"].items())
    lines = [
        f"Busy per thread {threads}; some op running {use['any_busy_s'] * 1e3:.1f} ms, "
        f"both threads busy {use['both_busy_s'] * 1e3:.1f} ms per step.",
        "",
        "| op | ms | ms with the other thread idle | threads |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in use["ops"]:
        ms, alone = r["s"] * 1e3, r["alone_s"] * 1e3
        lines.append(f"| {r['op']} | {ms:.2f} | {alone:.2f} | {r['threads']} |")
    return "\n".join(lines) + "\n"

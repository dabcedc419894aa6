"""Break a py-spy raw (collapsed-stack) profile of the server into where time goes.

  python experiments/serving/profile_summary.py PROFILE.txt [--top=25]

Per thread: samples, and for each of the named phases the share of samples whose stack
passes through it (the first phase matched from the leaf up counts), then the leaf
functions that take the most samples.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

# (name, pattern on a frame): the first matching frame from the leaf upwards names the
# phase of a sample.
PHASES = [
    ("engine: wait for work (lock)", r"Engine\._run .*engine\.py:\d+\)$"),
    ("engine: device_get (wait for the step)", r"device_get|block_until_ready|_value"),
    ("engine: decode call (dispatch)", r"slots\.py.*generate|generate \(.*slots|_one_step"),
    ("engine: prefill", r"prefill"),
    ("engine: insert / activate", r"insert|_activate|activate"),
    ("engine: text (TextTracker)", r"TextTracker|text\.py"),
    ("engine: deliver (events)", r"_deliver|Delivery"),
    ("server: asyncio wait (select)", r"select \(selectors|_run_once.*base_events.*\)$"),
    ("server: logprobs / token text", r"logprobs_obj|token_str"),
    ("server: json / SSE", r"json|sse"),
    ("server: starlette / uvicorn", r"starlette|uvicorn|h11|anyio"),
    ("server: asyncio", r"asyncio"),
]


def phase(frames: list[str]) -> str:
    for f in reversed(frames):
        for name, pat in PHASES:
            if re.search(pat, f):
                return name
    return "other"


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    by_thread = collections.defaultdict(collections.Counter)
    leaves = collections.defaultdict(collections.Counter)
    for line in Path(args.profile).read_text().splitlines():
        stack, _, count = line.rstrip("\n").rpartition(" ")
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        name = thread.split(": ", 1)[-1]
        by_thread[name][phase(frames)] += int(count)
        leaves[name][frames[-1] if frames else "?"] += int(count)
    for name, phases in by_thread.items():
        total = sum(phases.values())
        print(f"\n== {name}: {total} samples")
        for ph, n in phases.most_common():
            print(f"  {100 * n / total:5.1f}%  {ph}")
        print("  top leaves:")
        for leaf, n in leaves[name].most_common(args.top):
            print(f"    {100 * n / total:5.1f}%  {leaf}")


if __name__ == "__main__":
    main()

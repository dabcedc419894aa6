"""Where a py-spy profile of the test suite spends its Python time.

Record the whole suite, every process it starts included, at 10 samples a second
(``pip install py-spy``; ``--native`` costs too much here: the sampler fell behind), then
summarize:

    py-spy record --subprocesses --rate 10 --format raw --output /tmp/suite.txt -- \\
        python -m pytest -n 2 -q -p no:cacheprovider
    python experiments/suite_profile/summarize.py /tmp/suite.txt --json=summary.json

Each sample is one Python thread's stack; a stack is put in the first activity below
whose frames it contains (so XLA's compile, which JAX calls after tracing and lowering,
is not counted as either), and under the test file on its stack (a test's own frames, or
the file named on a subprocess's command line; "?" for the command-line runs the tests
start). Threads in native code with no Python frame (XLA's own thread pools running a
program) are not sampled, so this is the Python side: tracing, lowering, imports, and
what tests and commands do in Python.
"""

from __future__ import annotations

import argparse
import collections
import json
import re

ACTIVITIES = [  # (name, frames that mark it), first match wins
    ("import", ["_find_and_load"]),
    ("xla_compile", ["backend_compile", "compile_or_get_cached"]),
    ("trace", ["trace_to_jaxpr", "_create_pjit_jaxpr", "trace_to_subjaxpr"]),
    ("lower", ["lower_sharding_computation", "jaxpr_to_mlir", "lower_jaxpr_to_module"]),
    ("lm_eval_task_index", ["build (lm_eval/tasks/_index.py"]),
    ("jax_clear_caches", ["clear_all_caches (jax/"]),
]
TEST_FRAME = re.compile(r"\((test_[a-z0-9_]+\.py):\d+\)")
TEST_PROCESS = re.compile(r'process \d+:"[^"]*?(test_[a-z0-9_]+\.py)')
USER_FRAME = re.compile(r"([^;]*) \((neox_jax/[^:]+):\d+\)")
# Flax's nn.scan default: a partial-evaluation trace of the layer body before the scan.
FLAX_SCAN_CHECK = ("scan_fn (flax/core/axes_scan.py", "trace_to_jaxpr_nounits")
EVAL_SHAPE_INIT = ("abstract_params (neox_jax/model/transformer.py", "param_logical_axes (neox_jax")


def summarize(path: str, top: int = 30) -> dict:
    activity, files, callers = collections.Counter(), collections.Counter(), collections.Counter()
    by_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total = flax_check = eval_shape_init = 0
    with open(path, errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            kind = next((a for a, keys in ACTIVITIES if any(k in stack for k in keys)), "other")
            activity[kind] += n
            flax_check += n * all(k in stack for k in FLAX_SCAN_CHECK)
            eval_shape_init += n * any(k in stack for k in EVAL_SHAPE_INIT)
            m = TEST_FRAME.search(stack) or TEST_PROCESS.search(stack)
            name = m.group(1) if m else "?"
            files[name] += n
            by_file[name][kind] += n
            if kind in ("trace", "lower"):
                # The innermost neox_jax frame above JAX: what asked for the program.
                head = stack.split("trace_to_jaxpr")[0].split("lower_sharding_computation")[0]
                frames = USER_FRAME.findall(head)
                where = f"{frames[-1][0].strip()} ({frames[-1][1]})" if frames else None
                callers[where or "(not neox_jax code)"] += n
    share = {k: round(v / total, 4) for k, v in activity.most_common()}
    return {
        "samples": total,
        "activity_share": share,
        "flax_scan_invariance_trace_share": round(flax_check / total, 4),
        "abstract_params_and_axes_share": round(eval_shape_init / total, 4),
        "trace_lower_callers": {k: round(v / total, 4) for k, v in callers.most_common(top)},
        "files_cpu_s": {
            k: {"s": round(v / 10, 1), **{a: round(c / 10, 1) for a, c in by_file[k].items()}}
            for k, v in files.most_common(top)
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--json", default="")
    args = p.parse_args()
    out = summarize(args.profile, args.top)
    print(f"{out['samples']} samples")
    for k, v in out["activity_share"].items():
        print(f"  {k:20s} {100 * v:5.1f} %")
    flax, shapes = out["flax_scan_invariance_trace_share"], out["abstract_params_and_axes_share"]
    print(f"  of all samples: Flax's scan invariance trace {100 * flax:.1f} %, "
          f"abstract_params / param_logical_axes {100 * shapes:.1f} %")  # fmt: skip
    print("tracing and lowering asked for by:")
    for k, v in out["trace_lower_callers"].items():
        print(f"  {100 * v:5.1f} %  {k}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()

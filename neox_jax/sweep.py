"""Run a grid (or a random search) of config overrides through the trainer; one table.

    python -m neox_jax.sweep --config.train_config=configs/pretrain.py:tiny \\
        --workdir=/tmp/sweep --config.parallel=2 \\
        --config.grid="optimizer.lr=1e-3,3e-3;model.num_hidden_layers=2,4" \\
        -- --config.train.steps=40
    python -m neox_jax.sweep --config.train_config=configs/pretrain.py:tiny \\
        --workdir=/tmp/search --config.random=8 \\
        --config.grid="optimizer.lr=loguniform(1e-4,1e-2);model.num_hidden_layers=2,4"

The config is ``configs/sweep.py`` (the default ``--config``); every field can be
overridden. The old spelling (``--config=configs/pretrain.py:tiny --grid=...
--parallel=2 --random=8 --seed=1``) still works and prints the new one.

``grid`` is ``key=v1,v2,...`` axes separated by ``;``; the sweep runs their cross
product. With ``random=K`` it runs K points drawn (by ``seed``) from the axes
instead: a list is a uniform choice, ``uniform(a,b)``, ``loguniform(a,b)`` and
``randint(a,b)`` (both ends included) are ranges. Arguments after ``--`` go to every
run unchanged, as do those in ``train_args`` (a grid key wins over the same key there).
Each run is ``python -m neox_jax.train`` in its own process and its own directory
``<workdir>/<key=value,...>``, so it checkpoints and resumes like any run: running the
sweep again finishes interrupted runs and leaves finished ones alone. ``parallel=N`` runs
N at a time (give each its own devices, e.g. with ``CUDA_VISIBLE_DEVICES``, on
accelerators).

Runs share one prepared corpus and tokenizer (``data.corpus_dir=<workdir>/data`` unless
set): the first run prepares it alone, the others reuse it. The final train and eval
metrics of every run (from its ``metrics.jsonl``) go to ``<workdir>/sweep.json`` and
``<workdir>/sweep.md``.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from neox_jax import cli
from neox_jax.errors import UserError

_RANGE = re.compile(r"^(uniform|loguniform|randint)\((.+)\)$")
# Metrics of the last logged train / eval record, in table order.
TRAIN_KEYS = ("loss", "grad_norm", "tokens_per_sec", "mfu")
EVAL_KEYS = ("eval_loss", "eval_perplexity")


def parse_grid(text: str) -> list[tuple[str, list[str]]]:
    """``"a.b=1,2;c=x"`` -> ``[("a.b", ["1", "2"]), ("c", ["x"])]``.

    Raises:
      ValueError: an axis without ``=`` or values, or a key given twice.
    """
    axes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, values = part.partition("=")
        key = key.strip().removeprefix("--config.").removeprefix("config.")
        if _RANGE.match(values.strip()):
            vals = [values.strip()]  # a range for random search: one value, kept whole
        else:
            vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise ValueError(f"Bad grid axis {part!r}; write key=value1,value2 (axes split by ;).")
        if key in dict(axes):
            raise ValueError(f"Grid key {key!r} appears twice.")
        axes.append((key, vals))
    if not axes:
        raise ValueError("the grid is empty; e.g. --config.grid='optimizer.lr=1e-3,3e-3'.")
    return axes


def grid_points(axes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """The cross product of the axes, first axis slowest."""
    keys = [k for k, _ in axes]
    return [
        dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in axes))
    ]


def _draw(value: str, rng: random.Random) -> str:
    match = _RANGE.match(value)
    if match is None:
        return value
    kind, args = match.groups()
    try:
        lo, hi = (float(a) for a in args.split(","))
    except ValueError:
        raise ValueError(f"Bad range {value!r}; write {kind}(low,high).") from None
    if kind == "randint":
        return str(rng.randint(int(lo), int(hi)))
    if kind == "loguniform":
        if lo <= 0 or hi <= 0:
            raise ValueError(f"Bad range {value!r}: loguniform needs positive ends.")
        return f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.4g}"
    return f"{rng.uniform(lo, hi):.4g}"


def random_points(axes: list[tuple[str, list[str]]], count: int, seed: int) -> list[dict]:
    """``count`` points drawn from the axes (choice from lists, ranges sampled)."""
    rng = random.Random(seed)
    return [{k: _draw(rng.choice(v), rng) for k, v in axes} for _ in range(count)]


def run_name(point: dict[str, str]) -> str:
    """A directory name for a grid point: ``lr=0.001,num_hidden_layers=2``."""
    name = ",".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)


def train_command(config: str, workdir: Path, point: dict[str, str], extra: list[str]) -> list:
    """The trainer command of one run: fixed flags, minus any the grid sets, then the grid."""
    if any(_RANGE.match(v) for v in point.values()):
        raise ValueError("Ranges such as loguniform(a,b) need --config.random=K (random search).")
    grid_flags = {f"--config.{k}" for k in point}
    kept = [a for a in extra if a.split("=", 1)[0] not in grid_flags]
    return [
        sys.executable,
        "-m",
        "neox_jax.train",
        f"--config={config}",
        f"--workdir={workdir}",
        *kept,
        *[f"--config.{k}={v}" for k, v in point.items()],
    ]


def final_metrics(workdir: Path) -> dict:
    """The last train and eval values (and the last step) logged in ``metrics.jsonl``."""
    out: dict = {}
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        keys = EVAL_KEYS if rec.get("split") == "eval" else TRAIN_KEYS
        out.update({k: rec[k] for k in keys if k in rec})
        out["step"] = max(out.get("step", 0), rec["step"])
    return out


def markdown(rows: list[dict], keys: list[str]) -> str:
    """One row per run: its directory, grid values, status, final metrics."""
    cols = ["run", *keys, "status", "step", *TRAIN_KEYS, *EVAL_KEYS, "wall_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for row in rows:
        cells = []
        for c in cols:
            v = row.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    done = [r for r in rows if isinstance(r.get("eval_loss", r.get("loss")), float)]
    if done:
        metric = "eval_loss" if all("eval_loss" in r for r in done) else "loss"
        best = min(done, key=lambda r: r[metric])
        lines += ["", f"Best {metric}: {best[metric]:.4g} ({best['run']})."]
    return "\n".join(lines) + "\n"


def _run(config, workdir: Path, point: dict, extra: list[str], env) -> dict:
    name = run_name(point)
    run_dir = workdir / name
    cmd = train_command(config, run_dir, point, extra)
    print(f"[sweep] {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    with open(workdir / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=log)
    row = {"run": name, **point, "returncode": proc.returncode}
    row["status"] = "ok" if proc.returncode == 0 else f"failed (see {name}.log)"
    row.update(final_metrics(run_dir), wall_s=time.time() - start)
    print(f"[sweep] {name}: {row['status']}", flush=True)
    return row


def _shared_corpus(workdir: Path, extra: list[str], keys: list[str]) -> list[str]:
    # One stdlib corpus/tokenizer for every run instead of one per run directory.
    if "data.corpus_dir" in keys or any(a.startswith("--config.data.corpus_dir=") for a in extra):
        return extra
    return [*extra, f"--config.data.corpus_dir={workdir.absolute() / 'data'}"]


def sweep(
    config: str,
    workdir: Path,
    grid: str,
    extra: list[str],
    env=None,
    *,
    parallel: int = 1,
    random_count: int = 0,
    seed: int = 0,
) -> list[dict]:
    """Run every point (first alone, then ``parallel`` at a time); one row per run (also
    written to disk after every run)."""
    axes = parse_grid(grid)
    keys = [k for k, _ in axes]
    points = random_points(axes, random_count, seed) if random_count else grid_points(axes)
    for point in points:
        train_command(config, workdir, point, [])  # reject ranges in a grid before running
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {parallel}")
    workdir.mkdir(parents=True, exist_ok=True)
    extra = _shared_corpus(workdir, extra, keys)
    rows: list[dict | None] = [None] * len(points)

    def record(i: int, row: dict) -> None:
        rows[i] = row
        done = [r for r in rows if r is not None]
        # Written after every run, so a long sweep can be read while it goes.
        (workdir / "sweep.json").write_text(json.dumps(done, indent=2) + "\n")
        (workdir / "sweep.md").write_text(markdown(done, keys))

    # The first run prepares what the others share (the corpus and tokenizer).
    record(0, _run(config, workdir, points[0], extra, env))
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        futures = {pool.submit(_run, config, workdir, p, extra, env): i for i, p in
                   enumerate(points) if i}  # fmt: skip
        for future in concurrent.futures.as_completed(futures):
            record(futures[future], future.result())
    record(0, rows[0])  # the final files list every run in point order
    print((workdir / "sweep.md").read_text(), end="")
    return rows


def check(config, workdir: str) -> list[dict[str, str]]:
    """The points of a valid sweep config; raises ``UserError`` naming the bad field."""
    try:
        axes = parse_grid(config.grid)
        points = (
            random_points(axes, config.random, config.seed) if config.random > 0
            else grid_points(axes)
        )  # fmt: skip
        for point in points:
            train_command("", Path(), point, [])  # ranges belong to a random search
    except ValueError as e:
        raise UserError(f"config.grid={config.grid!r}: {e}") from None
    spec = config.train_config
    if not spec:
        raise UserError("config.train_config is empty; e.g. "
                        "--config.train_config=configs/pretrain.py:tiny")  # fmt: skip
    if not Path(spec.split(":")[0]).is_file():
        raise UserError(f"config.train_config={spec!r}: no such config file")
    if config.parallel < 1:
        raise UserError(f"config.parallel={config.parallel} must be >= 1")
    if config.random < 0:
        raise UserError(f"config.random={config.random} must be >= 0 (0: the full grid)")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir} is a file; pass a folder (new or a sweep's).")
    try:
        shlex.split(config.train_args)
    except ValueError as e:
        raise UserError(f"config.train_args: {e}") from None
    return points


def run(config, workdir: str) -> list[dict]:
    """Run the sweep ``configs/sweep.py`` describes in ``workdir`` (checked first)."""
    check(config, workdir)
    rows = sweep(
        config.train_config, Path(workdir), config.grid, shlex.split(config.train_args),
        parallel=config.parallel, random_count=config.random, seed=config.seed,
    )  # fmt: skip
    failed = [r["run"] for r in rows if r["returncode"] != 0]
    if failed:
        raise UserError(f"{len(failed)} of {len(rows)} runs failed: {', '.join(failed)} "
                        f"(see <run>.log in {workdir})")  # fmt: skip
    return rows


_OLD_FLAGS = ("grid", "parallel", "random", "seed")


def expand(argv: list[str]) -> list[str]:
    """``-- ARGS`` -> ``--config.train_args=ARGS``; the old spelling (``--config=<training
    config> --grid=... --parallel=N``, told apart by a plain ``--grid``) -> the new one."""
    cut = argv.index("--") if "--" in argv else len(argv)
    own, rest = argv[:cut], argv[cut + 1 :]
    old = any(a == "--grid" or a.startswith("--grid=") for a in own)
    out: list[str] = []
    i = 0
    while i < len(own):
        arg, i = own[i], i + 1
        name, eq, value = arg[2:].partition("=")
        if old and arg.startswith("--") and (name == "config" or name in _OLD_FLAGS):
            if not eq and i < len(own):  # --grid VALUE
                value, i = own[i], i + 1
            out.append(f"--config.{'train_config' if name == 'config' else name}={value}")
        else:
            out.append(arg)
    if old:
        print("neox_jax.sweep: note: the new spelling is --config=configs/sweep.py "
              "--config.train_config=<training config> --config.grid=... --workdir=...",
              file=sys.stderr)  # fmt: skip
    return [*out, f"--config.train_args={shlex.join(rest)}"] if rest else out


COMMAND = cli.Command(
    run, "neox_jax.sweep", default_config="sweep.py", expand=expand,
    extra_flags={"workdir": (None, "Sweep directory: one folder per run, sweep.json/.md.")},
    required=["workdir"],
)  # fmt: skip

if __name__ == "__main__":
    COMMAND.run()

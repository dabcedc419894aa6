"""Run a grid of config overrides through the trainer; tabulate each run's final metrics.

    python experiments/sweep/sweep.py --config=configs/pretrain.py:tiny --workdir=/tmp/sweep \\
        --grid="optimizer.lr=1e-3,3e-3;model.num_hidden_layers=2,4" \\
        -- --config.train.steps=100

``--grid`` is ``key=v1,v2,...`` axes separated by ``;``; the sweep runs their cross
product. Arguments after ``--`` go to every run unchanged (a grid key wins over the
same key there). Each run is ``python -m neox_jax.train`` in its own process and its
own directory ``<workdir>/<key=value,...>``, so it checkpoints and resumes like any
run: running the sweep again finishes interrupted runs and leaves finished ones
alone. The final train and eval metrics of every run (read from its
``metrics.jsonl``) go to ``<workdir>/sweep.json`` and ``<workdir>/sweep.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
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
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise ValueError(f"Bad grid axis {part!r}; write key=value1,value2 (axes split by ;).")
        if key in dict(axes):
            raise ValueError(f"Grid key {key!r} appears twice.")
        axes.append((key, vals))
    if not axes:
        raise ValueError("--grid is empty; e.g. --grid='optimizer.lr=1e-3,3e-3'.")
    return axes


def grid_points(axes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """The cross product of the axes, first axis slowest."""
    keys = [k for k, _ in axes]
    return [
        dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in axes))
    ]


def run_name(point: dict[str, str]) -> str:
    """A directory name for a grid point: ``lr=0.001,num_hidden_layers=2``."""
    name = ",".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)


def train_command(config: str, workdir: Path, point: dict[str, str], extra: list[str]) -> list:
    """The trainer command of one run: fixed flags, minus any the grid sets, then the grid."""
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


def sweep(config: str, workdir: Path, grid: str, extra: list[str], env=None) -> list[dict]:
    """Run every grid point in turn; returns one row per run (also written to disk)."""
    axes = parse_grid(grid)
    keys = [k for k, _ in axes]
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for point in grid_points(axes):
        name = run_name(point)
        run_dir = workdir / name
        cmd = train_command(config, run_dir, point, extra)
        print(f"[sweep] {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.time()
        with open(workdir / f"{name}.log", "w") as log:
            proc = subprocess.run(
                cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=log, stderr=log
            )
        row = {"run": name, **point, "returncode": proc.returncode}
        row["status"] = "ok" if proc.returncode == 0 else f"failed (see {name}.log)"
        row.update(final_metrics(run_dir), wall_s=time.time() - start)
        rows.append(row)
        # Written after every run, so a long sweep can be read while it goes.
        (workdir / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
        (workdir / "sweep.md").write_text(markdown(rows, keys))
    print((workdir / "sweep.md").read_text(), end="")
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="e.g. configs/pretrain.py:tiny")
    parser.add_argument("--workdir", required=True, type=Path, help="one folder per run here")
    parser.add_argument("--grid", required=True, help="'key=v1,v2;key2=v3,v4'")
    args = parser.parse_args(own)
    try:
        rows = sweep(args.config, args.workdir, args.grid, extra)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

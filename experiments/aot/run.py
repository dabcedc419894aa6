"""Compile the neox-20b and pythia-12b train steps for TPU pod slices, on a CPU.

    JAX_PLATFORMS=cpu python experiments/aot/run.py            # every layout (~40 min)
    JAX_PLATFORMS=cpu python experiments/aot/run.py --only=20b-v5p   # names containing it

Each layout runs ``python -m neox_jax.aot`` in its own process (libtpu and the
topology stay per process) and its JSON report is merged into ``results.json`` beside
this file, so an interrupted sweep resumes where it stopped (``--redo`` recompiles).
``results.md`` gets the table the README shows, with the command of every row.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# name: (preset, topology, {config overrides}). One global batch per topology (one row
# of the preset's 2048 tokens per chip), so layouts on a topology are comparable; the
# published batches (1538 for the 20B, 1024 for Pythia) do not divide these chip
# counts, and only the activations, not the state, depend on the batch.
LAYOUTS = {
    "20b-v4-16-fsdp16-dots": ("neox-20b", "v4:2x2x4", {"mesh.fsdp": -1, "batch": 16}),
    "20b-v4-16-fsdp16-full": (
        "neox-20b", "v4:2x2x4", {"mesh.fsdp": -1, "batch": 16, "model.remat": "full"}
    ),
    "20b-v4-16-fsdp8-tp2-full": (
        "neox-20b", "v4:2x2x4",
        {"mesh.fsdp": -1, "mesh.tensor": 2, "batch": 16, "model.remat": "full"},
    ),
    "20b-v5e-256-fsdp256-dots": ("neox-20b", "v5e:16x16", {"mesh.fsdp": -1, "batch": 256}),
    "20b-v5e-256-fsdp256-full": (
        "neox-20b", "v5e:16x16", {"mesh.fsdp": -1, "batch": 256, "model.remat": "full"}
    ),
    "20b-v5e-256-fsdp64-tp4-dots": (
        "neox-20b", "v5e:16x16", {"mesh.fsdp": -1, "mesh.tensor": 4, "batch": 256}
    ),
    "20b-v5p-128-fsdp128-dots": ("neox-20b", "v5p:4x4x8", {"mesh.fsdp": -1, "batch": 128}),
    "20b-v5p-128-fsdp128-none": (
        "neox-20b", "v5p:4x4x8", {"mesh.fsdp": -1, "batch": 128, "model.remat": "none"}
    ),
    "20b-v5p-128-fsdp32-tp4-dots": (
        "neox-20b", "v5p:4x4x8", {"mesh.fsdp": -1, "mesh.tensor": 4, "batch": 128}
    ),
    "12b-v4-16-fsdp16-full": (
        "pythia-12b", "v4:2x2x4", {"mesh.fsdp": -1, "batch": 16, "model.remat": "full"}
    ),
    "12b-v5e-256-fsdp256-dots": ("pythia-12b", "v5e:16x16", {"mesh.fsdp": -1, "batch": 256}),
    "12b-v5p-128-fsdp128-dots": ("pythia-12b", "v5p:4x4x8", {"mesh.fsdp": -1, "batch": 128}),
    # A GPT-NeoX-architecture 175B (GPT-3's shape) on v5p-512 at GPT-3's batch of 1536
    # rows (3 per chip): gradient accumulation, remat and tensor parallelism compared.
    "175b-v5p-512-fsdp512-dots-mb3": (
        "neox-175b", "v5p:8x8x8", {"mesh.fsdp": -1, "batch": 1536, "train.microbatches": 3}
    ),
    "175b-v5p-512-fsdp512-dots": ("neox-175b", "v5p:8x8x8", {"mesh.fsdp": -1, "batch": 1536}),
    "175b-v5p-512-fsdp512-full": (
        "neox-175b", "v5p:8x8x8", {"mesh.fsdp": -1, "batch": 1536, "model.remat": "full"}
    ),
    "175b-v5p-512-fsdp128-tp4-dots-mb3": (
        "neox-175b", "v5p:8x8x8",
        {"mesh.fsdp": -1, "mesh.tensor": 4, "batch": 1536, "train.microbatches": 3},
    ),
    # Qwen3-235B-A22B (94 layers, 128 experts of width 1536, top 8) on v5p-256 at one
    # 4096-token row per chip (Qwen3's first pretraining stage used 4096-token
    # sequences, Qwen3 technical report section 3.2): expert x fsdp (x tensor) layouts,
    # dropless and capacity-bounded dispatch, and no expert axis at all.
    "235b-v5p-256-expert16-fsdp16-dots": (
        "qwen3-235b-a22b", "v5p:8x8x4",
        {"mesh.fsdp": -1, "mesh.expert": 16, "batch": 256, "data.seq_len": 4096},
    ),
    "235b-v5p-256-expert16-fsdp16-capacity": (
        "qwen3-235b-a22b", "v5p:8x8x4",
        {"mesh.fsdp": -1, "mesh.expert": 16, "batch": 256, "data.seq_len": 4096,
         "model.moe_impl": "capacity"},
    ),
    "235b-v5p-256-expert8-fsdp32-dots": (
        "qwen3-235b-a22b", "v5p:8x8x4",
        {"mesh.fsdp": -1, "mesh.expert": 8, "batch": 256, "data.seq_len": 4096},
    ),
    "235b-v5p-256-expert8-fsdp8-tp4-dots": (
        "qwen3-235b-a22b", "v5p:8x8x4",
        {"mesh.fsdp": -1, "mesh.expert": 8, "mesh.tensor": 4, "batch": 256,
         "data.seq_len": 4096},
    ),
    "235b-v5p-256-fsdp256-dots": (
        "qwen3-235b-a22b", "v5p:8x8x4", {"mesh.fsdp": -1, "batch": 256, "data.seq_len": 4096}
    ),
    # The Llama-style families (issue #16): Mistral Small 3.2's 24B text decoder on a
    # v5p-128 and Qwen2.5-3B on a v5e-16 at one 2048-token row per chip; Qwen3-1.7B's
    # train step at 32,768 tokens per row (one per chip, v5p-8) with the flash kernels
    # (grouped K/V heads) in place of [heads, T, T] scores.
    "families-mistral-small-3.2-v5p-128-fsdp128-dots": (
        "mistral-small-3.2", "v5p:4x4x8", {"mesh.fsdp": -1, "batch": 128}
    ),
    "families-qwen2.5-3b-v5e-16-fsdp16-dots": (
        "qwen2.5-3b", "v5e:4x4", {"mesh.fsdp": -1, "batch": 16}
    ),
    "families-qwen3-1.7b-32k-v5p-8-fsdp8-full-pallas": (
        "qwen3-1.7b", "v5p:2x2x2",
        {"mesh.fsdp": -1, "batch": 8, "data.seq_len": 32768, "model.remat": "full",
         "model.attention_impl": "pallas"},
    ),
    "families-qwen3-1.7b-4k-v5p-8-fsdp8-dots-pallas": (
        "qwen3-1.7b", "v5p:2x2x2",
        {"mesh.fsdp": -1, "batch": 8, "data.seq_len": 4096, "model.attention_impl": "pallas"},
    ),
    "families-qwen3-1.7b-32k-v5p-8-fsdp8-full-xla": (
        "qwen3-1.7b", "v5p:2x2x2",
        {"mesh.fsdp": -1, "batch": 8, "data.seq_len": 32768, "model.remat": "full"},
    ),
    # attention_impl="pallas" against "xla" on a model small enough to compile in a few
    # minutes here: one 2048-token row per chip of a v5e-4, the flash kernels
    # (Mosaic) in place of the [heads, T, T] scores.
    "410m-v5e-4-fsdp4-dots-xla": ("pythia-410m", "v5e:2x2", {"mesh.fsdp": -1, "batch": 4}),
    "410m-v5e-4-fsdp4-dots-pallas": (
        "pythia-410m", "v5e:2x2", {"mesh.fsdp": -1, "batch": 4, "model.attention_impl": "pallas"}
    ),
    "410m-v5e-4-fsdp4-none-xla": (
        "pythia-410m", "v5e:2x2", {"mesh.fsdp": -1, "batch": 4, "model.remat": "none"}
    ),
    "410m-v5e-4-fsdp4-none-pallas": (
        "pythia-410m", "v5e:2x2",
        {"mesh.fsdp": -1, "batch": 4, "model.remat": "none", "model.attention_impl": "pallas"},
    ),
}  # fmt: skip


def command(preset: str, topology: str, overrides: dict, json_out: Path | None) -> list[str]:
    """The ``python -m neox_jax.aot`` command line of one layout."""
    flags = {"mesh.data": 1, **overrides}
    flags["data.global_batch_size"] = flags.pop("batch")
    cmd = [
        "python",
        "-m",
        "neox_jax.aot",
        f"--config=configs/pretrain.py:{preset}",
        f"--topology={topology}",
        *[f"--config.{k}={v}" for k, v in flags.items()],
    ]
    return cmd + ([f"--json_out={json_out}"] if json_out else [])


def run(name: str, results: dict, log) -> None:
    preset, topology, overrides = LAYOUTS[name]
    out = HERE / f".{name}.json"
    cmd = command(preset, topology, overrides, out)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    start = time.time()
    proc = subprocess.run(
        [sys.executable, *cmd[1:]], env=env, cwd=REPO, capture_output=True, text=True
    )
    wall = time.time() - start
    if proc.returncode != 0 or not out.exists():
        report = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    else:
        report = json.loads(out.read_text())
        out.unlink()
    report.update(
        name=name,
        preset=preset,
        command="JAX_PLATFORMS=cpu " + shlex.join(command(preset, topology, overrides, None)),
        wall_seconds=wall,
    )
    results[name] = report
    log(f"{name}: {wall:.0f} s, fits={report.get('fits')}, error={report.get('error', '')[:80]}")


def rejudge(results: dict) -> None:
    """Compare reports made before ``neox_jax.aot`` asked the compiler for the usable
    HBM (they used the datasheet size) against the usable HBM instead."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from neox_jax import aot

    usable = {}
    for r in results.values():
        if "hbm_source" in r or "topology" not in r:
            continue
        if r["topology"] not in usable:
            usable[r["topology"]] = aot.usable_hbm_bytes(aot.topology_devices(r["topology"])[0])
        hbm = usable[r["topology"]]
        if hbm:
            r.update(hbm_gib=hbm / 2**30, hbm_source="compiler")
            if r.get("per_device_gib") is not None:
                r["fits"] = r["per_device_gib"] * 2**30 <= hbm


def table(results: dict) -> str:
    """The README table: one row per layout, in ``LAYOUTS`` order."""
    head = (
        "| layout | model | topology (chips) | mesh | batch x seq | remat | attention "
        "| state GiB/chip | temp GiB/chip | total GiB/chip | HBM GiB | fits "
        "| model TFLOP/chip/step | XLA TFLOP/chip* | compile s |\n|" + " --- |" * 15
    )
    rows = []
    for name in LAYOUTS:
        r = results.get(name)
        if r is None:
            continue
        mesh = "x".join(f"{a}{s}" for a, s in r.get("mesh", {}).items() if s > 1) or "-"
        total = r.get("per_device_gib")
        if total is None and "required_gib" in r:
            total_text = f"> {r['required_gib']:.2f} (OOM; {r['available_gib']:.2f} usable)"
        else:
            total_text = "-" if total is None else f"{total:.2f}"
        xla = r.get("xla_flops_per_device")
        k = r.get("microbatches", 1)
        mb = f" ({k} microbatches)" if k > 1 else ""
        if r.get("moe_impl"):
            mb += f", {r['moe_impl']} experts"
        temp = "-" if r.get("temp_gib") is None else f"{r['temp_gib']:.2f}"
        rows.append(
            f"| {name} | {r.get('preset')} | {r.get('topology', '')} ({r.get('devices', '')}) "
            f"| {mesh} | {r.get('global_batch_size', '')} x {r.get('seq_len', '')}{mb} "
            f"| {r.get('remat', '')} | {r.get('attention_impl', 'xla')} "
            f"| {r.get('state_gib', float('nan')):.2f} | {temp} | {total_text} "
            f"| {r.get('hbm_gib', float('nan')):.2f} | {r.get('fits')} "
            f"| {r.get('model_flops_per_device', float('nan')) / 1e12:.1f} "
            f"| {'-' if xla is None else f'{xla / 1e12:.2f}'} "
            f"| {r.get('compile_seconds', float('nan')):.0f} |"
        )
    cmds = "\n".join(f"    {results[n]['command']}" for n in LAYOUTS if n in results)
    return head + "\n" + "\n".join(rows) + "\n\nCommands:\n\n" + cmds + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run layouts whose name contains this")
    parser.add_argument("--redo", action="store_true", help="recompile layouts already done")
    args = parser.parse_args()
    path = HERE / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    with open(HERE / "run.log", "a") as logfile:

        def log(line):
            print(line, flush=True)
            logfile.write(line + "\n")
            logfile.flush()

        for name in LAYOUTS:
            if args.only not in name or (name in results and not args.redo):
                continue
            run(name, results, log)
            path.write_text(json.dumps(results, indent=2) + "\n")
            (HERE / "results.md").write_text(table(results))
    rejudge(results)
    path.write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "results.md").write_text(table(results))


if __name__ == "__main__":
    main()

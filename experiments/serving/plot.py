"""Throughput and p99 time to first token against request rate, per mode.

  python experiments/serving/plot.py experiments/serving/results_pythia-70m.jsonl

Writes the PNG beside the JSON lines (needs matplotlib) and prints a Markdown table.
Modes run at one rate only (one request at a time: saturated at every rate) are drawn
as single points.
"""

import json
import sys
from collections import defaultdict
from pathlib import Path


def table(rows) -> None:
    print(
        "| mode | rate (req/s) | requests | output tok/s | tok per CPU-s | req/s | "
        "TTFT p50 / p99 (s) | TPOT p50 / p99 (s) | load avg (1 min) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |")
    fmt = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
    for r in rows:
        cpu = r.get("output_tokens_per_cpu_s")
        load = r.get("load_average", [None])[0]
        print(
            f"| {r['mode']} | {r['rate']:g} | {r['ok']} | {r['output_tokens_per_s']:.2f} | "
            f"{fmt(cpu)} | {r['requests_per_s']:.3f} | "
            f"{fmt(r['ttft_p50_s'])} / {fmt(r['ttft_p99_s'])} | "
            f"{fmt(r['tpot_p50_s'])} / {fmt(r['tpot_p99_s'])} | {fmt(load)} |"
        )


def main(path: str) -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    table(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    by_mode = defaultdict(list)
    for r in rows:
        if "shared-prefix" not in r["mode"]:  # a different workload: in the table only
            by_mode[r["mode"]].append(r)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    series = (
        ("output_tokens_per_s", "output tokens/s (wall clock)"),
        ("output_tokens_per_cpu_s", "output tokens per CPU-second"),
        ("ttft_p99_s", "p99 time to first token (s)"),
    )
    for ax, (key, label) in zip(axes, series, strict=True):
        for mode, rs in by_mode.items():
            rs.sort(key=lambda r: r["rate"])
            ax.plot([r["rate"] for r in rs], [r.get(key) for r in rs], "o-", label=mode)
        ax.set(xlabel="request rate (req/s)", ylabel=label, xscale="log")
        rates = sorted({r["rate"] for rs in by_mode.values() for r in rs})
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.minorticks_off()
    axes[0].legend(fontsize=8)
    fig.suptitle(Path(path).stem)
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])

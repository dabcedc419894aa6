"""Throughput and p99 time to first token against request rate, per mode.

  python experiments/serving/plot.py experiments/serving/results_pythia-70m.jsonl

Writes the PNG beside the JSON lines (needs matplotlib) and prints a Markdown table.
"""

import json
import sys
from collections import defaultdict
from pathlib import Path


def main(path: str) -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    print("| mode | rate (req/s) | output tok/s | req/s | TTFT p50 / p99 | TPOT p50 / p99 |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
    for r in rows:
        print(
            f"| {r['mode']} | {r['rate']:g} | {r['output_tokens_per_s']:.1f} | "
            f"{r['requests_per_s']:.2f} | {fmt(r['ttft_p50_s'])} / {fmt(r['ttft_p99_s'])} | "
            f"{fmt(r['tpot_p50_s'])} / {fmt(r['tpot_p99_s'])} |"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    by_mode = defaultdict(list)
    for r in rows:
        by_mode[r["mode"]].append(r)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, rs in by_mode.items():
        rs.sort(key=lambda r: r["rate"])
        a.plot([r["rate"] for r in rs], [r["output_tokens_per_s"] for r in rs], "o-", label=mode)
        b.plot([r["rate"] for r in rs], [r["ttft_p99_s"] for r in rs], "o-", label=mode)
    a.set(xlabel="request rate (req/s)", ylabel="output tokens/s", title="throughput")
    b.set(xlabel="request rate (req/s)", ylabel="seconds", title="p99 time to first token")
    a.legend()
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])

"""Continuous batching against static batches from ``run.sh ... alternate`` JSON lines.

  python experiments/serving/compare.py experiments/serving/results_quiet_pythia-70m.jsonl

Prints every run (the Markdown table of ``plot.py``, with its round) and, per workload
(request count and rate), the issue's targets on the best round of each mode: throughput
(wall clock and per CPU-second of the serving process) >= 1.5x static batching, and
p99 time to first token no worse than static batching's; and every continuous server
run against the one-at-a-time server (target >= 4x).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from plot import table  # noqa: E402


def best(rows: list[dict], kind: str, n: int, rate: float) -> dict | None:
    runs = [
        r for r in rows if r["mode"].startswith(kind) and r["requests"] == n and r["rate"] == rate
    ]
    return max(runs, key=lambda r: r["output_tokens_per_s"], default=None)


def main(path: str) -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    table(rows)
    print(
        "\n| requests | rate (req/s) | tok/s continuous / static | per CPU-s | p99 TTFT"
        " continuous / static (s) | >= 1.5x (wall / CPU) | p99 TTFT no worse |"
    )
    print("| ---: | ---: | --- | --- | --- | --- | --- |")
    for n, rate in sorted({(r["requests"], r["rate"]) for r in rows}):
        c, s = best(rows, "server:continuous", n, rate), best(rows, "static", n, rate)
        if c is None or s is None:
            continue
        wall = c["output_tokens_per_s"] / s["output_tokens_per_s"]
        cpu = c["output_tokens_per_cpu_s"] / s["output_tokens_per_cpu_s"]
        yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
        print(
            f"| {n} | {rate:g} | {c['output_tokens_per_s']:.2f} / {s['output_tokens_per_s']:.2f} = "
            f"{wall:.2f}x | {c['output_tokens_per_cpu_s']:.1f} / "
            f"{s['output_tokens_per_cpu_s']:.1f} = {cpu:.2f}x | {c['ttft_p99_s']:.2f} / "
            f"{s['ttft_p99_s']:.2f} | {yes(wall >= 1.5)} / {yes(cpu >= 1.5)} | "
            f"{yes(c['ttft_p99_s'] <= s['ttft_p99_s'])} |"
        )

    one = max(
        (r for r in rows if r["mode"].startswith("server:one-at-a-time")),
        key=lambda r: r["output_tokens_per_s"],
        default=None,
    )
    if one is None:
        return
    print("\n| continuous mode | requests | tok/s continuous / one at a time | >= 4x |")
    print("| --- | ---: | --- | --- |")
    for c in (r for r in rows if r["mode"].startswith("server:continuous")):
        ratio = c["output_tokens_per_s"] / one["output_tokens_per_s"]
        print(
            f"| {c['mode']} | {c['requests']} | {c['output_tokens_per_s']:.2f} / "
            f"{one['output_tokens_per_s']:.2f} = {ratio:.2f}x | "
            f"{'yes' if ratio >= 4 else '**no**'} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])

"""The bench's summary and markdown tables (``bench.py`` writes the JSON they read)."""

from __future__ import annotations

import op_profile


def summarize(report: dict) -> dict:
    """Best round per engine, MFU against the measured peak, speed-up over torch."""
    peak = report["peak_flops"]
    best = {}
    for results in report["rounds"]:
        for name, r in results.items():
            if "tokens_per_s" in r and r["tokens_per_s"] > best.get(name, {}).get(
                "tokens_per_s", 0
            ):
                best[name] = r
    torch_rate = best.get("torch", {}).get("tokens_per_s")
    return {
        name: {
            "tokens_per_s": r["tokens_per_s"],
            "step_s_median": r["step_s_median"],
            "mfu": r["achieved_flops"] / peak,
            "vs_torch": None if not torch_rate else r["tokens_per_s"] / torch_rate,
            "breakdown_s": r.get("breakdown_s"),
            "profile": r.get("profile"),
        }
        for name, r in best.items()
    }


def markdown(report: dict) -> str:
    lines = [
        f"Peak (best fp32 matmul, measured): {report['peak_flops'] / 1e9:.1f} GFLOP/s",
        "",
        "| engine | tokens/s | step s (median) | MFU | vs torch |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, s in report["summary"].items():
        vs = "-" if s["vs_torch"] is None else f"{s['vs_torch']:.2f}x"
        rate, step = f"{s['tokens_per_s']:.0f}", f"{s['step_s_median']:.3f}"
        lines.append(f"| {name} | {rate} | {step} | {s['mfu']:.1%} | {vs} |")
    lines += [
        "",
        "Every round (tokens/s; CPU seconds per step, all threads; 1-minute load average):",
        "",
        "| round | engine | tokens/s | CPU s / step | HLO GB / step | load |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for i, results in enumerate(report["rounds"]):
        for name, r in results.items():
            if "tokens_per_s" not in r:
                lines.append(f"| {i + 1} | {name} | failed | | | |")
                continue
            load = r["load_average"][0] if r.get("load_average") else float("nan")
            cpu = r.get("cpu_s_per_step_median") or float("nan")
            gb = f"{r['hlo_bytes'] / 1e9:.1f}" if r.get("hlo_bytes") else "-"
            rate = f"{r['tokens_per_s']:.0f}"
            lines.append(f"| {i + 1} | {name} | {rate} | {cpu:.2f} | {gb} | {load:.1f} |")
    text = "\n".join(lines) + "\n"
    for name, s in report["summary"].items():  # --profile: the per-op tables
        if s.get("profile"):
            table = op_profile.torch_markdown if name == "torch" else op_profile.xla_markdown
            text += f"\nPer-op profile, {name}:\n\n" + table(s["profile"])
    return text

"""Renders bench/run.py's results as docs/benchmarks.md: one table per scenario, medians,
each row with its ratio to a direct connection (and to the bare aiohttp passthrough)."""

from __future__ import annotations

from typing import Any

# (scenario, measure, label, unit, higher is better)
COLUMNS: dict[str, list[tuple[str, str, str, bool]]] = {
    "1 latency c=1": [
        ("p50_us", "latency p50", "µs", False),
        ("p99_us", "latency p99", "µs", False),
    ],
    "2 throughput c=64": [("rps", "requests/s", "", True)],
    "3a streams paced": [
        ("lines_per_s", "lines/s", "", True),
        ("delay_us_p50", "line delay p50", "µs", False),
        ("delay_us_p99", "line delay p99", "µs", False),
        ("ttfb_ms_p99", "TTFB p99", "ms", False),
    ],
    "3b streams unpaced": [
        ("lines_per_s", "lines/s", "", True),
        ("delay_us_p99", "line delay p99", "µs", False),
    ],
    "3c burst ttfb": [
        ("ttfb_ms_p50", "TTFB p50", "ms", False),
        ("ttfb_ms_p99", "TTFB p99", "ms", False),
    ],
}
TITLES = {
    "1 latency c=1": "1. Small non-streamed `POST /api/generate`, one connection",
    "2 throughput c=64": "2. The same, 64 connections",
    "3a streams paced": "3a. 500 concurrent `/api/chat` streams, 256 lines each, 20 ms per line",
    "3b streams unpaced": "3b. 500 concurrent streams, 256 lines each, unpaced",
    "3c burst ttfb": "3c. 200 streams opened at once: time to first byte",
}


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def render(report: dict[str, Any], command: str) -> str:
    medians = report["medians"]
    out = ["# Benchmarks", ""]
    out.append(f"Run {report['started']} with `{command}`; medians of alternating rounds.")
    out.append("")
    out.append("| machine | |")
    out.append("|---|---|")
    for key, value in report["machine"].items():
        out.append(f"| {key} | {value} |")
    out.append(f"| CPU steal during the run | {report['steal_percent']:.1f}% |")
    out.append("")
    for scenario, columns in COLUMNS.items():
        if scenario not in medians:
            continue
        rows = medians[scenario]
        out.append(f"## {TITLES[scenario]}")
        out.append("")
        head = ["target"]
        for _, label, unit, _better in columns:
            head += [f"{label}{' (' + unit + ')' if unit else ''}", "vs direct"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        direct = rows.get("direct", {})
        for target, values in rows.items():
            cells = [target]
            for key, _, _, _ in columns:
                value = values[key]
                base = direct.get(key)
                ratio = f"{value / base:.2f}x" if base else ""
                if key.endswith("_us") and target != "direct" and base is not None:
                    ratio += f" (+{value - base:,.0f} µs)"
                cells += [_fmt(value), ratio]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    if "4 memory" in medians:
        out.append("## 4. Memory (resident set of the proxy process)")
        out.append("")
        out.append(
            "| target | idle (MiB) | per open stream, 1,000 open (KiB) "
            "| growth during a blob upload (MiB) |"
        )
        out.append("|---|---|---|---|")
        for target, values in medians["4 memory"].items():
            out.append(
                f"| {target} | {values['idle_mib']:.1f} | {values['per_stream_kib']:.1f} | "
                f"{values['upload_growth_mib']:.1f} (of {values['upload_gib']:.1f} GiB) |"
            )
        out.append("")
    if "5 scrape" in medians:
        values = medians["5 scrape"]["ollama-meter"]
        out.append("## 5. `/metrics` with 100 models x every endpoint populated")
        out.append("")
        out.append(
            f"{values['series']:,.0f} series, {values['bytes'] / 1024:,.0f} KiB: scrape p50 "
            f"{values['p50_ms']:.1f} ms, slowest of 20 {values['max_ms']:.1f} ms."
        )
        out.append("")
    return "\n".join(out) + "\n"

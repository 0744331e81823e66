"""Renders bench/run.py's results as docs/benchmarks.md: one table per scenario, medians,
each row with its ratio to a direct connection (and to the bare aiohttp passthrough)."""

from __future__ import annotations

import statistics
from typing import Any

# (scenario, measure, label, unit, higher is better)
COLUMNS: dict[str, list[tuple[str, str, str, bool]]] = {
    "1 latency c=1": [
        ("p50_us", "latency p50", "µs", False),
        ("p99_us", "latency p99", "µs", False),
    ],
    "2 throughput c=64": [
        ("rps", "requests/s", "", True),
        ("cpu_us_per_request", "CPU per request", "µs", False),
    ],
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


def paired_ratio(raw: dict[str, Any], scenario: str, target: str, base: str, key: str) -> float:
    """The median over rounds of target/base, each round against the same round's base.

    Targets run one after another within a round, seconds apart, so a round's pair shares
    the machine's state; the median of those ratios is steadier than a ratio of medians.
    """
    mine = raw.get(scenario, {}).get(target, {}).get(key, [])
    theirs = raw.get(scenario, {}).get(base, {}).get(key, [])
    ratios = [a / b for a, b in zip(mine, theirs, strict=False) if b]
    return statistics.median(ratios) if ratios else float("nan")


def paired_difference(
    raw: dict[str, Any], scenario: str, target: str, base: str, key: str
) -> float:
    """The median over rounds of target - base, each round against the same round's base."""
    mine = raw.get(scenario, {}).get(target, {}).get(key, [])
    theirs = raw.get(scenario, {}).get(base, {}).get(key, [])
    differences = [a - b for a, b in zip(mine, theirs, strict=False)]
    return statistics.median(differences) if differences else float("nan")


BASELINE = "ollama-meter@base"  # run.py's --baseline-src target
KEYED = "ollama-meter+keys"  # run.py's --keys target
FLEET = "ollama-meter+fleet"  # run.py's --fleet target
LEDGER = "ollama-meter+ledger"  # run.py's --ledger target
LIMITED = "ollama-meter+limits"  # run.py's --limits targets: rpm, tpm, concurrency
LIMITED_RPM = "ollama-meter+limits-rpm"  # the same with tpm off
SLOTTED = "ollama-meter+slots"  # --slots alone


def _targets(
    medians: dict[str, Any], raw: dict[str, Any], fleet: int = 0
) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for the goals of the benchmark issue, where measured; met is
    None for a comparison with no goal (the --baseline-src row)."""
    rows: list[tuple[str, str, bool | None]] = []

    def get(scenario: str, target: str, key: str) -> float | None:
        value = medians.get(scenario, {}).get(target, {}).get(key)
        return None if value is None else float(value)

    meter, direct, bare = "ollama-meter", "direct", "passthrough"
    throughput = "2 throughput c=64"
    if get(throughput, meter, "rps") and get(throughput, direct, "rps"):
        ratio = paired_ratio(raw, throughput, meter, direct, "rps")
        rows.append(
            ("requests/s at 64 connections >= 0.12x direct", f"{ratio:.3f}x", ratio >= 0.12)
        )
    if get(throughput, meter, "rps") and get(throughput, bare, "rps"):
        ratio = paired_ratio(raw, throughput, meter, bare, "rps")
        measured = f"{ratio:.2f}x"
        if get(throughput, meter, "cpu_us_per_request"):
            cpu = paired_ratio(raw, throughput, bare, meter, "cpu_us_per_request")
            measured += f" (by CPU per request: {cpu:.2f}x)"
        rows.append(("the same >= 0.9x the bare aiohttp passthrough", measured, ratio >= 0.9))
    if get(throughput, meter, "rps") and get(throughput, BASELINE, "rps"):
        ratio = paired_ratio(raw, throughput, meter, BASELINE, "rps")
        measured = f"{ratio:.2f}x"
        if get(throughput, meter, "cpu_us_per_request"):
            cpu = paired_ratio(raw, throughput, BASELINE, meter, "cpu_us_per_request")
            measured += f" (by CPU per request: {cpu:.2f}x)"
        rows.append((f"the same against the baseline, `{BASELINE}`", measured, None))
    if get(throughput, meter, "rps") and get(throughput, KEYED, "rps"):
        ratio = paired_ratio(raw, throughput, KEYED, meter, "rps")
        measured = f"{ratio:.3f}x"
        if get(throughput, KEYED, "cpu_us_per_request"):
            cpu = paired_ratio(raw, throughput, meter, KEYED, "cpu_us_per_request")
            measured += f" (by CPU per request: {cpu:.3f}x)"
        rows.append(
            (f"`{KEYED}` (every request keyed) >= 0.95x ollama-meter", measured, ratio >= 0.95)
        )
    if get(throughput, meter, "rps") and get(throughput, FLEET, "rps"):
        ratio = paired_ratio(raw, throughput, FLEET, meter, "rps")
        rows.append(
            (
                f"`{FLEET}` ({fleet} upstreams) >= 0.9x ollama-meter (one upstream)",
                f"{ratio:.3f}x",
                ratio >= 0.9,
            )
        )
        if get(throughput, FLEET, "cpu_us_per_request"):
            added = paired_difference(raw, throughput, FLEET, meter, "cpu_us_per_request")
            rows.append(
                (
                    f"`{FLEET}`: routing adds < 50 µs of CPU per request",
                    f"{added:+.0f} µs",
                    added < 50,
                )
            )
    if get(throughput, meter, "rps") and get(throughput, LEDGER, "rps"):
        ratio = paired_ratio(raw, throughput, LEDGER, meter, "rps")
        measured = f"{ratio:.3f}x"
        if get(throughput, LEDGER, "cpu_us_per_request"):
            added = paired_difference(raw, throughput, LEDGER, meter, "cpu_us_per_request")
            measured += f" ({added:+.1f} µs of CPU per request)"
        rows.append(
            (f"`{LEDGER}` (usage ledger on) >= 0.97x ollama-meter", measured, ratio >= 0.97)
        )
    for name, what in ((LIMITED, "rpm, tpm, concurrency"), (LIMITED_RPM, "rpm, concurrency")):
        if get(throughput, meter, "rps") and get(throughput, name, "rps"):
            ratio = paired_ratio(raw, throughput, name, meter, "rps")
            measured = f"{ratio:.3f}x"
            if get(throughput, name, "cpu_us_per_request"):
                added = paired_difference(raw, throughput, name, meter, "cpu_us_per_request")
                measured += f" ({added:+.0f} µs of CPU per request)"
            rows.append(
                (f"`{name}` ({what}, --slots) >= 0.95x ollama-meter", measured, ratio >= 0.95)
            )
    if get(throughput, meter, "rps") and get(throughput, SLOTTED, "rps"):
        ratio = paired_ratio(raw, throughput, SLOTTED, meter, "rps")
        rows.append((f"`{SLOTTED}` (--slots alone) against ollama-meter", f"{ratio:.3f}x", None))
    p50 = get("1 latency c=1", meter, "p50_us")
    p50_direct = get("1 latency c=1", direct, "p50_us")
    if p50 is not None and p50_direct is not None:
        added = p50 - p50_direct
        rows.append(("added latency p50 at 1 connection < 500 µs", f"{added:,.0f} µs", added < 500))
    lines = get("3b streams unpaced", meter, "lines_per_s")
    lines_direct = get("3b streams unpaced", direct, "lines_per_s")
    if lines and lines_direct:
        ratio = lines / lines_direct
        rows.append(("unpaced lines/s >= 0.85x direct", f"{ratio:.2f}x", ratio >= 0.85))
    p99 = get("3a streams paced", meter, "delay_us_p99")
    p99_direct = get("3a streams paced", direct, "delay_us_p99")
    if p99 is not None and p99_direct is not None:
        added = p99 - p99_direct
        rows.append(
            (
                "added line delay p99, 500 paced streams < 2 ms",
                f"{added / 1000:.1f} ms",
                added < 2000,
            )
        )
    ttfb = get("3c burst ttfb", meter, "ttfb_ms_p99")
    ttfb_nginx = get("3c burst ttfb", "nginx", "ttfb_ms_p99")
    if ttfb is not None and ttfb_nginx is not None:
        rows.append(
            (
                "burst TTFB p99 no worse than nginx",
                f"{ttfb:.0f} ms vs {ttfb_nginx:.0f} ms",
                ttfb <= ttfb_nginx,
            )
        )
    per_stream = get("4 memory", meter, "per_stream_kib")
    if per_stream is not None:
        rows.append(("memory per open stream < 32 KiB", f"{per_stream:.1f} KiB", per_stream < 32))
    growth = get("4 memory", meter, "upload_growth_mib")
    if growth is not None:
        rows.append(("flat during the upload (within 16 MiB)", f"+{growth:.1f} MiB", growth < 16))
    return rows


def render(report: dict[str, Any], command: str) -> str:
    medians = report["medians"]
    out = ["# Benchmarks", ""]
    out.append(f"Run {report['started']} with `{command}`; medians of alternating rounds.")
    out.append("How the suite works and how processes are pinned: `bench/README.md`.")
    baseline = report.get("baseline")
    if baseline:
        out.append(
            f"`{BASELINE}` is the ollama-meter of `{baseline['src']}/src`, {baseline['commit']},"
            " with the same settings."
        )
    if report.get("keys"):
        out.append(
            f"`{KEYED}` is ollama-meter with `--keys-file` of {report['keys']:,} keys, every"
            " request carrying a valid one, the keys in turn (request/response scenarios only)."
        )
    if report.get("fleet"):
        out.append(
            f"`{FLEET}` is ollama-meter in front of {report['fleet']} fake upstreams"
            " (`--upstream` given that many times), every request routed to one that has its"
            " model loaded (request/response scenarios only)."
        )
    if report.get("limits"):
        out.append(
            f"`{LIMITED}` is ollama-meter with `--slots 1000` and `[limits]` of 10^9 rpm and tpm"
            f" and concurrency 1000, nothing refused; `{LIMITED_RPM}` the same with tpm off;"
            f" `{SLOTTED}` `--slots 1000` alone (request/response scenarios only)."
        )
    out.append("")
    targets = _targets(medians, report.get("raw", {}), report.get("fleet", 0))
    if targets:
        out.append("| goal | ollama-meter | met |")
        out.append("|---|---|---|")
        for goal, measured, met in targets:
            verdict = "(no goal)" if met is None else "yes" if met else "**no**"
            out.append(f"| {goal} | {measured} | {verdict} |")
        out.append("")
        out.append(
            "Ratios of requests/s are medians of per-round ratios (each round against the"
            " same round's baseline); tables below give medians of each target's rounds."
        )
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
                value = values.get(key)
                if value is None:
                    cells += ["", ""]
                    continue
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
        out.append("## 5. `/metrics` with 100 models x every endpoint populated")
        out.append("")
        out.append("| target | series | size (KiB) | scrape p50 (ms) | slowest of 20 (ms) |")
        out.append("|---|---|---|---|---|")
        for target, values in medians["5 scrape"].items():
            out.append(
                f"| {target} | {values['series']:,.0f} | {values['bytes'] / 1024:,.0f} | "
                f"{values['p50_ms']:.1f} | {values['max_ms']:.1f} |"
            )
        out.append("")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    report = json.loads(Path(sys.argv[1]).read_text())
    print(render(report, sys.argv[2] if len(sys.argv) > 2 else "python bench/run.py"), end="")

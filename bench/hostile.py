"""What hostile clients do to an ollama-meter process: ``python bench/hostile.py [--src DIR]
[--only a,b,...] [--markdown FILE] [--json FILE]``.

One scenario per pattern of the hardening issue (bench/hostile_clients.py: a, a gzip bomb, to
h, a /metrics storm). Each runs on fresh processes, the fake upstream
(bench/hostile_upstream.py) and ``python -m ollama_meter`` with default settings, so that the
proxy's peak resident set is that scenario's alone (VmHWM from /proc/PID/status, reset through
clear_refs just before the scenario starts as well). For each: the proxy's RSS before (idle,
after one health check), its peak, and after (VmRSS once it has stopped moving, the clients
gone), and what the scenario itself measures. A scenario that fails reports its error and the
others go on; each has a time budget, and the whole run takes under two minutes.

``--src DIR`` runs the ollama-meter of DIR/src (PYTHONPATH) instead of this checkout's:
``git worktree add /tmp/base COMMIT`` then ``--src /tmp/base`` measures an older commit with
the same harness. Options a target does not have (``--keepalive-timeout`` before the
hardening) are not passed to it. Pinning as in run.py: the proxy on CPU 0, this harness and
the upstream on CPU 1. Memory is what this is for; its times (the event loop's block, the
scrape) give the order of magnitude on a shared machine, not a benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
from hostile_clients import SCENARIOS, Figures, Proxy, Scenario, gzip_of_zeros, request
from run import (
    HARNESS_CPU,
    TARGET_CPU,
    describe_checkout,
    free_port,
    pinned,
    rss_kib,
    source_env,
    wait_listening,
)

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
PYTHON: Final = sys.executable


@dataclass
class Outcome:
    key: str
    title: str
    issue: str
    before_mib: float | None = None
    peak_mib: float | None = None
    after_mib: float | None = None
    figures: Figures = field(default_factory=dict)
    error: str | None = None


class Target:
    """How to start the ollama-meter of one source tree."""

    def __init__(self, src: Path, keepalive_timeout: float) -> None:
        self.src = src
        self.env = source_env(src)  # LookupError if DIR/src has none
        options = subprocess.run(
            [PYTHON, "-m", "ollama_meter", "--help"],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        self.keepalive_timeout = keepalive_timeout if "--keepalive-timeout" in options else None
        self.commit = describe_checkout(src)

    def argv(self, port: int, upstream: str, open_files: int | None) -> list[str]:
        argv = pinned(
            TARGET_CPU,
            PYTHON,
            "-m",
            "ollama_meter",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            upstream,
        )
        if self.keepalive_timeout is not None:
            argv += ["--keepalive-timeout", str(self.keepalive_timeout)]
        if open_files is not None:  # prlimit and taskset exec, so the pid stays the proxy's
            argv = ["prlimit", f"--nofile={open_files}:{open_files}", *argv]
        return argv


def reset_peak(pid: int) -> None:
    """VmHWM back to VmRSS (Linux 4.0+), so the peak is the scenario's, not start-up's."""
    # If refused, the process is still fresh: start-up's peak is below the scenarios' anyway.
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def settled_rss(pid: int, limit: float = 10.0) -> float:
    """VmRSS in MiB once it moved by less than 256 KiB over a second (or after ``limit``)."""
    samples = [rss_kib(pid)]
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(0.2)
        samples.append(rss_kib(pid))
        if len(samples) >= 6 and max(samples[-6:]) - min(samples[-6:]) < 256:
            break
    return samples[-1] / 1024


async def serving(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as client:
        reply = await request(client, "GET", proxy.url + "/-/healthy")
    if reply.status != "200":
        raise RuntimeError(f"GET /-/healthy before the scenario: {reply.status}")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=5)  # requests still in flight would get the drain's 30 s
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(scenario: Scenario, target: Target, workdir: Path) -> Outcome:
    outcome = Outcome(scenario.key, scenario.title, scenario.issue)
    procs: list[subprocess.Popen[bytes]] = []
    log = workdir / f"{scenario.key}.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        upstream_port = free_port()
        procs.append(
            subprocess.Popen(
                pinned(HARNESS_CPU, PYTHON, str(HERE / "hostile_upstream.py"), str(upstream_port)),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_listening(upstream_port)
        upstream = f"http://127.0.0.1:{upstream_port}"
        port = free_port()
        with log.open("wb") as stderr:
            proc = subprocess.Popen(
                target.argv(port, upstream, scenario.open_files),
                env=target.env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        procs.append(proc)
        wait_listening(port)
        proxy = Proxy(f"http://127.0.0.1:{port}", port, proc.pid, upstream)
        asyncio.run(serving(proxy))
        outcome.before_mib = rss_kib(proc.pid) / 1024
        reset_peak(proc.pid)
        outcome.figures = asyncio.run(asyncio.wait_for(scenario.run(proxy), scenario.budget))
    except TimeoutError:
        outcome.error = f"not done within its {scenario.budget:.0f} s budget"
    except Exception as exc:  # the one boundary: report it, go on with the next scenario
        outcome.error = f"{type(exc).__name__}: {exc}"
    finally:
        if proc is not None:
            memory_after(proc, outcome, log)
        stop(procs)
        log.unlink(missing_ok=True)
    return outcome


def memory_after(proc: subprocess.Popen[bytes], outcome: Outcome, log: Path) -> None:
    """Peak and settled RSS, or why there are none: the proxy exited (its last words)."""
    try:
        if proc.poll() is None:
            outcome.peak_mib = rss_kib(proc.pid, "VmHWM") / 1024
            outcome.after_mib = settled_rss(proc.pid)
    except (OSError, KeyError):
        pass  # exited while being read: said below
    died = proc.poll()
    if died is not None:
        tail = log.read_bytes()[-300:].decode(errors="replace").strip()
        outcome.error = f"{outcome.error or ''} proxy exited with {died}: {tail}".strip()


# --- the report -------------------------------------------------------------------------------


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}".rstrip("0").rstrip(".")


def _value(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, dict):
        return ", ".join(f"{k} x{_value(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_value(v) for v in value)
    return str(value)


def describe(figures: Figures) -> str:
    return "; ".join(f"{key.replace('_', ' ')}: {_value(value)}" for key, value in figures.items())


def _mib(value: float | None, before: float | None) -> str:
    if value is None:
        return ""
    if before is None:
        return f"{value:,.1f}"
    return f"{value:,.1f} ({value - before:+,.1f})"


def render(report: dict[str, Any]) -> str:
    keepalive = report["keepalive_timeout"]
    out = [
        "# ollama-meter under hostile clients",
        "",
        f"Run {report['started']} with `{report['command']}`: the ollama-meter of"
        f" `{report['src']}/src`, {report['commit']}; Python {report['python']}, aiohttp"
        f" {report['aiohttp']}, Linux {report['kernel']}; default settings"
        + (f", `--keepalive-timeout {keepalive:g}`." if keepalive is not None else "."),
        "",
        "The proxy's resident set in MiB, a fresh process for each scenario: *before* (idle,"
        " after one health check), *peak* (VmHWM over the scenario), *after* (VmRSS once it"
        " stopped moving, the clients gone); in brackets, the change from *before*.",
        "",
        "| | scenario | before | peak | after | measured | the issue, old code |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in report["scenarios"]:
        measured = describe(o["figures"])
        if o["error"]:
            measured = f"**error**: {o['error']}" + (f"; {measured}" if measured else "")
        before = o["before_mib"]
        out.append(
            f"| {o['key']} | {o['title']} | {_mib(before, None)} | {_mib(o['peak_mib'], before)}"
            f" | {_mib(o['after_mib'], before)} | {measured} | {o['issue']} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=ROOT, help="run the ollama-meter of DIR/src")
    parser.add_argument("--only", help="comma-separated scenarios, e.g. a,f (default: all)")
    parser.add_argument(
        "--keepalive-timeout",
        type=float,
        default=10.0,
        help="passed to targets that have the option (default: 10, the hardened default)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    args = parser.parse_args()
    chosen = [s for s in SCENARIOS if args.only is None or s.key in args.only.split(",")]
    src = args.src.resolve()
    try:
        target = Target(src, args.keepalive_timeout)
    except LookupError as exc:
        sys.exit(str(exc))
    # 1,100 client sockets in scenario g, and the harness on the CPU run.py gives it.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    if int(HARNESS_CPU) in os.sched_getaffinity(0) and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {int(HARNESS_CPU)})
    if any(s.key == "a" for s in chosen):
        gzip_of_zeros()  # five seconds of compression, outside the scenario's budget
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", *sys.argv]),
        "src": str(src),
        "commit": target.commit,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "kernel": platform.release(),
        "keepalive_timeout": target.keepalive_timeout,
        "scenarios": [],
    }
    with tempfile.TemporaryDirectory(prefix="ollama-meter-hostile-") as workdir:
        for scenario in chosen:
            started = time.monotonic()
            outcome = measure(scenario, target, Path(workdir))
            report["scenarios"].append(asdict(outcome))
            before = outcome.before_mib
            print(
                f"{scenario.key} ({time.monotonic() - started:.0f} s) before {_mib(before, None)}"
                f" peak {_mib(outcome.peak_mib, before)} after {_mib(outcome.after_mib, before)}"
                f" MiB; {outcome.error or ''} {describe(outcome.figures)}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    markdown = render(report)
    if args.markdown:
        args.markdown.write_text(markdown)
    print(markdown, end="")


if __name__ == "__main__":
    main()

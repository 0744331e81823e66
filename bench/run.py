"""The benchmark suite: ``python bench/run.py [--quick] [--baseline-src DIR] [--keys N]
[--fleet N] [--limits] [--rounds N] [--json FILE] [--markdown FILE]``.

Every scenario runs each target in turn, round after round, every other round in reverse
order (alternation evens out a noisy machine), and reports medians and the ratio to ``direct``:

- ``direct``: the load generator talks straight to the fake upstream (bench/upstream.py);
- ``ollama-meter``: the real command, default settings (access log on, to /dev/null);
- ``passthrough``: bench/passthrough.py, aiohttp with the same settings and no metering;
- ``nginx``: Debian's nginx, one worker, proxy_buffering off, keep-alive upstream (if installed);
- ``ollama-meter@base`` (with ``--baseline-src DIR``): the ollama-meter of DIR/src, same
  settings, e.g. a ``git worktree`` of an older commit, to compare two versions in one run;
- ``ollama-meter+keys`` (with ``--keys N``): ollama-meter with ``--keys-file`` of N keys
  (bench/keys.py writes it), every request carrying a valid key, the keys in turn
  (bench/wrk/generate_keys.lua); in the request/response scenarios only, as the stream and
  upload clients send no key.
- ``ollama-meter+fleet`` (with ``--fleet N``): ollama-meter in front of N fake upstreams of its
  own (``--upstream`` given N times: u1, u2, ...), each listing the requests' model as loaded
  (upstream.py ``--loaded-for``), so that every request is routed; request/response only.
- ``ollama-meter+ledger`` (with ``--ledger``): ollama-meter with ``--ledger`` on a SQLite file
  in the run's temporary directory (the usage ledger, flushed every 10 s); request/response
  only. bench/ledger_flush.py times a flush of 10,000 rows on its own.
- ``ollama-meter+limits`` and ``ollama-meter+limits-rpm`` (with ``--limits``): ollama-meter
  with ``--config`` of a ``[limits]`` table so generous that nothing is refused (rpm and tpm
  10^9, concurrency 1000; the second with tpm off) and ``--slots 1000``, so that every request
  goes through the limit and admit steps and none waits; request/response only. At the end
  their /metrics are read: ``rejected_total`` must be 0 and ``queue_wait_seconds_count`` not.
  ``ollama-meter+slots`` beside them: ``--slots 1000`` alone (the admit step, no limits).

Pinning (2 cores): the target under test runs alone on CPU 0; the upstream and the load
generator share CPU 1, for every target, direct included. Load: wrk (C) for request/response
scenarios; bench/stream_client.py (aiohttp on uvloop) for streams and uploads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
TARGET_CPU = "0"
HARNESS_CPU = "1"
MiB = 1024 * 1024

NGINX_CONF = """
worker_processes 1;
worker_cpu_affinity 01;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    upstream ollama {{ server 127.0.0.1:{upstream}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
            client_max_body_size 0;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def pinned(cpu: str, *argv: str) -> list[str]:
    return ["taskset", "-c", cpu, *argv]


def steal_ticks() -> tuple[int, int]:
    """(steal, total) jiffies from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[7], sum(fields[:8])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (steal is not in it)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def source_env(src: Path) -> dict[str, str]:
    """The environment that runs the ollama-meter of ``src``/src (PYTHONPATH), checked: with
    none there, the venv's own install would answer the import without a word."""
    env = {**os.environ, "PYTHONPATH": str(src / "src")}
    found = subprocess.run(
        [PYTHON, "-c", "import ollama_meter; print(ollama_meter.__file__)"],
        env=env,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not found or not Path(found).resolve().is_relative_to(src.resolve() / "src"):
        raise LookupError(f"no ollama-meter in {src}/src (Python finds {found or 'none'})")
    return env


def describe_checkout(src: Path) -> str:
    """``abc1234 (subject)`` of a git checkout, and whether it has uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(src), *args], capture_output=True, text=True
        ).stdout.strip()

    commit = git("log", "-1", "--format=%h (%s)")
    if not commit:
        return "not a git checkout"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " with uncommitted changes"
    return commit


def endpoints_of(env: dict[str, str] | None) -> list[str]:
    """The endpoint labels (ollama.ENDPOINTS) of the ollama-meter that ``env`` runs."""
    listing = "import json; from ollama_meter.ollama import ENDPOINTS; print(json.dumps(ENDPOINTS))"
    out = subprocess.run(
        [PYTHON, "-c", listing], env=env, capture_output=True, text=True, check=True
    ).stdout
    endpoints: list[str] = json.loads(out)
    return endpoints


#: The name of the --baseline-src target.
BASELINE = "ollama-meter@base"
#: The name of the --keys target.
KEYED = "ollama-meter+keys"
#: The name of the --fleet target.
FLEET = "ollama-meter+fleet"
#: The name of the --ledger target.
LEDGER = "ollama-meter+ledger"
#: How long the fleet's upstreams say their models stay loaded (upstream.py --loaded-for):
#: longer than any run, so that the router sees them hot throughout.
FLEET_LOADED_FOR = 86400.0
#: The names of the --limits targets: rpm, tpm and concurrency; the same with tpm off.
LIMITED = "ollama-meter+limits"
LIMITED_RPM = "ollama-meter+limits-rpm"
SLOTTED = "ollama-meter+slots"
#: Limits no run reaches: c=64 is at most some 6,000 requests/s of 37 tokens each (upstream.py's
#: non-streamed generate), about 1.3 x 10^7 tokens a minute; a slot for every connection.
GENEROUS = {"default_rpm": 10**9, "default_tpm": 10**9, "default_concurrency": 1000}
GENEROUS_SLOTS = 1000


@dataclass
class Target:
    name: str
    url: str
    pid: int | None  # None for direct: nothing of ours in between
    #: The file of the keys (one a line) its requests carry in turn (the --keys target);
    #: None: its requests carry no key.
    keys: Path | None = None
    #: Takes part in the stream scenarios (the --keys and --fleet targets do not).
    streams: bool = True


def _utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


@dataclass
class Results:
    started: str = field(default_factory=_utc_now)
    machine: dict[str, str] = field(default_factory=dict)
    #: scenario -> target -> measure -> one value per round
    scenarios: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    steal_percent: float = 0.0
    #: --baseline-src: {"src": DIR, "commit": ...}; empty without one
    baseline: dict[str, str] = field(default_factory=dict)
    #: --keys: how many keys the keys target's file holds; 0 without it
    keys: int = 0
    #: --fleet: how many upstreams the fleet target fronts; 0 without it
    fleet: int = 0
    #: --fleet: the fleet target's routing_decisions_total at the end, "upstream decision" ->
    #: count (where its requests went, and the model's state there)
    decisions: dict[str, float] = field(default_factory=dict)
    #: --limits: whether the limits targets were on
    limits: bool = False
    #: --limits: each limits target's rejected_total samples and queue_wait_seconds_count at
    #: the end (the check that nothing was refused and everything was admitted)
    admission: dict[str, dict[str, float]] = field(default_factory=dict)

    def record(self, scenario: str, target: str, values: dict[str, float]) -> None:
        measures = self.scenarios.setdefault(scenario, {}).setdefault(target, {})
        for key, value in values.items():
            measures.setdefault(key, []).append(value)

    def medians(self) -> dict[str, dict[str, dict[str, float]]]:
        return {
            scenario: {
                target: {k: statistics.median(v) for k, v in values.items()}
                for target, values in targets.items()
            }
            for scenario, targets in self.scenarios.items()
        }


class Bench:
    def __init__(
        self,
        quick: bool,
        baseline_env: dict[str, str] | None = None,
        keys: int = 0,
        rounds: int | None = None,
        fleet: int = 0,
        ledger: bool = False,
        limits: bool = False,
    ) -> None:
        self.ledger = ledger
        self.quick = quick
        self.limits = limits
        self.baseline_env = baseline_env
        self.keys = keys
        self.fleet = fleet
        self.rounds = 2 if quick else 3
        #: Rounds of the request/response scenarios (short and many, see run).
        self.many = rounds or (3 if quick else 7)
        self.dir = Path(tempfile.mkdtemp(prefix="ollama-meter-bench-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.results = Results(keys=keys, fleet=fleet, limits=limits)
        #: The fleet target's upstreams, started once (start_fleet).
        self.fleet_upstreams: list[str] = []

    # --- processes ------------------------------------------------------------------------

    def spawn(self, argv: list[str], port: int, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs
        )
        self.procs.append(proc)
        wait_listening(port)
        return proc

    def stop(self, procs: list[subprocess.Popen[bytes]]) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for proc in procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        self.stop(list(self.procs))
        shutil.rmtree(self.dir, ignore_errors=True)

    def start_upstream(self, models: int = 3, *options: str) -> str:
        port = free_port()
        self.spawn(
            pinned(
                HARNESS_CPU,
                PYTHON,
                str(HERE / "upstream.py"),
                str(port),
                "--models",
                str(models),
                *options,
            ),
            port,
        )
        return f"http://127.0.0.1:{port}"

    def start_meter(
        self, name: str, upstream: str, env: dict[str, str] | None, *options: str
    ) -> Target:
        """ollama-meter with default settings; ``env`` (source_env) picks another tree's."""
        port = free_port()
        argv = ["-m", "ollama_meter", "--listen", f"127.0.0.1:{port}", "--upstream", upstream]
        meter = self.spawn(pinned(TARGET_CPU, PYTHON, *argv, *options), port, env=env)
        return Target(name, f"http://127.0.0.1:{port}", meter.pid)

    def start_keyed(self, upstream: str) -> Target:
        """ollama-meter with a keys file of ``self.keys`` keys (written once, bench/keys.py);
        its Target names the file of the keys themselves, for the load generator."""
        keys_file, key_list = self.dir / "keys.toml", self.dir / "keys.txt"
        if not keys_file.exists():
            from keys import write_keys_file

            key_list.write_text("\n".join(write_keys_file(keys_file, self.keys)) + "\n")
        target = self.start_meter(KEYED, upstream, None, "--keys-file", str(keys_file))
        target.keys = key_list
        target.streams = False
        return target

    def start_fleet(self) -> Target:
        """ollama-meter in front of ``self.fleet`` fake upstreams of its own (started once, on
        the harness's core like the other one), each listing the requests' model as loaded."""
        if not self.fleet_upstreams:
            loaded = ("--loaded-for", str(FLEET_LOADED_FOR))
            self.fleet_upstreams = [self.start_upstream(3, *loaded) for _ in range(self.fleet)]
        first, *others = self.fleet_upstreams
        options = [arg for url in others for arg in ("--upstream", url)]
        target = self.start_meter(FLEET, first, None, *options)
        target.streams = False
        return target

    def start_limited(self, name: str, upstream: str, tpm: bool, limits: bool = True) -> Target:
        """ollama-meter with generous ``[limits]`` (tpm off unless ``tpm``; none without
        ``limits``) and --slots."""
        config = self.dir / f"{name}.toml"
        table = {**GENEROUS, **({} if tpm else {"default_tpm": 0})} if limits else {}
        config.write_text("[limits]\n" + "".join(f"{k} = {v}\n" for k, v in table.items()))
        target = self.start_meter(
            name, upstream, None, "--config", str(config), "--slots", str(GENEROUS_SLOTS)
        )
        target.streams = False
        return target

    def start_targets(self, upstream: str, extras: bool = True) -> list[Target]:
        """direct and every proxy; with ``extras``, the --keys and --fleet targets too."""
        upstream_port = int(upstream.rsplit(":", 1)[1])
        targets = [Target("direct", upstream, None)]
        targets.append(self.start_meter("ollama-meter", upstream, None))
        if self.keys and extras:  # beside ollama-meter too: the pair the --keys ratio compares
            targets.append(self.start_keyed(upstream))
        if self.fleet and extras:  # the same: ollama-meter is the single-upstream figure
            targets.append(self.start_fleet())
        if self.ledger and extras:  # the same: the pair the --ledger ratio compares
            ledger = self.start_meter(
                LEDGER, upstream, None, "--ledger", str(self.dir / "usage.sqlite")
            )
            ledger.streams = False
            targets.append(ledger)
        if self.limits and extras:  # the same: ollama-meter is the figure without limits
            targets.append(self.start_limited(LIMITED, upstream, tpm=True))
            targets.append(self.start_limited(LIMITED_RPM, upstream, tpm=False))
            targets.append(self.start_limited(SLOTTED, upstream, tpm=False, limits=False))
        if self.baseline_env is not None:  # beside ollama-meter: its neighbour in every round
            targets.append(self.start_meter(BASELINE, upstream, self.baseline_env))
        port = free_port()
        bare = self.spawn(
            pinned(TARGET_CPU, PYTHON, str(HERE / "passthrough.py"), str(port), upstream), port
        )
        targets.append(Target("passthrough", f"http://127.0.0.1:{port}", bare.pid))
        nginx = shutil.which("nginx")
        if nginx:
            port = free_port()
            conf = self.dir / "nginx.conf"
            conf.write_text(NGINX_CONF.format(dir=self.dir, upstream=upstream_port, port=port))
            proc = self.spawn(pinned(TARGET_CPU, nginx, "-p", str(self.dir), "-c", str(conf)), port)
            time.sleep(0.3)
            workers = subprocess.run(
                ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
            ).stdout.split()
            targets.append(
                Target(
                    "nginx", f"http://127.0.0.1:{port}", int(workers[0]) if workers else proc.pid
                )
            )
        return targets

    # --- load generators ------------------------------------------------------------------

    def wrk(
        self, target: Target, connections: int, seconds: int, latency: bool = False
    ) -> dict[str, float]:
        """requests/s (and latency percentiles), and the target's CPU time per request."""
        url = target.url
        script, env = "generate.lua", None
        if target.keys is not None:  # the same request, with the next key each time
            script, env = "generate_keys.lua", {**os.environ, "BENCH_KEYS": str(target.keys)}
        argv = pinned(
            HARNESS_CPU,
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "-s",
            str(HERE / "wrk" / script),
        )
        if latency:
            argv.append("--latency")
        cpu0 = cpu_seconds(target.pid) if target.pid else 0.0
        out = subprocess.run(
            [*argv, url + "/api/generate"], capture_output=True, text=True, check=True, env=env
        ).stdout
        cpu1 = cpu_seconds(target.pid) if target.pid else 0.0
        result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
        if target.pid:
            requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
            result["cpu_us_per_request"] = 1e6 * (cpu1 - cpu0) / max(1, requests)
        if latency:
            for pct in ("50", "99"):
                match = re.search(rf"\s{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)\b", out)
                assert match, out
                value, unit = float(match.group(1)), match.group(2)
                result[f"p{pct}_us"] = value * {"us": 1, "ms": 1000, "s": 1e6}[unit]
        if target.name in (LIMITED, LIMITED_RPM, SLOTTED):
            # Their stalls (the windows' upkeep) can pass wrk's 2 s timeout: counted, not fatal.
            timeouts = re.search(r"Socket errors: connect 0, read 0, write 0, timeout (\d+)", out)
            result["timeouts"] = 0.0
            if timeouts is not None:
                result["timeouts"] = float(timeouts.group(1))
                out = out.replace(timeouts.group(0), "")
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
        assert errors is None, out
        return result

    def streams(self, url: str, streams: int, lines: int, delay_ms: int) -> dict[str, float]:
        argv = pinned(
            HARNESS_CPU,
            PYTHON,
            str(HERE / "stream_client.py"),
            url,
            str(streams),
            str(lines),
            str(delay_ms),
        )
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        data: dict[str, float] = json.loads(out.strip().splitlines()[-1])
        assert data["lines"] == streams * lines, data
        return data

    # --- scenarios ------------------------------------------------------------------------

    def alternate(
        self,
        targets: list[Target],
        name: str,
        measure: Callable[[Target], dict[str, float]],
        rounds: int | None = None,
    ) -> None:
        for round_ in range(rounds or self.rounds):
            # Every other round in reverse: a fixed order measured the second of two identical
            # passthroughs 13% slower (paired 3 s windows, median of 6), reversing cancels that.
            for target in targets if round_ % 2 == 0 else targets[::-1]:
                self.results.record(name, target.name, measure(target))
                last = {k: v[-1] for k, v in self.results.scenarios[name][target.name].items()}
                print(f"  {name:22s} {target.name:13s} {last}", flush=True)

    def run(self, only: set[str]) -> Results:
        upstream = self.start_upstream()
        steal0 = steal_ticks()
        if "memory" in only:
            # Processes of its own, fresh so that "idle" means idle. Its 1,000 streams leave
            # about as many idle upstream connections in each aiohttp pool, and aiohttp reuses
            # the oldest first (FIFO since 3.11), so under load every one of them stays warm:
            # the scenarios below would measure a pool no other scenario has.
            mark = len(self.procs)
            for target in self.start_targets(upstream, extras=False)[1:]:
                self.wrk(target, 64, 1)  # warm-up: connections, code paths
                self.results.record("4 memory", target.name, asyncio.run(self.memory(target)))
                print(
                    f"  4 memory {target.name}: {self.results.scenarios['4 memory'][target.name]}",
                    flush=True,
                )
            self.stop(self.procs[mark:])
        targets = self.start_targets(upstream)
        for target in targets:  # warm-up: connections, code paths
            self.wrk(target, 64, 1)
        # Request/response rounds are short and many: the machine drifts by tens of percent
        # over seconds, and the report pairs each ollama-meter round with its neighbours'.
        short, many = (2 if self.quick else 3), self.many
        if "latency" in only:
            self.alternate(
                targets,
                "1 latency c=1",
                lambda t: self.wrk(t, 1, short, latency=True),
                rounds=many,
            )
        if "throughput" in only:
            self.alternate(
                targets, "2 throughput c=64", lambda t: self.wrk(t, 64, short), rounds=many
            )
        if "streaming" in only:
            lines = 128 if self.quick else 256
            streamed = [t for t in targets if t.streams]  # not the --keys, --fleet targets
            self.alternate(
                streamed, "3a streams paced", lambda t: self.streams(t.url, 500, lines, 20)
            )
            self.alternate(
                streamed, "3b streams unpaced", lambda t: self.streams(t.url, 500, lines, 0)
            )
            self.alternate(streamed, "3c burst ttfb", lambda t: self.streams(t.url, 200, 16, 0))
        fleet = next((t for t in targets if t.name == FLEET), None)
        if fleet is not None:
            self.results.decisions = routing_decisions(fleet.url)
            print(f"  {FLEET} routing decisions: {self.results.decisions}", flush=True)
        for target in targets:
            if target.name in (LIMITED, LIMITED_RPM, SLOTTED):
                self.results.admission[target.name] = admission_check(target.url)
                print(f"  {target.name}: {self.results.admission[target.name]}", flush=True)
        steal1 = steal_ticks()
        self.results.steal_percent = 100 * (steal1[0] - steal0[0]) / max(1, steal1[1] - steal0[1])
        if "scrape" in only:
            meters: dict[str, dict[str, str] | None] = {"ollama-meter": None}
            if self.baseline_env is not None:
                meters[BASELINE] = self.baseline_env
            for name, env in meters.items():
                scrape = self.scrape(env, endpoints_of(env))
                self.results.record("5 scrape", name, asyncio.run(scrape))
        return self.results

    async def memory(self, target: Target) -> dict[str, float]:
        """RSS of the target: idle, with 1,000 open streams, and during a 2 GiB upload."""
        assert target.pid is not None
        idle = rss_kib(target.pid)
        holder = await asyncio.create_subprocess_exec(
            *pinned(
                HARNESS_CPU,
                PYTHON,
                str(HERE / "stream_client.py"),
                target.url,
                "1000",
                "3",
                "2000",
                "--hold",
            ),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert holder.stdout is not None
        assert holder.stdin is not None
        await holder.stdout.readline()  # {"open": 1000}: every stream has its first line
        open_rss = rss_kib(target.pid)
        holder.stdin.write(b"\n")
        await holder.stdin.drain()
        holder.stdin.close()
        await holder.wait()
        size = (512 if self.quick else 2048) * MiB
        before = rss_kib(target.pid)
        peak = before
        piece = b"\0" * MiB
        sent = 0

        async def body() -> Any:
            nonlocal sent, peak
            while sent < size:
                yield piece
                sent += len(piece)
                if sent % (64 * MiB) == 0:
                    peak = max(peak, rss_kib(target.pid))  # type: ignore[arg-type]

        async with (
            aiohttp.ClientSession() as session,
            session.post(target.url + "/api/blobs/sha256:" + "0" * 64, data=body()) as response,
        ):
            assert response.status == 201, response.status
        return {
            "idle_mib": idle / 1024,
            "per_stream_kib": (open_rss - idle) / 1000,
            "upload_growth_mib": (peak - before) / 1024,
            "upload_gib": size / 1024 / MiB,
        }

    async def scrape(self, env: dict[str, str] | None, endpoints: list[str]) -> dict[str, float]:
        """GET /metrics with 100 models x every endpoint populated (the endpoints of the
        ollama-meter that ``env`` runs)."""
        upstream = self.start_upstream(models=100)
        port = free_port()
        proc = self.spawn(
            pinned(TARGET_CPU, PYTHON, "-m", "ollama_meter", "--listen", f"127.0.0.1:{port}",
                   "--upstream", upstream, "--no-access-log"),
            port,
            env=env,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        paths = [
            e.replace("{digest}", "sha256:" + "0" * 64)
            .replace("{model}", "m")
            .replace("{key}", "k")
            for e in endpoints
        ]
        paths = [p if p != "other" else "/elsewhere" for p in paths]
        models = ["llama3.2"] + [f"bench-{i:03d}" for i in range(1, 100)]
        async with aiohttp.ClientSession() as session:
            sem = asyncio.Semaphore(32)

            async def hit(path: str, model: str, stream: bool) -> None:
                body = json.dumps({"model": model, "stream": stream, "prompt": "x"}).encode()
                async with (
                    sem,
                    session.post(url + path, data=body, headers={"X-Bench-Lines": "2"}) as r,
                ):
                    await r.read()

            await asyncio.gather(
                *(hit(p, m, s) for p in paths for m in models for s in (True, False))
            )
            times = []
            size = 0
            for _ in range(20):
                start = time.perf_counter()
                async with session.get(url + "/metrics") as response:
                    size = len(await response.read())
                times.append((time.perf_counter() - start) * 1000)
        series = sum(
            1 for line in (await self._text(url)).splitlines() if line.startswith("ollama_meter_")
        )
        proc.terminate()
        return {
            "p50_ms": statistics.median(times),
            "max_ms": max(times),
            "bytes": size,
            "series": series,
        }

    async def _text(self, url: str) -> str:
        async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
            return await response.text()


def routing_decisions(url: str) -> dict[str, float]:
    """``ollama_meter_routing_decisions_total`` of a fleet proxy: "upstream decision" -> count."""
    from urllib.request import urlopen

    with urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ollama_meter_routing_decisions_total{"):
            labels, value = line.rsplit(" ", 1)
            pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            found[f"{pairs.get('upstream')} {pairs.get('decision')}"] = float(value)
    return found


def admission_check(url: str) -> dict[str, float]:
    """A limits target's /metrics at the end: every ``rejected_total`` sample (by its labels;
    none is the expected answer) and ``queue_wait_seconds_count`` summed over models."""
    from urllib.request import urlopen

    with urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    found: dict[str, float] = {"queue_wait_seconds_count": 0.0}
    for line in text.splitlines():
        if line.startswith("ollama_meter_rejected_total"):
            labels, value = line.rsplit(" ", 1)
            found[labels.removeprefix("ollama_meter_")] = float(value)
        elif line.startswith("ollama_meter_queue_wait_seconds_count"):
            found["queue_wait_seconds_count"] += float(line.rsplit(" ", 1)[1])
    return found


def machine() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True)
        except FileNotFoundError:
            return "not installed"
        return (out.stdout + out.stderr).strip().splitlines()[0]

    import aiohttp as aio

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    try:
        uvloop_version = package_version("uvloop")
    except PackageNotFoundError:
        uvloop_version = "not installed"
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aio.__version__,
        "prometheus_client": package_version("prometheus-client"),
        "uvloop": uvloop_version,
        "wrk": version(["wrk", "--version"]),
        "nginx": version(["nginx", "-v"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter runs")
    parser.add_argument("--json", type=Path, help="write raw results here")
    parser.add_argument("--markdown", type=Path, help="write the report (docs/benchmarks.md)")
    parser.add_argument(
        "--baseline-src",
        type=Path,
        metavar="DIR",
        help=f"add {BASELINE}: the ollama-meter of DIR/src, alternated with the others",
    )
    parser.add_argument(
        "--keys",
        type=int,
        default=0,
        metavar="N",
        help=f"add {KEYED}: ollama-meter with a keys file of N keys, every request keyed",
    )
    parser.add_argument(
        "--fleet",
        type=int,
        default=0,
        metavar="N",
        help=f"add {FLEET}: ollama-meter in front of N fake upstreams, every request routed",
    )
    parser.add_argument(
        "--ledger",
        action="store_true",
        help=f"add {LEDGER}: ollama-meter with the usage ledger on (SQLite)",
    )
    parser.add_argument(
        "--limits",
        action="store_true",
        help=f"add {LIMITED}, {LIMITED_RPM}, {SLOTTED}: generous [limits] (tpm on, off, none) "
        "and --slots",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        metavar="N",
        help="rounds of the request/response scenarios (7; 3 with --quick)",
    )
    parser.add_argument(
        "--only",
        default="latency,throughput,streaming,memory,scrape",
        help="comma-separated scenarios",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        sys.exit("needs wrk and taskset: apt-get install wrk util-linux (and nginx to compare)")
    baseline_env = None
    if args.baseline_src:
        try:
            baseline_env = source_env(args.baseline_src)
        except LookupError as exc:
            sys.exit(str(exc))
    if args.fleet == 1 or args.fleet < 0:
        sys.exit("--fleet N: N >= 2 (one --upstream is the single-server proxy, ollama-meter)")
    bench = Bench(
        args.quick,
        baseline_env,
        args.keys,
        args.rounds,
        args.fleet,
        ledger=args.ledger,
        limits=args.limits,
    )
    bench.results.machine = machine()
    if args.baseline_src:
        bench.results.baseline = {
            "src": str(args.baseline_src.resolve()),
            "commit": describe_checkout(args.baseline_src),
        }
    try:
        results = bench.run(set(args.only.split(",")))
    finally:
        bench.stop_all()
    medians = results.medians()
    report = {
        "started": results.started,
        "machine": results.machine,
        "steal_percent": results.steal_percent,
        "baseline": results.baseline,
        "keys": results.keys,
        "fleet": results.fleet,
        "decisions": results.decisions,
        "limits": results.limits,
        "admission": results.admission,
        "medians": medians,
        "raw": results.scenarios,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        from report import render

        args.markdown.write_text(render(report, " ".join(sys.argv)))


if __name__ == "__main__":
    main()

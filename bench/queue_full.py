"""How fast a full queue says no: ``python bench/queue_full.py [--requests N] [--json FILE]``.

Starts bench/upstream.py and ollama-meter with ``--slots 1`` and ``[limits] max_queue = 0``
(pinned as run.py pins them: the proxy alone on CPU 0, the upstream and this client on CPU 1),
then holds one slow stream open so that the model's only slot is taken (upstream.py paces its
lines, ``X-Bench-Delay-Ms``), and times, one after another over one keep-alive connection:

- ``refused``: N small non-streamed ``POST /api/generate`` for the same model, each answered
  503 at once by the proxy (no slot, no room to wait);
- ``proxied``: N ``GET /api/version`` through the proxy (no model, so no admission step), the
  cheapest request the proxy sends up, for comparison;
- ``direct``: N ``GET /api/version`` straight to the upstream: this client's own floor.

Per request: wall time at the client, from the request's first byte to its whole body, reported
as p50, p99 and the mean, in µs, and the proxy's CPU time per request over each batch. After a
warm-up of N/10 of each, the three batches are interleaved in rounds (``--rounds``), every
other round in reverse, and each figure is the median over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from run import (
    HARNESS_CPU,
    HERE,
    PYTHON,
    TARGET_CPU,
    cpu_seconds,
    free_port,
    pinned,
    steal_ticks,
    wait_listening,
)

BODY = b'{"model":"llama3.2","prompt":"Why is the sky blue?","stream":false}'
#: The held stream: 600 lines, 100 ms apart, a minute at most (it is closed at the end).
HOLD_HEADERS = {"X-Bench-Lines": "600", "X-Bench-Delay-Ms": "100"}
HOLD_BODY = b'{"model":"llama3.2","prompt":"hold the slot"}'


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


async def timed(
    session: aiohttp.ClientSession, method: str, url: str, n: int, want: int, **kwargs: object
) -> list[float]:
    times: list[float] = []
    clock = time.perf_counter
    for _ in range(n):
        start = clock()
        async with session.request(method, url, **kwargs) as response:  # type: ignore[arg-type]
            await response.read()
        times.append((clock() - start) * 1e6)
        assert response.status == want, (url, response.status, want)
    return times


async def measure(meter: str, upstream: str, pid: int, n: int, rounds: int) -> dict[str, object]:
    # One connection each, kept alive: every request after the first reuses it.
    proxy_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
    hold_session = aiohttp.ClientSession()
    direct_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
    async with proxy_session, hold_session, direct_session:
        held = await hold_session.post(
            meter + "/api/generate", data=BODY.replace(b',"stream":false', b""),
            headers=HOLD_HEADERS,
        )  # fmt: skip
        assert held.status == 200, held.status
        await held.content.readline()  # the first line: the slot is taken
        batches: dict[str, Callable[[int], Awaitable[list[float]]]] = {
            "refused": lambda k: timed(
                proxy_session, "POST", meter + "/api/generate", k, 503, data=BODY
            ),
            "proxied": lambda k: timed(proxy_session, "GET", meter + "/api/version", k, 200),
            "direct": lambda k: timed(direct_session, "GET", upstream + "/api/version", k, 200),
        }
        for batch in batches.values():  # warm-up
            await batch(max(1, n // 10))
        sample = await proxy_session.post(meter + "/api/generate", data=BODY)
        refusal = {
            "status": sample.status,
            "retry_after": sample.headers.get("Retry-After"),
            "connection": sample.headers.get("Connection", "keep-alive"),
            "body": (await sample.text())[:200],
        }
        sample.release()
        per_round: dict[str, dict[str, list[float]]] = {name: {} for name in batches}
        order = list(batches)
        for round_ in range(rounds):
            for name in order if round_ % 2 == 0 else order[::-1]:
                cpu0 = cpu_seconds(pid)
                times = await batches[name](n)
                cpu = (cpu_seconds(pid) - cpu0) * 1e6 / n
                figures = {
                    "p50_us": statistics.median(times),
                    "p99_us": percentile(times, 99),
                    "mean_us": statistics.fmean(times),
                    "proxy_cpu_us": cpu,
                }
                for key, value in figures.items():
                    per_round[name].setdefault(key, []).append(value)
                print(f"  round {round_} {name:8s} " + json.dumps(figures), flush=True)
        held.close()
    result: dict[str, object] = {
        name: {key: statistics.median(values) for key, values in measures.items()}
        for name, measures in per_round.items()
    }
    result["refusal"] = refusal
    result["raw"] = per_round
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, metavar="N", help="per batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    procs = []
    workdir = Path(tempfile.mkdtemp(prefix="ollama-meter-queue-full-"))
    config = workdir / "limits.toml"
    config.write_text("[limits]\nmax_queue = 0\n")
    steal0 = steal_ticks()
    try:
        up_port, meter_port = free_port(), free_port()
        procs.append(
            subprocess.Popen(
                pinned(HARNESS_CPU, PYTHON, str(HERE / "upstream.py"), str(up_port)),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_listening(up_port)
        upstream = f"http://127.0.0.1:{up_port}"
        argv = [PYTHON, "-m", "ollama_meter", "--listen", f"127.0.0.1:{meter_port}",
                "--upstream", upstream, "--slots", "1", "--config", str(config)]  # fmt: skip
        meter = subprocess.Popen(
            pinned(TARGET_CPU, *argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        procs.append(meter)
        wait_listening(meter_port)
        result = asyncio.run(
            measure(f"http://127.0.0.1:{meter_port}", upstream, meter.pid, args.requests,
                    args.rounds)
        )  # fmt: skip
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
    steal1 = steal_ticks()
    result["steal_percent"] = 100 * (steal1[0] - steal0[0]) / max(1, steal1[1] - steal0[1])
    result["requests"], result["rounds"] = args.requests, args.rounds
    print(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Streaming load client for the benchmark: ``python bench/stream_client.py URL STREAMS LINES
DELAY_MS [--hold]``; prints one JSON object.

Opens STREAMS concurrent ``POST /api/chat`` streams at once against URL (the fake upstream
directly, or a proxy in front of it), each of LINES lines paced DELAY_MS apart by the upstream.
For every line it takes the upstream's CLOCK_MONOTONIC stamp ("t") and its own arrival time on
the same clock; the difference is the line's delay (kernel, proxy and parsing). Also time to
first byte per stream and lines per second overall. ``--hold``: once every stream has its first
line, print {"open": N} and wait for a line on stdin before reading on (memory measurement).
Runs on uvloop; parsing is a byte search, not JSON, to keep the client out of the way.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time

import aiohttp
import uvloop

_now = time.monotonic_ns
BODY = b'{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true}'


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    url, streams, lines, delay_ms = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    hold = "--hold" in sys.argv
    delays: list[int] = []
    ttfb: list[float] = []
    received = 0
    first_lines = 0
    all_open = asyncio.Event()
    release = asyncio.Event()
    headers = {"X-Bench-Lines": str(lines), "X-Bench-Delay-Ms": delay_ms}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal received, first_lines
        start = _now()
        async with session.post(url + "/api/chat", data=BODY, headers=headers) as response:
            first = True
            async for line in response.content:
                now = _now()
                if first:
                    ttfb.append((now - start) / 1e6)
                    first = False
                    first_lines += 1
                    if first_lines == streams:
                        all_open.set()
                    if hold:
                        await release.wait()
                at = line.find(b'"t":')
                if at >= 0:
                    delays.append(now - int(line[at + 4 : line.index(b"}", at)]))
                received += 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        tasks = [asyncio.create_task(one(session)) for _ in range(streams)]
        if hold:
            await all_open.wait()
            print(json.dumps({"open": streams}), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            release.set()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    delays_us = [d / 1000 for d in delays]
    print(
        json.dumps(
            {
                "streams": streams,
                "lines": received,
                "seconds": elapsed,
                "lines_per_s": received / elapsed,
                "delay_us_p50": percentile(delays_us, 0.5),
                "delay_us_p99": percentile(delays_us, 0.99),
                "delay_us_mean": statistics.fmean(delays_us) if delays_us else float("nan"),
                "ttfb_ms_p50": percentile(ttfb, 0.5),
                "ttfb_ms_p99": percentile(ttfb, 0.99),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    uvloop.run(main())

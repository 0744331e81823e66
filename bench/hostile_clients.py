"""The hostile clients of bench/hostile.py, one coroutine per scenario (SCENARIOS).

Each gets the proxy under test (and its upstream, bench/hostile_upstream.py) and returns what
it measured, as plain JSON values. A failed request is an outcome to report (its status, or
the exception's name), never an exception: only a broken harness raises. The proxy's memory
is measured around these by hostile.py, which knows nothing of what a scenario does.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Final

import aiohttp
import orjson
from run import rss_kib

MiB: Final = 1024 * 1024
JSON_HEADERS: Final = {"Content-Type": "application/json"}
MESSAGES: Final = [{"role": "user", "content": "Why is the sky blue?"}]
#: The probes a /metrics scrape may send upstream.
PROBES: Final = ("/api/version", "/api/ps", "/api/tags")
Figures = dict[str, object]


@dataclass
class Proxy:
    """The ollama-meter process under test, and its upstream."""

    url: str
    port: int
    pid: int
    upstream: str


@dataclass
class Reply:
    status: str  # the HTTP status, or what went wrong instead
    seconds: float
    size: int  # body bytes received


async def request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request, its body counted and dropped; a failure is its outcome, not an error."""
    start = time.perf_counter()
    size = 0
    try:
        async with session.request(method, url, data=data, headers=headers) as response:
            status = str(response.status)
            async for chunk in response.content.iter_chunked(MiB):
                size += len(chunk)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        status = type(exc).__name__
    return Reply(status, time.perf_counter() - start, size)


def tally(outcomes: Iterable[str]) -> dict[str, int]:
    return dict(Counter(outcomes).most_common())


def session(seconds: float = 120, force_close: bool = False) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=force_close),
        timeout=aiohttp.ClientTimeout(total=seconds),
    )


# --- the scenarios ----------------------------------------------------------------------------


@cache
def gzip_of_zeros(size: int = 1024 * MiB) -> bytes:
    compressor = zlib.compressobj(wbits=31)  # a gzip member
    zeros = bytes(MiB)
    return b"".join([compressor.compress(zeros) for _ in range(size // MiB)] + [compressor.flush()])


async def gzip_bomb(proxy: Proxy) -> Figures:
    """a. One gzip-encoded generate request, 1 GiB of zeros; health checks meanwhile."""
    body = gzip_of_zeros()
    headers = {**JSON_HEADERS, "Content-Encoding": "gzip"}
    healthy: list[float] = []
    async with session() as client:
        post = asyncio.create_task(
            request(client, "POST", proxy.url + "/api/generate", data=body, headers=headers)
        )
        while not post.done():
            reply = await request(client, "GET", proxy.url + "/-/healthy")
            healthy.append(reply.seconds * 1000)
            await asyncio.wait({post}, timeout=0.05)
        reply = post.result()
    return {
        "body_bytes": len(body),
        "status": reply.status,
        "seconds": reply.seconds,
        "healthy_probes": len(healthy),
        "healthy_slowest_ms": max(healthy),
    }


async def long_model_names(proxy: Proxy) -> Figures:
    """b. Ten chats, each naming a different 1 MiB model; then one scrape."""
    bodies = [
        orjson.dumps({"model": f"m{i}-" + "x" * MiB, "messages": MESSAGES}) for i in range(10)
    ]
    async with session() as client:
        replies = await asyncio.gather(
            *(
                request(client, "POST", proxy.url + "/api/chat", data=b, headers=JSON_HEADERS)
                for b in bodies
            )
        )
        posted_rss = rss_kib(proxy.pid) / 1024
        scrape = await request(client, "GET", proxy.url + "/metrics")
    return {
        "posts": tally(r.status for r in replies),
        "rss_after_posts_mib": posted_rss,
        "scrape": scrape.status,
        "metrics_bytes": scrape.size,
        "scrape_seconds": scrape.seconds,
    }


async def padded_names(proxy: Proxy) -> Figures:
    """c. Forty chats naming ``llama3.2`` (a model the upstream lists) and 5 MiB of spaces,
    each a space more than the one before: forty spellings of one known model."""
    limit = asyncio.Semaphore(4)

    async def one(client: aiohttp.ClientSession, i: int) -> Reply:
        async with limit:
            name = "llama3.2" + " " * (5 * MiB + i)
            body = orjson.dumps({"model": name, "messages": MESSAGES})
            return await request(
                client, "POST", proxy.url + "/api/chat", data=body, headers=JSON_HEADERS
            )

    async with session() as client:
        replies = await asyncio.gather(*(one(client, i) for i in range(40)))
    return {"posts": tally(r.status for r in replies)}


async def big_bodies(proxy: Proxy) -> Figures:
    """d. Eight chats at once, each a 60 MiB JSON body (an image) with Content-Length."""
    head = orjson.dumps({"model": "llama3.2", "messages": MESSAGES})[:-1] + b',"images":["'
    tail = b'"]}'
    body = head + b"A" * (60 * MiB - len(head) - len(tail)) + tail
    async with session() as client:
        replies = await asyncio.gather(
            *(
                request(client, "POST", proxy.url + "/api/chat", data=body, headers=JSON_HEADERS)
                for _ in range(8)
            )
        )
    return {
        "posts": tally(r.status for r in replies),
        "slowest_seconds": max(r.seconds for r in replies),
    }


async def long_lines(proxy: Proxy) -> Figures:
    """e. Four streams whose answer is one 60 MiB line with no newline, then the end."""
    body = orjson.dumps({"model": "llama3.2", "messages": MESSAGES})
    headers = {**JSON_HEADERS, "X-Bench-Long-Line-Mib": "60"}
    async with session() as client:
        replies = await asyncio.gather(
            *(
                request(client, "POST", proxy.url + "/api/chat", data=body, headers=headers)
                for _ in range(4)
            )
        )
    return {
        "streams": tally(r.status for r in replies),
        "received_mib": [round(r.size / MiB, 2) for r in replies],
    }


async def huge_heads(proxy: Proxy) -> Figures:
    """f. Fifty connections at once, each a head of 127 fields of 64 KiB."""
    lines = [f"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n".encode()]
    for i in range(127):
        name = f"X-Hostile-{i:03d}: ".encode()
        lines.append(name + b"v" * (64 * 1024 - len(name) - 2) + b"\r\n")
    head = b"".join(lines) + b"\r\n"

    async def one() -> str:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        except OSError as exc:
            return f"connect: {type(exc).__name__}"
        try:
            writer.write(head)
            # Refused before the head was all sent: the answer may be there all the same.
            with contextlib.suppress(OSError):
                await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 30)
            return line.split(b" ")[1].decode() if line.startswith(b"HTTP/") else "closed"
        except (OSError, TimeoutError) as exc:
            return type(exc).__name__
        finally:
            writer.close()

    outcomes = await asyncio.gather(*(one() for _ in range(50)))
    return {"head_bytes": len(head), "statuses": tally(outcomes)}


SLOW_WINDOW: Final = 15.0


async def slow_heads(proxy: Proxy) -> Figures:
    """g. 1,100 connections trickling a head, a byte a second, at 1,024 open files; fresh
    health checks meanwhile."""
    head = f"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n\r\n".encode()
    loop = asyncio.get_running_loop()

    async def one() -> tuple[str, float | None]:
        """What the proxy did within SLOW_WINDOW of the connection, and after how long."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", proxy.port), 5
            )
        except (OSError, TimeoutError) as exc:
            return f"connect: {type(exc).__name__}", None
        connected = loop.time()

        async def trickle() -> None:
            for i in range(len(head)):
                if writer.is_closing():
                    return
                writer.write(head[i : i + 1])
                await asyncio.sleep(1)

        trickling = asyncio.create_task(trickle())
        try:
            line = await asyncio.wait_for(reader.readline(), SLOW_WINDOW)
            outcome = f"answered {line.split(b' ')[1].decode()}" if line else "closed"
        except TimeoutError:
            return "held", None
        except OSError as exc:
            outcome = type(exc).__name__
        finally:
            trickling.cancel()
            writer.close()
        return outcome, loop.time() - connected

    async def probes() -> list[str]:
        seen: list[str] = []
        await asyncio.sleep(3)
        while len(seen) < 7:  # every 2 s, 3 to 15 s in
            async with session(3, force_close=True) as client:
                reply = await request(client, "GET", proxy.url + "/-/healthy")
            seen.append(f"{reply.status} {reply.seconds * 1000:.0f} ms")
            await asyncio.sleep(2)
        return seen

    checks = asyncio.create_task(probes())
    results = await asyncio.gather(*(one() for _ in range(1100)))
    healthy = await checks
    closed = [after for outcome, after in results if after is not None]
    later = [after for after in closed if after >= 1]
    return {
        "connections": len(results),
        "outcomes": tally(outcome for outcome, _ in results),
        "closed_by_proxy_within_15s": len(closed),
        "of_them_within_1s": len(closed) - len(later),
        "the_others_after_median_s": statistics.median(later) if later else None,
        "healthy_ok": f"{sum(h.startswith('200') for h in healthy)}/{len(healthy)}",
        "healthy": healthy,
    }


async def metrics_storm(proxy: Proxy) -> Figures:
    """h. 500 scrapes at once; the probes they cost upstream."""

    async def counts() -> dict[str, int]:
        async with session(10) as client, client.get(proxy.upstream + "/-/bench/counts") as r:
            got: dict[str, int] = await r.json()
            return got

    before = await counts()
    start = time.perf_counter()
    async with session() as client:
        replies = await asyncio.gather(
            *(request(client, "GET", proxy.url + "/metrics") for _ in range(500))
        )
    seconds = time.perf_counter() - start
    after = await counts()
    probes = {path: after.get(path, 0) - before.get(path, 0) for path in PROBES}
    return {
        "scrapes": tally(r.status for r in replies),
        "seconds": seconds,
        "upstream_requests": probes,
        "upstream_total": sum(probes.values()),
    }


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    issue: str  # the old code's figures, as the issue gives them
    run: Callable[[Proxy], Awaitable[Figures]]
    budget: float  # seconds before it counts as failed
    open_files: int | None = None  # the proxy's RLIMIT_NOFILE, if set


SCENARIOS: Final = (
    Scenario(
        "a",
        "gzip bomb: one POST /api/generate, 1 GiB of zeros gzip-encoded (~1 MB)",
        "41 MiB -> 3.1 GiB peak, event loop blocked 11 s",
        gzip_bomb,
        120,
    ),
    Scenario(
        "b",
        "ten POST /api/chat, each with a different 1 MiB model name; then GET /metrics",
        "/metrics 860 MB, 8.8 s to scrape",
        long_model_names,
        120,
    ),
    Scenario(
        "c",
        "forty POST /api/chat naming `llama3.2` + 5 MiB of spaces (+i: 40 spellings)",
        "+200 MiB for good",
        padded_names,
        90,
    ),
    Scenario(
        "d",
        "8 concurrent 60 MiB JSON bodies to /api/chat (Content-Length)",
        "peak 1.17 GiB",
        big_bodies,
        90,
    ),
    Scenario(
        "e",
        "4 concurrent streams answered with one 60 MiB line, no newline",
        "+337 MiB",
        long_lines,
        90,
    ),
    Scenario(
        "f",
        "50 connections, each a head of 127 fields of 64 KiB",
        "+554 MiB",
        huge_heads,
        90,
    ),
    Scenario(
        "g",
        "1,100 connections trickling a head at 1 byte/s, proxy at `ulimit -n 1024`",
        "all held for the 75 s keep-alive, new clients reset",
        slow_heads,
        60,
        open_files=1024,
    ),
    Scenario(
        "h",
        "500 concurrent GET /metrics",
        "1,500 upstream requests",
        metrics_storm,
        90,
    ),
)

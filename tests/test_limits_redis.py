"""rpm shared by two ollama-meter processes through a real Redis, and what happens when Redis
goes away (the limits issue, item 6)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from ollama_meter.gateway.shared_windows import storage_url

from .conftest import unused_port
from .fake_ollama import FakeOllama
from .real_redis import RealRedis, start_redis
from .test_process import Process, StartProcess, start_process

__all__ = ["start_process"]  # the fixture, used here

_GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}
#: No request may take longer than this, Redis or not.
_PATIENCE = 5.0


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RealRedis]:
    server = await start_redis(tmp_path)
    yield server
    await server.stop()


def _config(tmp_path: Path, url: str, name: str = "meter.toml") -> str:
    path = tmp_path / name
    path.write_text(f'[limits]\ndefault_rpm = 60\nredis = "{url}"\nreplicas = 2\n')
    return str(path)


async def _statuses(http: aiohttp.ClientSession, proxies: list[Process], count: int) -> list[int]:
    statuses = []
    for i in range(count):
        proxy = proxies[i % len(proxies)]
        async with asyncio.timeout(_PATIENCE):
            async with http.post(f"{proxy.url}/api/generate", json=_GENERATE) as r:
                await r.read()
                statuses.append(r.status)
    return statuses


async def _metric(http: aiohttp.ClientSession, proxy: Process, name: str) -> float | None:
    async with http.get(f"{proxy.url}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(f"ollama_meter_{name} "):
                return float(line.rsplit(" ", 1)[1])
    return None


async def test_two_proxies_share_one_rpm_window_and_fall_back_when_redis_goes(
    start_process: StartProcess, fake: FakeOllama, redis: RealRedis, tmp_path: Path
) -> None:
    config = _config(tmp_path, redis.url)
    proxies = [await start_process(30.0, "--config", config) for _ in range(2)]
    async with aiohttp.ClientSession() as http:
        for proxy in proxies:
            assert await _metric(http, proxy, "redis_up") == 1
        statuses = await _statuses(http, proxies, 120)
        assert statuses.count(200) == 60  # at most 61 admitted: exactly the limit
        assert statuses.count(429) == 60
        assert fake.count("/api/generate") == 60
        refused = [
            await _metric(http, p, 'rejected_total{key="anonymous",reason="rate"}') for p in proxies
        ]
        assert sum(n or 0 for n in refused) == 60
        await redis.stop()
        # No request waits on the Redis that is gone; each proxy keeps 60 / 2 of its own.
        after = await _statuses(http, proxies, 80)
        assert after.count(200) == 60
        assert after.count(429) == 20
        for proxy in proxies:
            assert await _metric(http, proxy, "redis_up") == 0
            await proxy.line_containing("Redis is not answering")


async def test_an_unreachable_redis_at_start_is_a_warning_and_the_fallback(
    start_process: StartProcess, fake: FakeOllama, tmp_path: Path
) -> None:
    config = _config(tmp_path, f"redis://127.0.0.1:{unused_port()}/0")
    proxy = await start_process(30.0, "--config", config)
    # Said before it listens (the start-up look), once.
    assert sum("Redis is not answering" in line for line in proxy.log) == 1
    async with aiohttp.ClientSession() as http:
        assert await _metric(http, proxy, "redis_up") == 0
        statuses = await _statuses(http, [proxy], 31)
    assert statuses == [200] * 30 + [429]  # 60 / replicas


async def test_a_redis_on_a_unix_socket_shares_the_windows(
    start_process: StartProcess, fake: FakeOllama, tmp_path: Path
) -> None:
    """``redis = "unix:///path"``: the settings keep it a Unix socket's URL all the way to
    the limits library (which once took it for Valkey's and would not start)."""
    server = await start_redis(tmp_path, unix=True)
    try:
        assert server.socket is not None
        path = tmp_path / "meter.toml"
        path.write_text(f'[limits]\ndefault_rpm = 3\nredis = "unix://{server.socket}"\n')
        proxy = await start_process(30.0, "--config", str(path))
        async with aiohttp.ClientSession() as http:
            assert await _metric(http, proxy, "redis_up") == 1
            assert await _statuses(http, [proxy], 4) == [200, 200, 200, 429]
        reader, writer = await asyncio.open_unix_connection(str(server.socket))
        writer.write(b"KEYS *ollama-meter*\r\n")
        await writer.drain()
        answer = await reader.read(4096)
        writer.close()
        assert answer.startswith(b"*1\r\n"), answer  # the one request window, in Redis
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("url", "uri"),
    [
        ("redis://redis:6379/0", "async+redis://redis:6379/0"),
        ("rediss://:pw@redis:6380/1", "async+rediss://:pw@redis:6380/1"),
        ("unix:///run/redis.sock", "async+redis+unix:///run/redis.sock"),
        ("unix:/run/redis.sock?db=2", "async+redis+unix:///run/redis.sock?db=2"),
    ],
)
def test_each_redis_url_is_the_librarys_redis_storage(url: str, uri: str) -> None:
    assert storage_url(url) == uri

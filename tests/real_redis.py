"""A real ``redis-server`` (Debian's package) for the tests, on a free loopback port, with no
persistence; ready when it says so on its log, stopped after. In CI it must be there."""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import unused_port


@dataclass
class RealRedis:
    proc: asyncio.subprocess.Process
    port: int
    #: Its Unix socket, when it was started with one.
    socket: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def redis_server() -> str:
    found = shutil.which("redis-server")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is required in CI (.ci/run installs Debian's redis-server)")
        pytest.skip("REDIS-SERVER NOT INSTALLED: apt-get install redis-server to run this test")
    return found


async def start_redis(directory: Path, unix: bool = False) -> RealRedis:
    """On a free port, and with ``unix`` on a socket in ``directory`` too."""
    port = unused_port()
    socket = directory / "redis.sock" if unix else None
    proc = await asyncio.create_subprocess_exec(
        redis_server(),
        *(("--unixsocket", str(socket)) if socket is not None else ()),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    async with asyncio.timeout(30):
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                raise AssertionError(f"redis-server ended: {''.join(seen)}")
            seen.append(line)
            if "Ready to accept connections" in line:
                break
    # Nobody reads its log from here on: send it nowhere rather than fill a pipe.
    asyncio.get_running_loop().create_task(_drain(proc.stdout))
    return RealRedis(proc, port, socket)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass

"""ollama-meter as a real process: start-up, a multi-GB-class upload in flat memory, SIGTERM.

The proxy runs as ``python -m ollama_meter`` in front of the fake Ollama of this test's loop.
Readiness and shutdown are read from its log, never waited for with sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest

from .conftest import unused_port
from .fake_ollama import NDJSON, FakeOllama, Reply, fixture, lines_of

MiB = 1024 * 1024


@dataclass
class Process:
    proc: asyncio.subprocess.Process
    url: str
    log: list[str]

    def peak_rss(self) -> int:
        """VmHWM: the most resident memory the process ever had, in bytes."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        [line] = [line for line in status.splitlines() if line.startswith("VmHWM:")]
        return int(line.split()[1]) * 1024

    async def line_containing(self, text: str) -> str:
        assert self.proc.stderr is not None
        while True:
            raw = await self.proc.stderr.readline()
            if not raw:
                raise AssertionError(f"process ended before logging {text!r}: {self.log}")
            line = raw.decode()
            self.log.append(line)
            if text in line:
                return line


StartProcess = Callable[..., Awaitable[Process]]


@pytest.fixture
async def start_process(fake: FakeOllama) -> AsyncIterator[StartProcess]:
    """Start ``python -m ollama_meter`` in front of the fake; wait for its start-up line."""
    started: list[asyncio.subprocess.Process] = []

    async def start(shutdown_timeout: float = 30.0) -> Process:
        port = unused_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ollama_meter",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            fake.url,
            "--shutdown-timeout",
            str(shutdown_timeout),
            stderr=asyncio.subprocess.PIPE,
        )
        started.append(proc)
        running = Process(proc, f"http://127.0.0.1:{port}", [])
        await asyncio.wait_for(running.line_containing("listening on"), timeout=30)
        return running

    yield start
    for proc in started:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_large_upload_streams_in_flat_memory(
    fake: FakeOllama, start_process: StartProcess
) -> None:
    process = await start_process()
    size = 256 * MiB
    piece = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()
    for _ in range(size // len(piece)):
        digest.update(piece)
    blob = f"sha256:{digest.hexdigest()}"

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // len(piece)):
            yield piece

    before = process.peak_rss()
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{process.url}/api/blobs/{blob}", data=body()) as response,
    ):
        assert response.status == 201
    received = fake.last(f"/api/blobs/{blob}")
    assert (received.size, received.sha256) == (size, digest.hexdigest())
    growth = process.peak_rss() - before
    assert growth < 32 * MiB, (
        f"peak RSS grew by {growth / MiB:.1f} MiB for a {size // MiB} MiB upload"
    )


@asynccontextmanager
async def stream_then_sigterm(
    fake: FakeOllama, process: Process, gate: asyncio.Event
) -> AsyncIterator[aiohttp.ClientResponse]:
    """A chat stream through the process, held by the fake after its first line until
    ``gate`` is set; SIGTERM is sent once the client has that first line."""
    lines = lines_of("chat_stream.ndjson")
    fake.script("POST", "/api/chat", Reply(content_type=NDJSON, chunks=lines, gates={1: gate}))
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(process.url + "/api/chat", data=orjson.dumps(chat)) as response,
    ):
        assert await response.content.readline() == lines[0]
        process.proc.send_signal(signal.SIGTERM)
        yield response


async def test_sigterm_lets_requests_in_flight_finish(
    fake: FakeOllama, start_process: StartProcess
) -> None:
    process = await start_process(shutdown_timeout=30)
    gate = asyncio.Event()
    async with stream_then_sigterm(fake, process, gate) as response:
        gate.set()
        rest = await response.read()
    assert lines_of("chat_stream.ndjson")[0] + rest == fixture("chat_stream.ndjson")
    access = await process.line_containing("POST endpoint=/api/chat")
    assert "status=200" in access
    assert "completion_tokens=3" in access
    assert await asyncio.wait_for(process.proc.wait(), timeout=30) == 0


async def test_streams_still_open_at_the_deadline_are_cut_and_counted(
    fake: FakeOllama, start_process: StartProcess
) -> None:
    process = await start_process(shutdown_timeout=0.5)
    async with stream_then_sigterm(fake, process, asyncio.Event()) as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    access = await process.line_containing("POST endpoint=/api/chat")
    assert "error=shutdown" in access
    assert await asyncio.wait_for(process.proc.wait(), timeout=30) == 0
    await asyncio.wait_for(fake.cancelled.wait(), timeout=5)

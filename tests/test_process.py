"""ollama-meter as a real process: start-up, a multi-GB-class upload in flat memory, SIGTERM.

The proxy runs as ``python -m ollama_meter`` in front of the fake Ollama of this test's loop.
Readiness and shutdown are read from its log, never waited for with sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import signal
import socket
import subprocess
import sys
import zlib
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

    def peak_rss(self, key: str = "VmHWM") -> int:
        """VmHWM: the most resident memory the process ever had, in bytes (VmRSS: now)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        [line] = [line for line in status.splitlines() if line.startswith(f"{key}:")]
        return int(line.split()[1]) * 1024

    def rss(self) -> int:
        return self.peak_rss("VmRSS")

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

    async def start(
        shutdown_timeout: float = 30.0, *args: str, upstream: str | None = None
    ) -> Process:
        port = unused_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ollama_meter",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            upstream or fake.url,
            "--shutdown-timeout",
            str(shutdown_timeout),
            *args,
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
        shutting = await process.line_containing("shutting down")
        assert "1 requests in flight get 30s to finish" in shutting
        gate.set()
        rest = await response.read()
    assert lines_of("chat_stream.ndjson")[0] + rest == fixture("chat_stream.ndjson")
    access = await process.line_containing("POST endpoint=/api/chat")
    assert "status=200" in access
    assert "completion_tokens=3" in access
    assert "1 requests finished during shutdown, 0 cut" in await process.line_containing("stopped:")
    assert await asyncio.wait_for(process.proc.wait(), timeout=30) == 0


async def test_streams_still_open_at_the_deadline_are_cut_and_counted(
    fake: FakeOllama, start_process: StartProcess
) -> None:
    deadline = 0.5
    process = await start_process(shutdown_timeout=deadline)
    async with stream_then_sigterm(fake, process, asyncio.Event()) as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    access = await process.line_containing("POST endpoint=/api/chat")
    assert "error=shutdown" in access
    # A stream cut at shutdown keeps the status its client got.
    assert "status=200" in access
    # Cut on time: aiohttp's own fallback would cut a second and more later.
    duration = float(access.split("duration_s=")[1].split()[0])
    assert deadline <= duration < deadline + 0.9
    assert "cutting 1 requests" in "".join(process.log)
    assert "0 requests finished during shutdown, 1 cut" in await process.line_containing("stopped:")
    assert await asyncio.wait_for(process.proc.wait(), timeout=30) == 0
    await asyncio.wait_for(fake.cancelled.wait(), timeout=5)


async def test_an_unreachable_ollama_is_said_once_listening(start_process: StartProcess) -> None:
    process = await start_process(upstream=f"http://127.0.0.1:{unused_port()}")
    warning = await asyncio.wait_for(process.line_containing("does not answer"), timeout=30)
    assert "WARNING" in warning
    assert "listening on" in process.log[-2]


async def test_a_gzip_bomb_passes_encoded_in_flat_memory(
    fake: FakeOllama, start_process: StartProcess
) -> None:
    inflated = 256 * MiB
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip container
    zeros = bytes(MiB)
    bomb = b"".join(packer.compress(zeros) for _ in range(inflated // MiB)) + packer.flush()
    process = await start_process()
    before = process.peak_rss()
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(process.url + "/api/generate", data=bomb, headers=headers) as response,
    ):
        await response.read()
    received = fake.last("/api/generate")
    assert (received.size, received.sha256) == (len(bomb), hashlib.sha256(bomb).hexdigest())
    growth = process.peak_rss() - before
    assert growth < 16 * MiB, (
        f"{len(bomb)} bytes of gzip grew the peak RSS by {growth / MiB:.1f} MiB"
    )


async def test_a_huge_unterminated_response_line_is_not_kept(
    fake: FakeOllama, start_process: StartProcess
) -> None:
    line = b'{"model":"llama3.2","message":{"content":"' + b"x" * (64 * MiB)
    pieces = [line[i : i + MiB] for i in range(0, len(line), MiB)]
    fake.script("POST", "/api/chat", Reply(content_type=NDJSON, chunks=pieces))
    process = await start_process()
    before = process.peak_rss()
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}
    size = 0
    async with (
        aiohttp.ClientSession() as session,
        session.post(process.url + "/api/chat", json=chat) as response,
    ):
        async for chunk in response.content.iter_any():
            size += len(chunk)
    assert size == len(line)
    growth = process.peak_rss() - before
    assert growth < 16 * MiB, f"a 64 MiB line grew the peak RSS by {growth / MiB:.1f} MiB"


async def test_inspected_bodies_share_one_memory_budget(
    fake: FakeOllama, start_process: StartProcess
) -> None:
    """Eight 16 MiB bodies at once, with room to hold two: past it, bodies stream through."""
    body = orjson.dumps({"model": "llama3.2", "messages": [], "images": ["A" * (16 * MiB)]})
    process = await start_process(30.0, "--max-inspect-total", str(2 * len(body)))
    gate = asyncio.Event()
    for _ in range(8):
        reply = Reply(content_type=NDJSON, chunks=[b"{}\n"], gates={0: gate})
        fake.script("POST", "/api/chat", reply)
    before = process.peak_rss()
    async with aiohttp.ClientSession() as session:

        async def send() -> None:
            async with session.post(process.url + "/api/chat", data=io.BytesIO(body)) as r:
                await r.read()

        sending = [asyncio.ensure_future(send()) for _ in range(8)]
        await fake.wait_for("/api/chat", 8)  # all eight bodies are upstream, none answered
        gate.set()
        await asyncio.gather(*sending)
    # Two bodies inspected at once: their bytes, and their decoded strings while parsed (about
    # 64 MiB); all eight would be four times that.
    growth = process.peak_rss() - before
    assert growth < 100 * MiB, f"8 x 16 MiB bodies grew the peak RSS by {growth / MiB:.1f} MiB"
    async with aiohttp.ClientSession() as session, session.get(process.url + "/metrics") as r:
        text = await r.text()
    counted = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('ollama_meter_requests_total{endpoint="/api/chat"')
    ]
    assert sum(counted) == 8  # labelled while the budget lasted, the rest "unknown"


async def test_a_trickled_request_head_is_cut_off(start_process: StartProcess) -> None:
    process = await start_process(30.0, "--keepalive-timeout", "0.5")
    host, port = process.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /api/tags HTTP/1.1\r\nHost: localh")
        await writer.drain()
        # The proxy closes it (EOF); without a head timeout this waits far past the limit.
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""
    finally:
        writer.close()
    async with aiohttp.ClientSession() as session, session.get(process.url + "/-/healthy") as r:
        assert r.status == 200


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_taken_metrics_port_is_one_line(log_format: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "ollama_meter",
                "--listen",
                f"127.0.0.1:{unused_port()}",
                "--upstream",
                f"127.0.0.1:{unused_port()}",
                "--metrics-listen",
                f"127.0.0.1:{port}",
                "--log-format",
                log_format,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"Error: cannot start: error while attempting to bind on address ('127.0.0.1', {port}): "
        "address already in use"
    ]

"""The access log: one line per request, plain or JSON, without prompt or completion text."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Iterator

import aiohttp
import orjson
import pytest

from ollama_meter.app import ACCESS_LOG
from ollama_meter.exchange import Exchange
from ollama_meter.logs import FLUSH_BYTES, FLUSH_SECONDS, AccessLog, setup_logging

from .conftest import Meter, MeterFactory
from .fake_ollama import NDJSON, FakeOllama, Reply, lines_of

SECRET = "the-prompt-must-not-be-logged"


async def chat(meter: Meter) -> None:
    """One chat through the proxy, then write out what the access log holds."""
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": SECRET}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(meter.url + "/api/chat?token=" + SECRET, json=body) as response,
    ):
        await response.read()
    meter.app[ACCESS_LOG].flush()


async def test_one_plain_line_per_request(meter: Meter, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    await chat(meter)
    [line] = capsys.readouterr().err.splitlines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ollama_meter\.access: "
        r"POST endpoint=/api/chat model=llama3\.2:latest stream=true status=200 "
        r"duration_s=[\d.e-]+ ttft_s=[\d.e-]+ prompt_tokens=34 completion_tokens=3",
        line,
    ), line
    assert SECRET not in line


async def test_json_lines(start_meter: MeterFactory, capsys: pytest.CaptureFixture[str]) -> None:
    meter = await start_meter(log_format="json")
    capsys.readouterr()
    await chat(meter)
    [line] = capsys.readouterr().err.splitlines()
    doc = orjson.loads(line)
    assert {k: doc[k] for k in ("logger", "method", "endpoint", "model", "stream", "status")} == {
        "logger": "ollama_meter.access",
        "method": "POST",
        "endpoint": "/api/chat",
        "model": "llama3.2:latest",
        "stream": True,
        "status": 200,
    }
    assert (doc["prompt_tokens"], doc["completion_tokens"]) == (34, 3)
    assert doc["level"] == "info"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"])
    assert SECRET not in line


async def test_no_access_log(start_meter: MeterFactory, capsys: pytest.CaptureFixture[str]) -> None:
    meter = await start_meter(access_log=False)
    assert ACCESS_LOG not in meter.app
    body = {"model": "llama3.2", "messages": []}
    async with (
        aiohttp.ClientSession() as session,
        session.post(meter.url + "/api/chat", json=body) as response,
    ):
        await response.read()
    assert "ollama_meter.access" not in capsys.readouterr().err


async def test_lines_are_written_in_batches() -> None:
    stream = io.StringIO()
    log = AccessLog("text", stream)
    x = Exchange("GET", "/api/tags", 0.0, status=200, finished=0.001)
    log(x)
    assert stream.getvalue() == ""  # held until the flush timer or a full buffer
    for _ in range(FLUSH_BYTES // 80 + 1):
        log(x)
    written = stream.getvalue().splitlines()
    assert len(written) > 1
    assert all("GET endpoint=/api/tags model=unknown" in line for line in written)
    log.flush()
    assert len(stream.getvalue().splitlines()) == FLUSH_BYTES // 80 + 2


async def test_text_lines_cannot_be_forged() -> None:
    stream = io.StringIO()
    log = AccessLog("text", stream)
    forged = "x 200\n2026-01-01 00:00:00,000 INFO ollama_meter.access: GET endpoint=/ model=y"
    log(Exchange("POST", "/api/chat", 0.0, model=forged, status=200, finished=0.001))
    log.flush()
    [line] = stream.getvalue().splitlines()
    assert "model=x 200\\n2026-01-01" in line


def test_other_text_log_messages_are_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging("text")
        logging.getLogger("ollama_meter.proxy").warning("upstream sent %r", "a\r\nFAKE LINE")
        logging.getLogger("ollama_meter.proxy").warning("raw %s", "a\nFAKE LINE\x1b[2J")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[1].endswith("raw a\\nFAKE LINE\\x1b[2J")


class Signalling(io.StringIO):
    """A stream that says when something was written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.written = asyncio.Event()

    def write(self, text: str) -> int:
        self.written.set()
        return super().write(text)


async def test_a_lone_line_is_written_by_the_timer() -> None:
    stream = Signalling()
    log = AccessLog("text", stream)
    log(Exchange("GET", "/api/tags", 0.0, status=200, finished=0.001))
    assert stream.getvalue() == ""
    # Nothing else calls flush: only the timer can write it.
    await asyncio.wait_for(stream.written.wait(), timeout=FLUSH_SECONDS * 20)
    assert "GET endpoint=/api/tags" in stream.getvalue()


async def test_a_stream_the_client_abandons_gets_its_line(
    fake: FakeOllama, meter: Meter, capsys: pytest.CaptureFixture[str]
) -> None:
    gate = asyncio.Event()
    lines = lines_of("chat_stream.ndjson")
    fake.script("POST", "/api/chat", Reply(content_type=NDJSON, chunks=lines, gates={1: gate}))
    capsys.readouterr()
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as session:
        response = await session.post(meter.url + "/api/chat", json=body)
        await response.content.readline()
        response.close()
    await asyncio.wait_for(fake.cancelled.wait(), timeout=5)
    meter.app[ACCESS_LOG].flush()
    [line] = capsys.readouterr().err.splitlines()
    assert "status=499" in line
    assert "error=client_disconnect" in line


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """Tests here call setup_logging as the command does; give pytest its logging back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    server = logging.getLogger("aiohttp.server")
    filters = server.filters[:]
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    server.filters[:] = filters


async def send_raw(meter: Meter, data: bytes) -> bytes:
    host, port = meter.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(-1), timeout=5)
    finally:
        writer.close()


@pytest.mark.usefixtures("restored_logging")
async def test_a_malformed_request_is_a_debug_line_not_an_error(
    meter: Meter, caplog: pytest.LogCaptureFixture
) -> None:
    setup_logging("text")
    for _ in range(3):
        reply = await send_raw(
            meter, b"GET /" + b"x" * 70_000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.")
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.usefixtures("restored_logging")
async def test_a_malformed_request_cannot_break_the_debug_log(
    meter: Meter, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("text", "DEBUG")
    await send_raw(meter, b"GET /a?%s%d\x01 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    err = capsys.readouterr().err
    assert "Logging error" not in err
    assert "DEBUG aiohttp.server" in err

"""The access log: one line per request, plain or JSON, without prompt or completion text."""

from __future__ import annotations

import io
import re

import aiohttp
import orjson
import pytest

from ollama_meter.app import ACCESS_LOG
from ollama_meter.exchange import Exchange
from ollama_meter.logs import FLUSH_BYTES, AccessLog

from .conftest import Meter, MeterFactory

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

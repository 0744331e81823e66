"""The access log: one line per request, plain or JSON, without prompt or completion text."""

from __future__ import annotations

import logging

import aiohttp
import orjson
import pytest

from ollama_meter.logs import ACCESS_LOGGER, JsonFormatter

from .conftest import Meter, MeterFactory

SECRET = "the-prompt-must-not-be-logged"


async def chat(meter: Meter) -> None:
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": SECRET}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(meter.url + "/api/chat?token=" + SECRET, json=body) as response,
    ):
        await response.read()


async def test_one_plain_line_per_request(meter: Meter, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        await chat(meter)
    [record] = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    line = record.getMessage()
    assert line.startswith("POST endpoint=/api/chat model=llama3.2:latest stream=true status=200 ")
    assert "prompt_tokens=34 completion_tokens=3" in line
    assert "ttft_s=" in line
    assert SECRET not in line


async def test_json_lines(meter: Meter, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        await chat(meter)
    [record] = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    doc = orjson.loads(JsonFormatter().format(record))
    assert {k: doc[k] for k in ("method", "endpoint", "model", "stream", "status")} == {
        "method": "POST",
        "endpoint": "/api/chat",
        "model": "llama3.2:latest",
        "stream": True,
        "status": 200,
    }
    assert (doc["prompt_tokens"], doc["completion_tokens"]) == (34, 3)
    assert doc["level"] == "info"
    assert doc["time"].endswith("Z")
    assert SECRET not in orjson.dumps(doc).decode()


async def test_no_access_log(start_meter: MeterFactory, caplog: pytest.LogCaptureFixture) -> None:
    meter = await start_meter(access_log=False)
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        await chat(meter)
    assert [r for r in caplog.records if r.name == ACCESS_LOGGER] == []

"""/-/status.json against a hostile world: an upstream that answers garbage to the poller, and a
wall clock that steps back. What must hold: no secret of the configuration in the object, and
rates that stay true."""

from __future__ import annotations

import asyncio
import json
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from ollama_meter.config import Config
from ollama_meter.exchange import Exchange
from ollama_meter.gateway.limit_metrics import anonymous_label
from ollama_meter.ledger_settings import LedgerSettings, printable
from ollama_meter.limit_settings import LimitSettings
from ollama_meter.settings import Settings, parse_settings
from ollama_meter.status.config_view import config_view
from ollama_meter.status.recorder import STEP, Recorder
from ollama_meter.status.snapshot import models

from .conftest import MeterFactory
from .fake_fleet import FleetFactory

_TOKEN = "s3cret-upstream-token"


@pytest.fixture
async def not_http() -> AsyncIterator[str]:
    """A listener that speaks something other than HTTP (an SSH port typed by mistake)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def test_an_upstream_answering_garbage_never_shows_its_headers(
    start_fleet: FleetFactory, start_meter: MeterFactory, not_http: str
) -> None:
    fleet = await start_fleet(1, models=("llama3.2",), time_scale=0)
    toml = fleet.toml() + (
        f'[[upstream]]\nname = "u2"\nurl = "{not_http}"\n'
        f'headers = {{ Authorization = "Bearer {_TOKEN}" }}\n'
    )
    meter = await start_meter(parse_settings(tomllib.loads(toml), "fleet.toml", Path(".")))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{meter.url}/-/status.json") as response:
            assert response.status == 200
            doc = await response.json()
        async with http.get(f"{meter.url}/-/fleet") as response:
            fleet_doc = await response.text()
    u2 = doc["fleet"]["upstreams"][1]
    assert u2["up"] is False
    assert u2["last_error"]  # something an operator can read ...
    assert _TOKEN not in json.dumps(doc)  # ... and never the token sent to it
    assert _TOKEN not in fleet_doc
    assert u2["last_error"].endswith(": not a valid HTTP answer")  # not a Python repr


def _served(recorder: Recorder, n: int) -> None:
    for _ in range(n):
        x = Exchange("POST", "/api/generate", 0.0, model="m", inference=True)
        x.status = 200
        recorder.record(x)


def test_a_clock_that_steps_back_keeps_the_rates_true() -> None:
    """NTP stepping the clock back an hour (a VM resumed, a bad RTC at boot): the traffic after
    it must not pile up in one step and read as ten times the real rate."""
    now = [1_800_000_000.0]
    recorder = Recorder(anonymous_label, lambda: now[0], False)
    _served(recorder, 1)
    now[0] -= 3600  # the step back
    for _ in range(120):  # ten minutes at one request a step (0.2 a second)
        now[0] += STEP
        _served(recorder, 1)
    total = models(recorder, now[0])["total"]
    assert total["requests_per_second"] == pytest.approx(1 / STEP, rel=0.1)
    history = total["history"]["requests_per_second"]
    assert max(history) == pytest.approx(1 / STEP)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql:///ledger?host=/run/postgresql&password=s3cret",  # a socket: no host
        "postgresql://meter:s3cret@db/ledger?sslpassword=s3cret",  # the client key's passphrase
        "unix:///run/redis.sock?password=s3cret",
    ],
)
def test_a_store_address_without_a_host_shows_and_hides_its_password(url: str) -> None:
    """The ledger's and Redis's addresses as the config view (and the ledger's start) print
    them: a socket's URL has no host, and printing it must neither raise nor show a secret."""
    shown = printable(url)
    assert "s3cret" not in shown
    assert shown.startswith(url.split("?")[0].replace("meter:s3cret@", "meter@"))
    ledger = LedgerSettings(url=url)
    view = config_view(Config(), Settings(ledger=ledger, limits=LimitSettings(redis=url)))
    assert "s3cret" not in json.dumps(view)

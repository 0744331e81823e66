"""Several Ollama servers behind one ollama-meter, over real sockets (fakes of Ollama)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
import ollama
import pytest
from pytest_aiohttp import AiohttpServer

from ollama_meter.app import FLEET
from ollama_meter.config import parse_upstream
from ollama_meter.fleet_settings import RoutingSettings, UpstreamSettings
from ollama_meter.settings import Settings

from .conftest import Meter, MeterFactory, unused_port
from .fake_ollama import FakeOllama

Fakes = Callable[[int], Awaitable[list[FakeOllama]]]


@pytest.fixture
def fakes(aiohttp_server: AiohttpServer) -> Fakes:
    async def start(count: int) -> list[FakeOllama]:
        started = []
        for _ in range(count):
            fake = FakeOllama()
            server = await aiohttp_server(fake.app)
            fake.url = str(server.make_url("")).rstrip("/")
            started.append(fake)
        return started

    return start


def fleet_settings(urls: list[str], admin: str | None = None) -> Settings:
    upstreams = tuple(
        UpstreamSettings(f"gpu-{n}", parse_upstream(url)) for n, url in enumerate(urls, 1)
    )
    return Settings(upstreams=upstreams, routing=RoutingSettings(admin))


async def test_a_fleet_answers_as_one_ollama(start_meter: MeterFactory, fakes: Fakes) -> None:
    first, second = await fakes(2)
    dead = f"http://127.0.0.1:{unused_port()}"
    meter: Meter = await start_meter(settings=fleet_settings([first.url, second.url, dead]))
    fleet = meter.app[FLEET]
    assert [node.answered for node in fleet.nodes] == [True, True, False]
    async with ollama.AsyncClient(host=meter.url) as client:
        listed = await client.list()
        async with ollama.AsyncClient(host=first.url) as direct:
            one = await direct.list()
        assert [m.model for m in listed.models] == [m.model for m in one.models]
        reply = await client.generate("llama3.2", "hi")
        assert reply.done
        with pytest.raises(ollama.ResponseError) as missing:
            await client.generate("llama9", "hi")
        assert missing.value.status_code == 404
        assert missing.value.error == "model 'llama9' not found"
    async with aiohttp.ClientSession() as session:
        body = {"model": "llama3.2", "prompt": "hi", "stream": False}
        async with session.post(meter.url + "/api/generate", json=body) as response:
            assert response.headers["X-Ollama-Meter-Upstream"] in ("gpu-1", "gpu-2")
        # Model management needs an upstream when there are several.
        async with session.post(meter.url + "/api/pull", json={"model": "x"}) as response:
            assert response.status == 400
            assert "X-Ollama-Meter-Upstream" in (await response.json())["error"]
        pin = {"X-Ollama-Meter-Upstream": "gpu-2"}
        async with session.post(
            meter.url + "/api/pull", json={"model": "llama3.2", "stream": False}, headers=pin
        ) as response:
            assert response.status == 200
            assert response.headers["X-Ollama-Meter-Upstream"] == "gpu-2"
        assert "X-Ollama-Meter-Upstream" not in second.last("/api/pull").headers
        async with session.post(
            meter.url + "/api/pull", json={"model": "x"}, headers={"X-Ollama-Meter-Upstream": "z"}
        ) as response:
            assert response.status == 400
            assert "known: gpu-1, gpu-2, gpu-3" in (await response.json())["error"]

"""Several Ollama servers behind one ollama-meter, over real sockets (fakes of Ollama)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import ollama
import openai
import orjson
import pytest
from click.testing import CliRunner, Result
from pytest_aiohttp import AiohttpServer

from ollama_meter.app import ACCESS, FLEET
from ollama_meter.cli import main
from ollama_meter.config import parse_upstream
from ollama_meter.fleet_settings import RoutingSettings, UpstreamSettings
from ollama_meter.settings import AccessSettings, Settings, parse_settings

from .access_keys import make_keys
from .clients import openai_httpx
from .conftest import Meter, MeterFactory, unused_port
from .fake_fleet import FakeUpstream, FleetFactory, FleetOptions
from .fake_fleet import Fleet as FakeFleet
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


def settings_of(fleet: FakeFleet, admin: str | None = None) -> Settings:
    """The fake fleet as [[upstream]] tables say it (slots, max_loaded as configured)."""
    return parse_settings(tomllib.loads(fleet.toml()), "fleet.toml", Path("."))


async def test_a_model_is_never_sent_where_it_is_not(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    fleet = await start_fleet(2, models=["llama3.2", "qwen3:8b"])
    meter = await start_meter(settings=settings_of(fleet))
    async with ollama.AsyncClient(host=meter.url) as client:
        for model in ["llama3.2", "qwen3:8b"] * 5:
            reply = await client.generate(model, "hi")
            assert reply.done
        listed = sorted(m.model or "" for m in (await client.list()).models)
    assert listed == ["llama3.2:latest", "qwen3:8b"]
    assert fleet.not_found() == 0
    assert (fleet[0].loads["llama3.2"], fleet[1].loads["qwen3:8b"]) == (1, 1)
    decisions = {(s["upstream"], s["decision"]) for s in meter.series("routing_decisions_total")}
    assert decisions >= {("u1", "only"), ("u2", "only")}


async def test_a_refused_connection_before_headers_is_retried_elsewhere(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    # Both hold the model; only u1 has it loaded, so u1 is the cheaper choice.
    fleet = await start_fleet(2, models="llama3.2", loaded=["llama3.2", ()])
    meter = await start_meter(settings=settings_of(fleet))
    await fleet[0].refuse()  # down since the last poll (its pooled connections cut too)
    async with ollama.AsyncClient(host=meter.url) as client:
        reply = await client.generate("llama3.2", "hi")
    assert reply.done
    retried = sum(
        meter.value("upstream_retries_total", upstream="u1", reason=reason)
        for reason in ("connect", "reset")
    )
    assert retried == 1
    assert meter.value("routing_decisions_total", upstream="u2", decision="retry") == 1
    assert [c.path for c in fleet[1].calls if c.path == "/api/generate"] == ["/api/generate"]


async def test_every_upstream_down_is_a_503_with_retry_after_never_a_hang(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    fleet = await start_fleet(2, models="llama3.2")
    meter = await start_meter(settings=settings_of(fleet))
    for upstream in fleet:
        await upstream.refuse()
    node_of = meter.app[FLEET].by_name
    await meter.app[FLEET].poll_all(tags=False)  # what the 2 s poller does next
    assert not any(node.answered for node in node_of.values())
    async with aiohttp.ClientSession() as session:
        body = {"model": "llama3.2", "prompt": "hi", "stream": False}
        async with session.post(meter.url + "/api/generate", json=body) as response:
            assert response.status == 503
            assert int(response.headers["Retry-After"]) >= 1
            assert "down" in (await response.json())["error"]
        async with session.get(meter.url + "/api/tags") as response:
            assert response.status == 503


async def test_alternating_models_on_small_servers_load_rarely_unlike_round_robin(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    """Two models, two upstreams that hold one model each at a time: the cost policy keeps
    each model where it is loaded; round-robin (the same traffic sent to the upstreams in
    turn, as nginx would) loads at almost every request. The test shows why the policy
    exists."""
    rng = random.Random(7)
    traffic = [rng.choice(["llama3.2", "qwen3:8b"]) for _ in range(40)]
    # Loads of 5 s, reported as Ollama would, not slept.
    small: FleetOptions = {
        "models": ("llama3.2", "qwen3:8b"),
        "max_loaded": 1,
        "load_delay": 5.0,
        "time_scale": 0,
    }
    fleet = await start_fleet(2, **small)
    meter = await start_meter(settings=settings_of(fleet))
    async with ollama.AsyncClient(host=meter.url) as client:
        for model in traffic:
            await client.generate(model, "hi")
    routed = {m: fleet.loads(m) for m in ("llama3.2", "qwen3:8b")}
    assert all(loads <= 2 for loads in routed.values()), routed

    async def naive(pick: Callable[[int, list[FakeUpstream]], int]) -> int:
        """Loads when the same traffic goes where ``pick`` says (nginx's policies)."""
        fakes = await start_fleet(2, **small)
        clients = [ollama.AsyncClient(host=url) for url in fakes.urls]
        try:
            for number, model in enumerate(traffic):
                await clients[pick(number, fakes.upstreams)].generate(model, "hi")
        finally:
            for client in clients:
                await client._client.aclose()
        return fakes.loads()

    round_robin = await naive(lambda number, _: number % 2)
    # Least connections: none is in flight between these requests, so the first wins ties.
    least = await naive(lambda _, upstreams: min(range(2), key=lambda i: upstreams[i].placing))
    assert round_robin > 4 * sum(routed.values()), (round_robin, routed)
    assert least > 4 * sum(routed.values()), (least, routed)


async def test_a_server_killed_mid_stream_cuts_its_streams_and_the_next_poll_routes_around(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    fleet = await start_fleet(2, models="llama3.2", loaded=["llama3.2", ()])
    meter = await start_meter(settings=settings_of(fleet))
    held = fleet[0].hold_tokens("llama3.2", after=1)  # u1 (hot) streams one token, then waits
    chunks: list[Any] = []
    async with ollama.AsyncClient(host=meter.url) as client:
        stream = await client.generate("llama3.2", "hi", stream=True)

        async def read() -> None:
            async for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == 1:
                    await fleet[0].refuse()  # u1 dies with the stream open

        with pytest.raises(httpx.RemoteProtocolError):  # the body ended before its end
            await read()
        held.set()
        assert len(chunks) == 1
        assert meter.value(
            "request_errors_total", endpoint="/api/generate", model="llama3.2:latest",
            reason="upstream_closed",
        ) == 1  # fmt: skip
        assert not [c for c in fleet[1].calls if c.path == "/api/generate"]  # not retried
        await meter.app[FLEET].poll_all(tags=False)  # the next 2 s poll
        reply = await client.generate("llama3.2", "hi")
        assert reply.done
    assert [c.path for c in fleet[1].calls if c.path == "/api/generate"] == ["/api/generate"]


async def test_fleet_status_and_fleet_pull_from_the_command_line(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    fleet = await start_fleet(2, models="llama3.2", loaded=["llama3.2", ()])
    meter = await start_meter(settings=settings_of(fleet))
    await fleet[1].refuse()
    await meter.app[FLEET].poll_all(tags=False)

    def run(*args: str) -> Result:
        return CliRunner().invoke(main, ["fleet", *args, "--url", meter.url])

    result = await asyncio.to_thread(run, "status")
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()]
    assert rows[0][:3] == ["UPSTREAM", "UP", "BREAKER"]
    assert rows[1][:5] == ["u1", "up", "closed", "1", "llama3.2:latest"]
    assert rows[2][:2] == ["u2", "down"]
    await fleet[1].restore()
    await meter.app[FLEET].poll_all(tags=False)
    result = await asyncio.to_thread(
        run, "pull", "qwen3:8b", "--upstream", "u1", "--upstream", "u2"
    )
    assert result.exit_code == 0, result.output
    assert "u1: qwen3:8b pulled" in result.output
    assert "u2: qwen3:8b pulled" in result.output
    pulls = [
        (u.name, orjson.loads(r.body)["model"]) for u in fleet for r in u.received
        if r.path == "/api/pull"
    ]  # fmt: skip
    assert pulls == [("u1", "qwen3:8b"), ("u2", "qwen3:8b")]
    result = await asyncio.to_thread(run, "pull", "x", "--upstream", "nope")
    assert result.exit_code == 1
    assert "no upstream named 'nope' (known: u1, u2)" in result.output


async def test_the_audit_line_names_the_upstream_a_call_went_to(
    start_meter: MeterFactory, start_fleet: FleetFactory, tmp_path: Path
) -> None:
    fleet = await start_fleet(2, models="llama3.2")
    keys = make_keys(tmp_path)
    audit = tmp_path / "audit.jsonl"
    settings = dataclasses.replace(
        settings_of(fleet),
        access=AccessSettings(keys_file=keys.path, audit_log=str(audit)),
    )
    meter = await start_meter(settings=settings)
    headers = {"Authorization": f"Bearer {keys.admin}", "X-Ollama-Meter-Upstream": "u2"}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.delete(meter.url + "/api/delete", json={"model": "llama3.2"}) as response,
    ):
        assert response.status == 200
    log = meter.app[ACCESS].audit
    assert log is not None
    log.close()
    [line] = [orjson.loads(x) for x in audit.read_bytes().splitlines()]
    assert (line["upstream"], line["outcome"]) == ("u2", "success")


async def test_the_openai_sdk_sees_one_server(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    fleet = await start_fleet(2, models=["llama3.2", "qwen3:8b"])
    meter = await start_meter(settings=settings_of(fleet))
    http = openai_httpx().AsyncClient()
    client = openai.AsyncOpenAI(
        base_url=meter.url + "/v1", api_key="x", http_client=http, max_retries=0
    )
    try:
        listed = sorted(m.id for m in (await client.models.list()).data)
        assert listed == ["llama3.2:latest", "qwen3:8b"]
        for model in ("llama3.2", "qwen3:8b"):
            done = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}]
            )
            assert done.choices[0].message.content
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model="llama9", messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        await http.aclose()
    assert fleet.not_found() == 0

"""The fake fleet (tests/fake_fleet.py) does what the fleet tests rely on, over loopback: Ollama's
shapes, its scheduler's slots, loads and evictions, its 404 and 503, and the faults."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import ollama
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer

from .fake_fleet import BUSY, FakeUpstream, FleetFactory, Spec, specs
from .fake_sched import go_time, keep_alive_of

A, B, C = "llama3.2", "qwen3:8b", "nomic-embed-text"
NOW = 1_796_000_000.5


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    client: aiohttp.ClientSession, upstream: FakeUpstream, path: str, **doc: Any
) -> tuple[int, bytes]:
    async with client.post(upstream.url + path, json=doc) as response:
        return response.status, await response.read()


async def get(client: aiohttp.ClientSession, upstream: FakeUpstream, path: str) -> Any:
    async with client.get(upstream.url + path) as response:
        assert response.status == 200
        return orjson.loads(await response.read())


def generate(model: str = A, **doc: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "why is the sky blue", **doc}


def last(body: bytes) -> Any:
    return orjson.loads(body.splitlines()[-1])


def test_an_option_is_every_upstreams_unless_it_is_a_list() -> None:
    one, two = specs(2, {"models": [A, (A, B)], "slots": 4, "loaded": A})
    assert (one.models, two.models, one.slots, two.slots) == ((A,), (A, B), 4, 4)
    assert one.loaded == two.loaded == (A,)
    with pytest.raises(ValueError, match="slots has 1 values for 2 upstreams"):
        specs(2, {"slots": [1]})
    with pytest.raises(ValueError, match="unknown options"):
        specs(1, {"slot": 1})  # type: ignore[typeddict-unknown-key]
    assert keep_alive_of("1h30m", 300) == 5400
    assert keep_alive_of(-1, 300) < 0
    assert keep_alive_of("soon", 300) == 300


async def test_tags_and_ps_are_per_upstream_in_ollamas_shape(
    start_fleet: FleetFactory, client: aiohttp.ClientSession
) -> None:
    fleet = await start_fleet(
        2, models=[A, (A, B)], loaded=[(), B], keep_alive=60, clock=lambda: NOW
    )
    names = [[m["name"] for m in (await get(client, u, "/api/tags"))["models"]] for u in fleet]
    assert names == [["llama3.2:latest"], ["llama3.2:latest", "qwen3:8b"]]
    assert (await get(client, fleet[0], "/api/ps")) == {"models": []}
    (entry,) = (await get(client, fleet[1], "/api/ps"))["models"]
    assert list(entry) == [
        "name",
        "model",
        "size",
        "digest",
        "details",
        "expires_at",
        "size_vram",
        "context_length",
    ]
    assert (entry["name"], entry["expires_at"], entry["context_length"]) == (
        B,
        go_time(NOW + 60),
        4096,
    )
    assert entry["size_vram"] <= entry["size"]
    assert await post(client, fleet[0], "/api/generate", **generate(options={"num_ctx": 8192}))
    (entry,) = (await get(client, fleet[0], "/api/ps"))["models"]
    assert (entry["name"], entry["context_length"]) == ("llama3.2:latest", 8192)
    # The longest time left first, as Ollama lists them.
    await post(client, fleet[1], "/api/generate", **generate(keep_alive="2m"))
    listed = (await get(client, fleet[1], "/api/ps"))["models"]
    assert [(m["name"], m["expires_at"]) for m in listed] == [
        ("llama3.2:latest", go_time(NOW + 120)),
        (B, go_time(NOW + 60)),
    ]
    v1 = await get(client, fleet[1], "/v1/models")
    assert [m["id"] for m in v1["data"]] == ["llama3.2:latest", B]


@pytest.mark.parametrize(
    ("path", "doc", "body"),
    [
        ("/api/generate", generate(B), b'{"error":"model \'qwen3:8b\' not found"}'),
        ("/api/chat", {"model": B, "messages": [{"role": "user", "content": "hi"}]}, None),
        ("/api/show", {"model": "qwen3"}, b'{"error":"model \'qwen3:latest\' not found"}'),
        ("/api/embed", {"model": B, "input": "hi"}, None),
        (
            "/v1/chat/completions",
            {"model": B, "messages": [{"role": "user", "content": "x"}]},
            None,
        ),
    ],
)
async def test_a_model_it_does_not_hold_gets_ollamas_404_and_is_counted(
    start_fleet: FleetFactory,
    client: aiohttp.ClientSession,
    path: str,
    doc: dict[str, Any],
    body: bytes | None,
) -> None:
    fleet = await start_fleet(2, models=[A, B])
    status, got = await post(client, fleet[0], path, **doc)
    assert status == 404
    assert body is None or got == body
    if path == "/api/embed":
        assert got == b'{"error":"model \\"qwen3:8b\\" not found, try pulling it first"}'
    if path.startswith("/v1/"):
        assert orjson.loads(got)["error"]["type"] == "not_found_error"
    assert fleet[0].not_found[doc["model"]] == fleet.not_found() == 1
    assert fleet[0].calls[-1].status == 404
    assert fleet[1].loads.total() == 0
    # Names compare as Ollama compares them.
    assert (await post(client, fleet[0], "/api/generate", **generate("LLAMA3.2")))[0] == 200


async def test_a_cold_load_reports_its_delay_and_a_warm_request_almost_none(
    start_fleet: FleetFactory, client: aiohttp.ClientSession
) -> None:
    (upstream,) = await start_fleet(1, load_delay=5.0, time_scale=0)  # 5 s, never slept
    started = time.monotonic()
    cold = last((await post(client, upstream, "/api/generate", **generate()))[1])
    warm = last((await post(client, upstream, "/api/generate", **generate()))[1])
    assert time.monotonic() - started < 1
    assert cold["load_duration"] >= 5e9
    assert cold["total_duration"] >= cold["load_duration"] + cold["eval_duration"]
    assert 0 < warm["load_duration"] < 1e8
    assert [c.cold for c in upstream.calls] == [True, False]
    assert upstream.loads[A] == 1
    assert upstream.calls[0].headers["Content-Type"] == "application/json"
    assert orjson.loads(upstream.calls[0].body)["prompt"] == "why is the sky blue"


async def test_the_official_clients_read_it(start_fleet: FleetFactory) -> None:
    (upstream,) = await start_fleet(
        1, models=(A, C), load_delay=3.0, time_scale=0, clock=lambda: NOW
    )
    messages = [{"role": "user", "content": "hi"}]
    async with ollama.AsyncClient(host=upstream.url) as client:
        parts = [part async for part in await client.chat(model=A, messages=messages, stream=True)]
        assert "".join(p.message.content or "" for p in parts) == "Un café."
        assert (parts[-1].done, parts[-1].eval_count) == (True, 3)
        assert (parts[-1].load_duration or 0) >= 3e9
        embedded = await client.embed(model=C, input=["a", "b"])
        assert len(embedded.embeddings) == 2
        assert [m.model for m in (await client.ps()).models] == ["llama3.2:latest", C + ":latest"]
        assert [m.model for m in (await client.list()).models] == ["llama3.2:latest", C + ":latest"]
        with pytest.raises(ollama.ResponseError) as caught:
            await client.generate(model=B, prompt="hi")
        assert (caught.value.status_code, caught.value.error) == (404, f"model '{B}' not found")
    async with openai.AsyncOpenAI(
        base_url=upstream.url + "/v1", api_key="ollama", max_retries=0
    ) as sdk:
        stream = await sdk.chat.completions.create(
            model=A,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 3


@pytest.mark.parametrize(("delay", "scale"), [(0.01, 1.0), (2.0, 0.0)])
async def test_the_token_delay_is_slept_times_time_scale_and_reported_whole(
    start_fleet: FleetFactory, client: aiohttp.ClientSession, delay: float, scale: float
) -> None:
    (upstream,) = await start_fleet(1, loaded=A, tokens=3, token_delay=delay, time_scale=scale)
    started = time.monotonic()
    final = last((await post(client, upstream, "/api/generate", **generate()))[1])
    elapsed = time.monotonic() - started
    assert final["eval_count"] == 3
    assert final["eval_duration"] >= 3 * delay * 1e9
    assert 3 * delay * scale <= elapsed < 3 * delay * scale + 1


async def test_a_stream_is_one_object_per_write_and_waits_at_its_gates(
    start_fleet: FleetFactory, client: aiohttp.ClientSession
) -> None:
    (upstream,) = await start_fleet(1, loaded=A)
    gate = upstream.hold_tokens(A, after=1)
    doc = {"model": A, "messages": [{"role": "user", "content": "hi"}]}
    async with client.post(upstream.url + "/api/chat", json=doc) as response:
        assert response.headers["Content-Type"] == "application/x-ndjson"
        first = orjson.loads(await response.content.readline())
        assert first["message"] == {"role": "assistant", "content": "Un"}
        assert first["done"] is False
        assert upstream.running(A) == 1  # it waits at the gate, holding its slot
        gate.set()
        rest = [orjson.loads(line) for line in (await response.read()).splitlines()]
    assert [line["done"] for line in rest] == [False, False, True]
    assert list(rest[-1])[:5] == ["model", "created_at", "message", "done", "done_reason"]
    assert rest[-1]["eval_count"] == 3
    await upstream.wait_until(lambda: upstream.in_flight(A) == 0)


async def test_a_whole_reply_and_num_predict(
    start_fleet: FleetFactory, client: aiohttp.ClientSession
) -> None:
    (upstream,) = await start_fleet(1)
    doc = generate(stream=False, options={"num_predict": 4})
    status, body = await post(client, upstream, "/api/generate", **doc)
    reply = orjson.loads(body)
    assert (status, body.endswith(b"}"), reply["done"]) == (200, True, True)
    assert (reply["response"], reply["eval_count"], reply["done_reason"]) == (
        "Un café.Un",
        4,
        "length",
    )
    assert reply["prompt_eval_count"] == 5


@pytest.mark.parametrize("include_usage", [True, False])
async def test_v1_chat_streams_sse_and_answers_json_with_usage(
    start_fleet: FleetFactory, client: aiohttp.ClientSession, include_usage: bool
) -> None:
    (upstream,) = await start_fleet(1)
    doc: dict[str, Any] = {"model": A, "messages": [{"role": "user", "content": "hi there"}]}
    options = {"include_usage": include_usage}
    status, body = await post(client, upstream, "/v1/chat/completions", **doc)
    whole = orjson.loads(body)
    assert whole["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert whole["choices"][0]["message"]["content"] == "Un café."
    status, body = await post(
        client, upstream, "/v1/chat/completions", stream=True, stream_options=options, **doc
    )
    events = body.split(b"\n\n")
    assert (status, events[-2:]) == (200, [b"data: [DONE]", b""])
    chunks = [orjson.loads(event.removeprefix(b"data: ")) for event in events[:-2]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Un"}
    usage = [chunk["usage"] for chunk in chunks if not chunk["choices"]]
    assert usage == ([whole["usage"]] if include_usage else [])


async def test_slots_is_a_semaphore_with_an_unbounded_queue(
    start_fleet: FleetFactory, client: aiohttp.ClientSession
) -> None:
    (upstream,) = await start_fleet(1, slots=2)
    gate = upstream.hold_tokens(A)
    requests = [
        asyncio.create_task(post(client, upstream, "/api/generate", **generate())) for _ in range(5)
    ]
    await upstream.wait_until(lambda: upstream.running(A) == 2 and upstream.in_flight(A) == 5)
    gate.set()
    assert [status for status, _ in await asyncio.gather(*requests)] == [200] * 5
    assert (upstream.peak[A], upstream.loads[A]) == (2, 1)


async def test_an_eviction_waits_for_its_victim_to_be_idle(
    start_fleet: FleetFactory, client: aiohttp.ClientSession
) -> None:
    (upstream,) = await start_fleet(1, max_loaded=1)
    gate = upstream.hold_tokens(A)
    first_a = asyncio.create_task(post(client, upstream, "/api/generate", **generate(A)))
    await upstream.wait_until(lambda: upstream.running(A) == 1)
    b = asyncio.create_task(post(client, upstream, "/api/generate", **generate(B)))
    await upstream.wait_until(lambda: upstream.placing == 1)
    # Placement is serial, as in Ollama: a request for the loaded model now waits too.
    second_a = asyncio.create_task(post(client, upstream, "/api/generate", **generate(A)))
    await upstream.wait_until(lambda: upstream.placing == 2)
    assert (upstream.loaded(), upstream.evictions.total()) == (["llama3.2:latest"], 0)
    gate.set()
    assert [s for s, _ in await asyncio.gather(first_a, b, second_a)] == [200, 200, 200]
    assert (upstream.loads[A], upstream.loads[B]) == (2, 1)
    assert (upstream.evictions[A], upstream.evictions[B], upstream.peak_loaded) == (1, 1, 1)


async def test_the_victim_is_an_idle_model_least_recently_used_first(
    start_fleet: FleetFactory, client: aiohttp.ClientSession
) -> None:
    (upstream,) = await start_fleet(1, models=(A, B, C), max_loaded=2)
    gate = upstream.hold_tokens(A)
    busy_a = asyncio.create_task(post(client, upstream, "/api/generate", **generate(A)))
    await upstream.wait_until(lambda: upstream.running(A) == 1)
    await post(client, upstream, "/api/generate", **generate(B))
    await post(client, upstream, "/api/embed", model=C, input="hi")  # A is older, but busy
    assert (upstream.evictions[B], sorted(upstream.loaded())) == (1, [A + ":latest", C + ":latest"])
    gate.set()
    await busy_a  # A was in use until now: C is the least recently used
    await post(client, upstream, "/api/generate", **generate(B))
    assert (upstream.evictions[C], sorted(upstream.loaded())) == (1, [A + ":latest", B])


async def test_a_load_in_progress_is_listed_and_shared(
    start_fleet: FleetFactory, client: aiohttp.ClientSession
) -> None:
    (upstream,) = await start_fleet(1)
    gate = upstream.hold_loads(A)
    requests = [
        asyncio.create_task(post(client, upstream, "/api/generate", **generate())) for _ in "ab"
    ]
    await upstream.wait_until(lambda: upstream.placing == 1)  # the second waits for the load
    assert [m["name"] for m in (await get(client, upstream, "/api/ps"))["models"]] == [
        "llama3.2:latest"
    ]
    gate.set()
    assert [s for s, _ in await asyncio.gather(*requests)] == [200, 200]
    assert upstream.loads[A] == 1
    assert sorted(c.cold for c in upstream.calls if c.path == "/api/generate") == [False, True]


async def test_keep_alive_runs_out_by_the_clock_and_zero_unloads(
    start_fleet: FleetFactory, client: aiohttp.ClientSession
) -> None:
    now = [NOW]
    (upstream,) = await start_fleet(1, keep_alive=60, clock=lambda: now[0])
    await post(client, upstream, "/api/generate", **generate())
    (entry,) = (await get(client, upstream, "/api/ps"))["models"]
    assert entry["expires_at"] == go_time(NOW + 60)
    now[0] += 60
    assert (upstream.loaded(), upstream.unloads[A]) == ([], 1)
    _, body = await post(client, upstream, "/api/generate", **generate(prompt=""))
    assert orjson.loads(body)["done_reason"] == "load"
    assert upstream.loaded() == ["llama3.2:latest"]
    _, body = await post(client, upstream, "/api/generate", model=A, keep_alive=0)
    assert (orjson.loads(body)["done_reason"], upstream.loaded()) == ("unload", [])
    await post(client, upstream, "/api/generate", **generate(keep_alive="0s"))
    assert (upstream.loaded(), upstream.unloads[A], upstream.loads[A]) == ([], 3, 3)


async def test_busy_is_ollamas_503_and_so_is_a_full_queue(
    start_fleet: FleetFactory, client: aiohttp.ClientSession
) -> None:
    (upstream,) = await start_fleet(1, max_queue=0)
    upstream.busy = True
    assert await post(client, upstream, "/api/generate", **generate()) == (
        503,
        orjson.dumps({"error": BUSY}),
    )
    doc = {"model": A, "messages": [{"role": "user", "content": "hi"}]}
    status, body = await post(client, upstream, "/v1/chat/completions", **doc)
    assert (status, orjson.loads(body)["error"]["message"]) == (503, BUSY)
    upstream.busy = False
    gate = upstream.hold_loads(A)
    loading = [
        asyncio.create_task(post(client, upstream, "/api/generate", **generate())) for _ in "ab"
    ]
    await upstream.wait_until(lambda: upstream.placing == 1)  # one being placed, none queued
    assert (await post(client, upstream, "/api/generate", **generate()))[0] == 503
    gate.set()
    assert [s for s, _ in await asyncio.gather(*loading)] == [200, 200]
    assert upstream.busy_replies == 3


async def test_refused_cuts_open_streams_and_comes_back_on_the_same_port(
    start_fleet: FleetFactory, client: aiohttp.ClientSession
) -> None:
    (upstream,) = await start_fleet(1)
    gate = upstream.hold_tokens(A, after=1)  # the stream stays open
    url = upstream.url
    async with client.post(url + "/api/generate", json=generate()) as response:
        await response.content.readline()
        await upstream.refuse()
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    await upstream.wait_until(lambda: upstream.in_flight(A) == 0)  # its slot is free again
    assert upstream.calls[-1].cancelled
    gate.set()
    with pytest.raises(aiohttp.ClientConnectorError):
        await post(client, upstream, "/api/version")
    await upstream.restore()
    assert upstream.url == url
    assert (await post(client, upstream, "/api/generate", **generate(stream=False)))[0] == 200


async def test_hang_reads_the_request_and_never_answers(
    start_fleet: FleetFactory, client: aiohttp.ClientSession
) -> None:
    (upstream,) = await start_fleet(1)
    upstream.hang = True
    request = asyncio.create_task(post(client, upstream, "/api/version"))
    await upstream.wait_for("/api/version", 1)
    await upstream.refuse()  # the only way it ends
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await request


async def test_closing_an_upstream_does_not_wait_for_what_it_holds(
    client: aiohttp.ClientSession,
) -> None:
    upstream = FakeUpstream("u1", Spec())
    server = TestServer(upstream.app)
    await server.start_server()
    upstream.attach(server)
    upstream.hang = True
    request = asyncio.create_task(post(client, upstream, "/api/version"))
    await upstream.wait_for("/api/version", 1)
    await asyncio.wait_for(server.close(), 5)  # aiohttp alone would wait 60 s for the handler
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await request


@pytest.mark.parametrize("after", [0, 2])
async def test_drop_after_k_chunks(
    start_fleet: FleetFactory, client: aiohttp.ClientSession, after: int
) -> None:
    (upstream,) = await start_fleet(1)
    upstream.drop_after = after
    if after == 0:  # before the status line: a reset before headers
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await post(client, upstream, "/api/generate", **generate())
        assert upstream.calls[-1].status == 0
        return
    async with client.post(upstream.url + "/api/generate", json=generate()) as response:
        lines = [await response.content.readline() for _ in range(after)]
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert [orjson.loads(line)["done"] for line in lines] == [False, False]

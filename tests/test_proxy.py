"""Pass-through behaviour over real loopback sockets: bytes, headers, streaming, failures.

Every exchange is made twice, straight to the fake Ollama and through ollama-meter, and the two
are compared: what the client got, and what the upstream received.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from ollama_meter.app import METRICS, create_app
from ollama_meter.config import Config
from ollama_meter.metrics import build_registry

from .conftest import Meter, MeterFactory, unused_port
from .fake_ollama import JSON_UTF8, NDJSON, FakeOllama, Received, Reply, final_object, lines_of

# Headers that differ between two responses for reasons other than the proxy.
VOLATILE_RESPONSE = frozenset({"date", "connection", "keep-alive", "transfer-encoding"})


@dataclass
class Got:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def comparable(self) -> tuple[int, list[tuple[str, str]], bytes]:
        kept = [
            (k.lower(), v) for k, v in self.headers.items() if k.lower() not in VOLATILE_RESPONSE
        ]
        return self.status, sorted(kept), self.body


@pytest.fixture
async def raw() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that changes nothing: no decompression, no cookie jar."""
    async with aiohttp.ClientSession(
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        yield session


async def fetch(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Got:
    async with session.request(method, url, allow_redirects=False, **kwargs) as response:
        body = await response.read()
        return Got(response.status, CIMultiDict(response.headers), body)


async def both(
    raw: aiohttp.ClientSession,
    fake: FakeOllama,
    meter: Meter,
    method: str,
    path: str,
    **kwargs: Any,
) -> Got:
    """The same request direct and proxied; asserts both sides saw the same; returns proxied."""
    direct = await fetch(raw, method, fake.url + path, **kwargs)
    direct_received = fake.received[-1]
    proxied = await fetch(raw, method, meter.url + path, **kwargs)
    assert proxied.comparable() == direct.comparable()
    assert fake.received[-1].view() == direct_received.view()
    return proxied


CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "Why is the sky blue?"}]}

EXCHANGES = [
    ("GET", "/", None),
    ("HEAD", "/", None),
    ("GET", "/api/version", None),
    ("GET", "/api/tags", None),
    ("GET", "/api/ps", None),
    ("POST", "/api/show", {"model": "llama3.2"}),
    ("DELETE", "/api/delete", {"model": "llama3.2"}),
    ("POST", "/api/chat", CHAT),
    ("POST", "/api/chat", {**CHAT, "stream": False}),
    ("POST", "/api/chat", {**CHAT, "model": "qwen3:8b", "tools": [{"type": "function"}]}),
    ("POST", "/api/chat", {**CHAT, "model": "llama9"}),
    ("POST", "/api/generate", {"model": "llama3.2", "prompt": "One French word?"}),
    ("POST", "/api/generate", {"model": "llama3.2"}),
    ("POST", "/api/embed", {"model": "nomic-embed-text", "input": ["a", "b"]}),
    ("POST", "/api/pull", {"model": "llama3.2"}),
    ("POST", "/v1/chat/completions", {**CHAT, "stream": True}),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/chat/completions", {**CHAT, "model": "gpt-4o"}),
    ("GET", "/no/such/path?x=1&y=%2F", None),
]


@pytest.mark.parametrize(("method", "path", "body"), EXCHANGES)
async def test_exchange_is_byte_for_byte(
    raw: aiohttp.ClientSession,
    fake: FakeOllama,
    meter: Meter,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    data = orjson.dumps(body) if body is not None else None
    got = await both(raw, fake, meter, method, path, data=data)
    assert got.status in (200, 404)
    assert "Server" not in got.headers


async def test_malformed_body_is_forwarded_untouched_and_labelled_unknown(
    raw: aiohttp.ClientSession, fake: FakeOllama, meter: Meter
) -> None:
    got = await both(raw, fake, meter, "POST", "/api/chat", data=b'{"model": "llama3.2", oops')
    assert got.status == 400
    assert (
        meter.value(
            "requests_total", endpoint="/api/chat", model="unknown", stream="true", status="400"
        )
        == 1
    )


async def test_gzip_body_passes_compressed(
    raw: aiohttp.ClientSession, fake: FakeOllama, meter: Meter
) -> None:
    compressed = gzip.compress(b'{"version":"0.33.0"}')
    for _ in range(2):
        fake.script(
            "GET",
            "/api/version",
            Reply(chunks=[compressed], headers={"Content-Encoding": "gzip"}, chunked=False),
        )
    got = await both(raw, fake, meter, "GET", "/api/version")
    assert got.body == compressed
    assert got.headers["Content-Encoding"] == "gzip"


async def test_host_is_rewritten_to_the_upstream(
    raw: aiohttp.ClientSession, fake: FakeOllama, start_meter: MeterFactory
) -> None:
    meter = await start_meter(allowed_hosts="meter.example.com")
    await fetch(raw, "GET", meter.url + "/api/version", headers={"Host": "meter.example.com"})
    assert fake.received[-1].headers["Host"] == fake.url.removeprefix("http://")


async def test_preserve_host_keeps_the_clients(
    raw: aiohttp.ClientSession, fake: FakeOllama, start_meter: MeterFactory
) -> None:
    meter = await start_meter(preserve_host=True, allowed_hosts="meter.example.com")
    await fetch(raw, "GET", meter.url + "/api/version", headers={"Host": "meter.example.com"})
    assert fake.received[-1].headers["Host"] == "meter.example.com"


async def test_forwarded_headers_are_added(
    raw: aiohttp.ClientSession, fake: FakeOllama, meter: Meter
) -> None:
    await fetch(raw, "GET", meter.url + "/", headers={"X-Forwarded-For": "203.0.113.7"})
    headers = fake.received[-1].headers
    assert headers.getall("X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    assert headers["X-Forwarded-Proto"] == "http"


FORWARDED = {
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "a.example",
    "X-Forwarded-Port": "8",
    "X-Forwarded-Prefix": "/x",
    "Forwarded": "for=1.2.3.4;proto=https",
    "X-Real-IP": "1.2.3.4",
}


@pytest.mark.parametrize(
    ("trusted", "kept"), [("", False), ("10.0.0.0/8", False), ("127.0.0.0/8,::1", True)]
)
async def test_forwarding_headers_are_believed_only_from_trusted_proxies(
    raw: aiohttp.ClientSession,
    fake: FakeOllama,
    start_meter: MeterFactory,
    trusted: str,
    kept: bool,
) -> None:
    meter = await start_meter(trusted_proxies=trusted)
    await fetch(raw, "GET", meter.url + "/", headers=FORWARDED)
    headers = fake.received[-1].headers
    if kept:
        assert {name: headers.get(name) for name in FORWARDED} == FORWARDED
    else:
        assert headers.getall("X-Forwarded-Proto") == ["http"]
        assert [name for name in FORWARDED if name in headers] == ["X-Forwarded-Proto"]


async def test_hop_by_hop_headers_are_stripped_both_ways(
    raw: aiohttp.ClientSession, fake: FakeOllama, meter: Meter
) -> None:
    fake.script(
        "GET",
        "/api/version",
        Reply(
            chunks=[b'{"version":"0.33.0"}'],
            chunked=False,
            headers={
                "Connection": "X-Upstream-Hop",
                "X-Upstream-Hop": "1",
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": "Basic",
                "X-Custom": "end-to-end",
            },
        ),
    )
    got = await fetch(
        raw,
        "GET",
        meter.url + "/api/version",
        headers={
            "Connection": "keep-alive, X-Client-Hop",
            "X-Client-Hop": "1",
            "TE": "trailers",
            "Proxy-Authorization": "Basic eA==",
            "Upgrade": "h2c",
            "X-Custom": "end-to-end",
        },
    )
    sent = fake.received[-1].headers
    for name in ("X-Client-Hop", "TE", "Proxy-Authorization", "Upgrade"):
        assert name not in sent
    assert sent["X-Custom"] == "end-to-end"
    for name in ("X-Upstream-Hop", "Keep-Alive", "Proxy-Authenticate"):
        assert name not in got.headers
    assert got.headers["X-Custom"] == "end-to-end"
    assert got.body == b'{"version":"0.33.0"}'


async def test_responses_are_not_buffered(
    raw: aiohttp.ClientSession, fake: FakeOllama, meter: Meter
) -> None:
    lines = lines_of("chat_stream.ndjson")
    gate = asyncio.Event()
    fake.script("POST", "/api/chat", Reply(content_type=NDJSON, chunks=lines, gates={1: gate}))
    async with raw.post(meter.url + "/api/chat", json=CHAT) as response:
        # The upstream is now blocked until we set the gate, so line 1 can only arrive here if
        # the proxy forwarded it on its own.
        first = await asyncio.wait_for(response.content.readline(), timeout=5)
        assert first == lines[0]
        assert meter.value("requests_in_flight", endpoint="/api/chat", model="llama3.2:latest") == 1
        gate.set()
        rest = await response.read()
    assert first + rest == b"".join(lines)
    assert meter.value("requests_in_flight", endpoint="/api/chat", model="llama3.2:latest") == 0


async def test_request_bodies_stream_upstream_as_they_arrive(
    fake: FakeOllama, meter: Meter
) -> None:
    """The upstream gets the first part of an upload while the client still holds the rest."""
    digest = "sha256:" + "0" * 64
    more = asyncio.Event()
    arrived = asyncio.Event()
    original = fake._receive

    async def receive(request: Any) -> Received:
        # Wait until the first piece is readable upstream, then let the client send the rest.
        await request.content.readany()
        arrived.set()
        return await original(request)

    fake._receive = receive  # type: ignore[method-assign]

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        await more.wait()
        yield b"b" * 1000

    async with aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(
            session.post(meter.url + f"/api/blobs/{digest}", data=body())
        )
        await asyncio.wait_for(arrived.wait(), timeout=5)
        more.set()
        response = await request
        assert response.status == 400
        assert "digest mismatch" in (await response.json())["error"]  # the fake hashed the bytes
        response.release()


@pytest.mark.parametrize("fixed_length", [False, True])
async def test_final_line_split_at_every_offset_counts_right(
    raw: aiohttp.ClientSession, fake: FakeOllama, meter: Meter, fixed_length: bool
) -> None:
    body = b"".join(lines_of("chat_stream.ndjson"))
    final = final_object("chat_stream.ndjson")
    start = body.rindex(b"\n", 0, len(body) - 1)
    offsets = range(start - 2, len(body) + 1)
    for offset in offsets:
        fake.script(
            "POST",
            "/api/chat",
            Reply(
                content_type=NDJSON, chunks=[body[:offset], body[offset:]], chunked=not fixed_length
            ),
        )
        got = await fetch(raw, "POST", meter.url + "/api/chat", json=CHAT)
        assert got.body == body
    labels = {"endpoint": "/api/chat", "model": "llama3.2:latest", "stream": "true"}
    assert meter.value("completion_tokens_total", **labels) == final["eval_count"] * len(offsets)
    assert meter.value("prompt_tokens_total", **labels) == final["prompt_eval_count"] * len(offsets)
    assert (
        meter.value(
            "request_errors_total",
            endpoint="/api/chat",
            model="llama3.2:latest",
            reason="upstream_closed",
        )
        == 0
    )


async def test_client_disconnect_cancels_the_upstream(fake: FakeOllama, meter: Meter) -> None:
    lines = lines_of("chat_stream.ndjson")
    never = asyncio.Event()
    fake.script("POST", "/api/chat", Reply(content_type=NDJSON, chunks=lines, gates={1: never}))
    async with aiohttp.ClientSession() as session:
        response = await session.post(meter.url + "/api/chat", json=CHAT)
        assert await response.content.readline() == lines[0]
        response.close()  # drop the connection mid-stream
    # The fake's handler is cancelled when the proxy closes its upstream connection.
    await asyncio.wait_for(fake.cancelled.wait(), timeout=5)
    # The proxy recorded the request in the same step in which it closed the upstream
    # connection, so it is there before the fake can notice that close.
    labels = {"endpoint": "/api/chat", "model": "llama3.2:latest"}
    assert meter.value("requests_total", **labels, stream="true", status="499") == 1
    assert meter.value("request_errors_total", **labels, reason="client_disconnect") == 1
    assert meter.value("requests_in_flight", **labels) == 0


async def test_upstream_closing_mid_stream_is_a_truncation_for_the_client(
    raw: aiohttp.ClientSession, fake: FakeOllama, meter: Meter
) -> None:
    lines = lines_of("chat_stream.ndjson")[:2]
    for _ in range(2):
        fake.script("POST", "/api/chat", Reply(content_type=NDJSON, chunks=lines, cut=True))
    received = {}
    for name, url in (("direct", fake.url), ("proxied", meter.url)):
        async with raw.post(url + "/api/chat", json=CHAT) as response:
            assert response.status == 200
            got = bytearray()

            async def drain(
                response: aiohttp.ClientResponse = response, got: bytearray = got
            ) -> None:
                async for chunk in response.content.iter_any():
                    got.extend(chunk)

            with pytest.raises(aiohttp.ClientPayloadError):
                await drain()
            received[name] = bytes(got)
    assert received["proxied"] == received["direct"] == b"".join(lines)
    labels = {"endpoint": "/api/chat", "model": "llama3.2:latest"}
    assert meter.value("request_errors_total", **labels, reason="upstream_closed") == 1
    assert meter.value("requests_total", **labels, stream="true", status="200") == 1


async def test_mid_stream_error_line_is_counted(
    raw: aiohttp.ClientSession, fake: FakeOllama, meter: Meter
) -> None:
    lines = lines_of("chat_stream_midstream_error.ndjson")
    for _ in range(2):
        fake.script("POST", "/api/chat", Reply(content_type=NDJSON, chunks=lines))
    got = await both(raw, fake, meter, "POST", "/api/chat", json=CHAT)
    assert got.body == b"".join(lines)
    labels = {"endpoint": "/api/chat", "model": "llama3.2:latest"}
    assert meter.value("request_errors_total", **labels, reason="stream_error") == 1
    assert meter.value("completion_tokens_total", **labels, stream="true") == 0


async def test_upstream_error_status_passes_through_labelled(
    raw: aiohttp.ClientSession, fake: FakeOllama, meter: Meter
) -> None:
    got = await both(raw, fake, meter, "POST", "/api/chat", json={**CHAT, "model": "llama9"})
    assert got.status == 404
    assert orjson.loads(got.body) == {"error": "model 'llama9' not found"}
    assert (
        meter.value(
            "requests_total",
            endpoint="/api/chat",
            model="llama9:latest",
            stream="true",
            status="404",
        )
        == 1
    )


async def test_unreachable_upstream_is_a_502_in_ollamas_shape(
    raw: aiohttp.ClientSession, start_meter: MeterFactory
) -> None:
    upstream = f"http://127.0.0.1:{unused_port()}"
    meter = await start_meter(upstream=upstream)
    got = await fetch(raw, "POST", meter.url + "/api/chat", json=CHAT)
    assert got.status == 502
    assert got.headers["Content-Type"] == JSON_UTF8
    assert orjson.loads(got.body) == {"error": "ollama-meter: upstream: connection refused"}
    labels = {"endpoint": "/api/chat", "model": "llama3.2:latest"}
    assert meter.value("request_errors_total", **labels, reason="upstream_unreachable") == 1
    assert meter.value("requests_total", **labels, stream="true", status="502") == 1


async def test_silent_upstream_is_a_504(
    raw: aiohttp.ClientSession, fake: FakeOllama, start_meter: MeterFactory
) -> None:
    meter = await start_meter(read_timeout=0.2)
    never = asyncio.Event()
    fake.script("POST", "/api/chat", Reply(content_type=NDJSON, chunks=[b"{}\n"], gates={0: never}))
    # The fake answers headers only with its first chunk, like Ollama: so no headers at all.
    got = await fetch(raw, "POST", meter.url + "/api/chat", json=CHAT)
    assert got.status == 504
    assert orjson.loads(got.body) == {"error": "ollama-meter: upstream: no data for 0.2s"}
    labels = {"endpoint": "/api/chat", "model": "llama3.2:latest"}
    assert meter.value("request_errors_total", **labels, reason="upstream_timeout") == 1


async def test_upstream_stalling_mid_stream_is_cut_and_counted(
    raw: aiohttp.ClientSession, fake: FakeOllama, start_meter: MeterFactory
) -> None:
    meter = await start_meter(read_timeout=0.2)
    lines = lines_of("chat_stream.ndjson")
    never = asyncio.Event()
    fake.script("POST", "/api/chat", Reply(content_type=NDJSON, chunks=lines, gates={1: never}))
    async with raw.post(meter.url + "/api/chat", json=CHAT) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    labels = {"endpoint": "/api/chat", "model": "llama3.2:latest"}
    assert meter.value("request_errors_total", **labels, reason="upstream_timeout") == 1


async def test_existing_blob_answer_before_the_body_is_relayed(
    fake: FakeOllama, meter: Meter
) -> None:
    digest = "sha256:" + "1" * 64
    fake.script("POST", f"/api/blobs/{digest}", Reply(200, None, read_body=False))

    async def body() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"x" * 65536

    async with (
        aiohttp.ClientSession() as session,
        session.post(meter.url + f"/api/blobs/{digest}", data=body()) as response,
    ):
        assert response.status == 200
        assert await response.read() == b""
    labels = {"endpoint": "/api/blobs/{digest}", "model": "unknown"}
    assert meter.value("requests_total", **labels, stream="false", status="200") == 1
    for reason in ("upstream_closed", "upstream_unreachable"):
        assert meter.value("request_errors_total", **labels, reason=reason) == 0


async def test_answer_before_a_streamed_body_ends_closes_the_upstream_connection(
    fake: FakeOllama, meter: Meter
) -> None:
    # The upstream answered while the request body was still coming, and kept the connection:
    # it still expects the rest of that body, so the proxy must close it, never reuse it.
    digest = "sha256:" + "2" * 64
    early = Reply(200, None, read_body=False, keep_alive=True)
    fake.script("POST", f"/api/blobs/{digest}", early)
    answered = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 65536
        await answered.wait()
        yield b"y" * 65536

    async with aiohttp.ClientSession() as session:
        async with session.post(meter.url + f"/api/blobs/{digest}", data=body()) as response:
            assert response.status == 200
            assert await response.read() == b""
            answered.set()
        async with asyncio.timeout(10), session.get(meter.url + "/api/tags") as response:
            assert response.status == 200
            await response.read()
    assert fake.last("/api/tags").port != fake.last(f"/api/blobs/{digest}").port


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_over_the_inspect_cap_streams_through_unlabelled(
    fake: FakeOllama, start_meter: MeterFactory, chunked: bool
) -> None:
    meter = await start_meter(max_inspect_bytes=1000)
    payload = orjson.dumps({**CHAT, "images": ["A" * 5000], "stream": False})

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 700):
            yield payload[i : i + 700]

    async with aiohttp.ClientSession() as session:
        data: Any = pieces() if chunked else payload
        async with session.post(meter.url + "/api/chat", data=data) as response:
            assert response.status == 200
            await response.read()
    assert fake.received[-1].body == payload
    assert (
        meter.value(
            "requests_total", endpoint="/api/chat", model="unknown", stream="true", status="200"
        )
        == 1
    )
    small = orjson.dumps({**CHAT, "stream": False})
    async with (
        aiohttp.ClientSession() as session,
        session.post(meter.url + "/api/chat", data=small) as response,
    ):
        await response.read()
    assert (
        meter.value(
            "requests_total",
            endpoint="/api/chat",
            model="llama3.2:latest",
            stream="false",
            status="200",
        )
        == 1
    )


async def test_health_and_readiness(
    raw: aiohttp.ClientSession, start_meter: MeterFactory, meter: Meter
) -> None:
    assert (await fetch(raw, "GET", meter.url + "/-/healthy")).status == 200
    assert (await fetch(raw, "GET", meter.url + "/-/ready")).status == 200
    down = await start_meter(upstream=f"http://127.0.0.1:{unused_port()}")
    assert (await fetch(raw, "GET", down.url + "/-/healthy")).status == 200
    assert (await fetch(raw, "GET", down.url + "/-/ready")).status == 503


async def test_upstream_base_path_is_kept(
    raw: aiohttp.ClientSession, fake: FakeOllama, start_meter: MeterFactory
) -> None:
    meter = await start_meter(upstream=fake.url + "/ollama/")
    await fetch(raw, "POST", meter.url + "/api/chat?trace=1", json=CHAT)
    assert fake.received[-1].path == "/ollama/api/chat?trace=1"


async def test_a_slow_upload_is_not_cut_by_the_read_timeout(
    fake: FakeOllama, start_meter: MeterFactory
) -> None:
    """aiohttp starts the read timeout once the request body is sent: an upload may take
    longer than --read-timeout (a multi-GB blob on a slow link), its answer may not."""
    read_timeout = 0.2
    meter = await start_meter(read_timeout=read_timeout)
    pieces = [b"a" * 1000, b"b" * 1000]
    digest = "sha256:" + hashlib.sha256(b"".join(pieces)).hexdigest()

    async def slow_body() -> AsyncIterator[bytes]:
        yield pieces[0]
        # The condition under test, not synchronisation: a pause longer than the timeout.
        await asyncio.sleep(read_timeout * 2)
        yield pieces[1]

    async with (
        aiohttp.ClientSession() as session,
        session.post(meter.url + f"/api/blobs/{digest}", data=slow_body()) as response,
    ):
        assert response.status == 201
    assert fake.last(f"/api/blobs/{digest}").size == 2000


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_of_exactly_the_inspect_cap_is_inspected(
    fake: FakeOllama, start_meter: MeterFactory, chunked: bool
) -> None:
    payload = orjson.dumps({**CHAT, "stream": False})
    meter = await start_meter(max_inspect_bytes=len(payload))

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 10):
            yield payload[i : i + 10]

    async with aiohttp.ClientSession() as session:
        for data in (pieces() if chunked else payload, payload + b" "):
            async with session.post(meter.url + "/api/chat", data=data) as response:
                await response.read()
    labels = {"endpoint": "/api/chat", "status": "200"}
    assert meter.value("requests_total", model="llama3.2:latest", stream="false", **labels) == 1
    # One byte more is over the cap: not read, so unlabelled.
    assert meter.value("requests_total", model="unknown", stream="true", **labels) == 1


async def test_a_disconnect_seen_as_a_failed_write_is_a_499(fake: FakeOllama) -> None:
    """Without handler cancellation, a client that left shows up as a write to a closed
    transport (ConnectionError), not as a cancellation: it is still a 499."""
    app = create_app(Config.build(listen="127.0.0.1:0", upstream=fake.url), build_registry())
    view = CollectorRegistry()
    view.register(app[METRICS])
    runner = web.AppRunner(app, handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        lines = lines_of("chat_stream.ndjson")
        gate = asyncio.Event()
        gates = {1: gate, 2: asyncio.Event()}  # line 2 after the gate, then nothing
        fake.script("POST", "/api/chat", Reply(content_type=NDJSON, chunks=lines, gates=gates))
        async with aiohttp.ClientSession() as session:
            response = await session.post(f"http://127.0.0.1:{port}/api/chat", json=CHAT)
            assert await response.content.readline() == lines[0]
            response.close()
        assert runner.server is not None
        async with asyncio.timeout(5):
            # Until the proxy's server has seen the connection go (aiohttp has no event for
            # it); each turn only yields to the loop.
            while any(h.transport is not None for h in runner.server.connections):  # noqa: ASYNC110
                await asyncio.sleep(0)
        gate.set()  # the next write goes to a closed transport
        await asyncio.wait_for(fake.cancelled.wait(), timeout=5)
    finally:
        await runner.cleanup()
    labels = {"endpoint": "/api/chat", "model": "llama3.2:latest"}
    assert (
        view.get_sample_value(
            "ollama_meter_requests_total", {**labels, "stream": "true", "status": "499"}
        )
        == 1
    )
    assert (
        view.get_sample_value(
            "ollama_meter_request_errors_total", {**labels, "reason": "client_disconnect"}
        )
        == 1
    )

"""What a hostile client or an odd request can do to the proxy, over real loopback sockets.

Each test states the defect it guards against (the hardening issue's item) and fails without
the fix: encoded bodies, unbounded labels, the Host rule, absolute-form targets, bytes that
cannot pass intact, ``Expect: 100-continue``, dot segments under a base path, error texts.
Requests that must be byte-exact on the wire are written on a raw socket.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import logging
import zlib
from typing import Any

import aiohttp
import orjson
import pytest

from .conftest import Meter, MeterFactory, unused_port
from .fake_ollama import FakeOllama

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def address(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").rpartition(":")
    return host, int(port)


async def raw_request(url: str, data: bytes) -> bytes:
    """Write ``data`` on a new connection; everything the server sent until it closed."""
    reader, writer = await asyncio.open_connection(*address(url))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(-1), timeout=10)
    finally:
        writer.close()


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def body_of(reply: bytes) -> bytes:
    return reply.partition(b"\r\n\r\n")[2]


async def post(url: str, data: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(url, data=data, headers=headers) as response,
    ):
        return response.status, await response.read()


# --- 1. Encoded request bodies pass encoded --------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [("gzip", gzip.compress), ("deflate", zlib.compress), ("GZIP", gzip.compress)],
)
async def test_an_encoded_body_reaches_ollama_as_sent_and_is_labelled_unknown(
    fake: FakeOllama, meter: Meter, encoding: str, encode: Any
) -> None:
    body = encode(orjson.dumps(CHAT))
    status, _ = await post(
        meter.url + "/api/chat", body, {"Content-Encoding": encoding, "Content-Type": "x"}
    )
    received = fake.last("/api/chat")
    assert (received.body, received.headers["Content-Encoding"]) == (body, encoding)
    assert status == 400  # the fake, like Ollama, cannot read an encoded body
    labels = {"endpoint": "/api/chat", "stream": "true", "status": "400"}
    assert meter.value("requests_total", model="unknown", **labels) == 1


# --- 2, 3. Bounded model labels ------------------------------------------------------------


async def test_huge_model_names_become_other_and_keep_the_exposition_small(
    fake: FakeOllama, meter: Meter
) -> None:
    names = [
        "m" * 1024 * 1024,  # a 1 MiB name
        "llama3.2" + " " * 1024 * 1024,  # a known name, padded: never kept
        "bad\nname",
        'quote"name',
    ]
    async with aiohttp.ClientSession() as session:
        for name in names:
            body = io.BytesIO(orjson.dumps({**CHAT, "model": name}))
            async with session.post(meter.url + "/api/chat", data=body) as r:
                await r.read()
        async with session.get(meter.url + "/v1/models/" + "x" * 10_000) as r:
            await r.read()
        # A request line longer than 16 KiB is not even parsed: 400, and no series.
        async with session.get(meter.url + "/v1/models/" + "x" * 60_000) as r:
            assert r.status == 400
        async with session.get(meter.url + "/metrics") as r:
            exposition = await r.text()
    assert len(exposition) < 200_000
    series = meter.series("requests_total")
    assert {labels["model"] for labels in series} == {"other"}
    counted = sum(meter.value("requests_total", **labels) for labels in series)
    assert counted == len(names) + 1


# --- 4. Ollama's Host rule on a loopback listener -----------------------------------------

ALLOWED = [
    "localhost",
    "localhost:11435",
    "LOCALHOST",
    "127.0.0.1:1",
    "[::1]:11435",
    "10.1.2.3",
    "192.168.0.7:80",
    "0.0.0.0",
    "box.local",
    "web.internal:8080",
    "app.localhost",
    "[fd00::1]:80",
    "",
]
FOREIGN = [
    "evil.example",
    "evil.example:11435",
    "8.8.8.8",
    "localhost.evil.example",
    "[2001:db8::1]",
    "localhost:80@evil.example",
    "127.0.0.1:1@evil.example",
    "[::1]evil.example",
    "evil.example#.localhost",
    "localhost.",
]


@pytest.mark.parametrize("host", ALLOWED)
async def test_a_local_host_is_answered(meter: Meter, host: str) -> None:
    reply = await raw_request(
        meter.url,
        f"GET /api/version HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(),
    )
    assert status_of(reply) == 200


@pytest.mark.parametrize("host", FOREIGN)
async def test_a_foreign_host_is_refused_as_ollama_refuses_it(
    fake: FakeOllama, meter: Meter, host: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ollama_meter.proxy")
    for path in ("/api/tags", "/metrics", "/-/ready"):
        reply = await raw_request(
            meter.url, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        assert status_of(reply) == 403, path
        assert body_of(reply) == b""
    assert fake.count("/api/tags") == 1  # only the proxy's own start-up call
    # The operator is told why, once.
    said = [r.getMessage() for r in caplog.records if "--allowed-hosts" in r.getMessage()]
    assert len(said) == 1
    assert said[0].startswith(f"refused Host {host!r}: not a local name or address")
    assert meter.value("requests_total", endpoint="/api/tags", model="unknown", stream="false",
                       status="403") == 1  # fmt: skip


async def test_probes_and_extra_names_and_public_listeners(
    fake: FakeOllama, start_meter: MeterFactory
) -> None:
    meter = await start_meter(allowed_hosts="meter.example.com,.corp.example")
    for host, status in [
        ("meter.example.com", 200),
        ("a.b.corp.example:443", 200),
        ("corp.example", 403),
        ("evil.example", 403),
    ]:
        reply = await raw_request(
            meter.url, f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        assert status_of(reply) == status, host
    reply = await raw_request(
        meter.url, b"GET /-/healthy HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    )
    assert status_of(reply) == 200
    # On a listener that is not on loopback, any host (the operator chose to be reachable)...
    public = await start_meter(listen="0.0.0.0:0")
    evil = b"GET / HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    assert status_of(await raw_request(public.url, evil)) == 200
    # ...unless the rule is asked for there (a container published on the host's loopback)...
    container = await start_meter(listen="0.0.0.0:0", host_check="on", allowed_hosts="meter")
    assert status_of(await raw_request(container.url, evil)) == 403
    named = b"GET / HTTP/1.1\r\nHost: meter:11435\r\nConnection: close\r\n\r\n"
    assert status_of(await raw_request(container.url, named)) == 200
    # ...or switched off on loopback.
    off = await start_meter(host_check="off")
    assert status_of(await raw_request(off.url, evil)) == 200


# --- 6. Absolute-form targets --------------------------------------------------------------


async def test_an_absolute_form_target_is_judged_by_its_authority(
    fake: FakeOllama, start_meter: MeterFactory
) -> None:
    meter = await start_meter()
    request = (
        b"GET http://evil.example/api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Connection: close\r\n\r\n"
    )
    assert status_of(await raw_request(meter.url, request)) == 403
    public = await start_meter(listen="0.0.0.0:0")
    reply = await raw_request(
        public.url,
        b"GET http://evil.example/api/version?x=1 HTTP/1.1\r\nHost: evil.example\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert status_of(reply) == 200
    assert body_of(reply) == b'{"version":"0.33.0"}'
    assert fake.received[-1].path == "/api/version?x=1"
    statuses = {labels["status"] for labels in public.series("requests_total")}
    assert statuses == {"200"}


# --- 7. What cannot pass intact is refused -------------------------------------------------


async def test_a_header_that_is_not_utf8_is_refused_not_changed(
    fake: FakeOllama, meter: Meter
) -> None:
    before = len(fake.received)
    reply = await raw_request(
        meter.url,
        b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nX-U: caf\xe9\r\nConnection: close\r\n\r\n",
    )
    assert status_of(reply) == 400
    assert orjson.loads(body_of(reply)) == {
        "error": "ollama-meter: header 'X-U' is not valid UTF-8"
    }
    assert len(fake.received) == before
    # UTF-8 passes as it is.
    await raw_request(
        meter.url,
        "GET /api/tags HTTP/1.1\r\nHost: localhost\r\nX-U: café\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert fake.last("/api/tags").headers["X-U"] == "café"


async def test_a_transfer_coding_other_than_chunked_is_501(fake: FakeOllama, meter: Meter) -> None:
    before = len(fake.received)
    reply = await raw_request(
        meter.url,
        b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
    )
    assert status_of(reply) == 501
    assert b"Connection: close" in reply.partition(b"\r\n\r\n")[0]
    assert len(fake.received) == before


# --- 8. Expect: 100-continue is answered once ----------------------------------------------


async def test_expect_continue_is_answered_by_the_proxy_alone(
    fake: FakeOllama, meter: Meter
) -> None:
    body = orjson.dumps(CHAT)
    reader, writer = await asyncio.open_connection(*address(meter.url))
    try:
        writer.write(
            b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(-1), timeout=5)
    finally:
        writer.close()
    assert status_of(reply) == 200
    assert b"100 Continue" not in reply
    received = fake.last("/api/chat")
    assert "Expect" not in received.headers
    assert received.body == body


# --- Dot segments under a base path --------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/../admin",
        "/api/../../admin",
        "/%2e%2e/admin",
        "/%2E%2e/admin",
        "/./x",
        "/..",
        "/..%2fadmin",
        "/%2e%2e%2Fadmin",
        "/..\\admin",
        "/%5c..%5cadmin",
        "/..;/admin",
        "/.;x/admin",
    ],
)
async def test_dot_segments_cannot_leave_the_base_path(
    fake: FakeOllama, start_meter: MeterFactory, path: str
) -> None:
    meter = await start_meter(upstream=fake.url + "/base")
    before = len(fake.received)
    reply = await raw_request(
        meter.url, f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
    )
    assert status_of(reply) == 400
    assert len(fake.received) == before


async def test_without_a_base_path_dot_segments_pass_as_written(
    fake: FakeOllama, meter: Meter
) -> None:
    await raw_request(
        meter.url, b"GET /x/../api/tags HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    assert fake.received[-1].path == "/x/../api/tags"


# --- Errors say what the client needs, no more ---------------------------------------------


async def garbage_upstream() -> tuple[asyncio.Server, str]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SECRET-GARBAGE \x00\x01 not http\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def test_error_replies_name_no_address_quote_no_upstream_bytes_and_send_no_server_header(
    start_meter: MeterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server, upstream = await garbage_upstream()
    async with server:
        meter = await start_meter(upstream=upstream)
        async with aiohttp.ClientSession() as session:
            async with session.post(meter.url + "/api/chat", json=CHAT) as response:
                assert response.status == 502
                text = await response.text()
                assert "Server" not in response.headers
            assert orjson.loads(text) == {"error": "ollama-meter: upstream: invalid response"}
            for method, path in [
                ("GET", "/-/healthy"),
                ("POST", "/-/healthy"),
                ("GET", "/metrics"),
            ]:
                async with session.request(method, meter.url + path) as response:
                    assert "Server" not in response.headers, (method, path)
    assert "SECRET-GARBAGE" not in text
    assert "127.0.0.1" not in text
    assert upstream in caplog.text  # the operator's log names it


async def test_errors_on_v1_routes_are_in_openais_shape(meter: Meter) -> None:
    reply = await raw_request(
        meter.url,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nX-U: \xff\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    assert status_of(reply) == 400
    assert orjson.loads(body_of(reply)) == {
        "error": {
            "message": "ollama-meter: header 'X-U' is not valid UTF-8",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


# --- Request heads are bounded in total ----------------------------------------------------


async def test_request_heads_are_bounded_in_total(fake: FakeOllama, meter: Meter) -> None:
    before = len(fake.received)
    field = "v" * (16 * 1024 - 16)
    fits = "".join(f"X-H{i}: {field}\r\n" for i in range(60))
    reply = await raw_request(
        meter.url, f"GET / HTTP/1.1\r\nHost: localhost\r\n{fits}Connection: close\r\n\r\n".encode()
    )
    assert status_of(reply) == 200
    too_many = "".join(f"X-H{i}: {field}\r\n" for i in range(100))
    refused = await refusal_of(
        meter.url,
        f"GET / HTTP/1.1\r\nHost: localhost\r\n{too_many}Connection: close\r\n\r\n".encode(),
    )
    assert refused in (400, 431, None)
    too_long = "v" * (64 * 1024)
    refused = await refusal_of(
        meter.url, f"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {too_long}\r\n\r\n".encode()
    )
    assert refused in (400, 431, None)
    assert len(fake.received) == before + 1


async def refusal_of(url: str, data: bytes) -> int | None:
    """The status a refused head got; None when the connection was reset while the client
    was still sending it (the server answered and closed first: a refusal too, but the kernel
    may drop the answer)."""
    try:
        return status_of(await raw_request(url, data))
    except (ConnectionResetError, BrokenPipeError):
        return None


# --- Shared scrape probes ------------------------------------------------------------------


async def test_concurrent_scrapes_share_one_probe(fake: FakeOllama, meter: Meter) -> None:
    before = fake.count("/api/ps")
    async with aiohttp.ClientSession() as session:

        async def scrape() -> None:
            async with session.get(meter.url + "/metrics") as response:
                assert response.status == 200
                await response.read()

        await asyncio.gather(*(scrape() for _ in range(20)))
        await scrape()  # well under a second later: the same answer
    assert fake.count("/api/ps") == before + 1


# --- The inspection budget cannot be held or lost ------------------------------------------


async def labelled(meter: Meter, body: bytes) -> str:
    """Send one chat body; the model label it was counted under."""
    before = {
        tuple(sorted(s.items())): meter.value("requests_total", **s)
        for s in meter.series("requests_total")
    }
    await post(meter.url + "/api/chat", body, {"Content-Type": "application/json"})
    for labels in meter.series("requests_total"):
        if meter.value("requests_total", **labels) > before.get(tuple(sorted(labels.items())), 0):
            return labels["model"]
    raise AssertionError("not counted")


async def test_a_declared_length_reserves_nothing_and_a_stalled_body_is_refused(
    fake: FakeOllama, start_meter: MeterFactory
) -> None:
    body = orjson.dumps(CHAT)
    meter = await start_meter(max_inspect_total=len(body), keepalive_timeout=0.5)
    reader, writer = await asyncio.open_connection(*address(meter.url))
    try:
        # Declares a body the size of the whole budget, and sends none of it.
        writer.write(
            b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        await writer.drain()
        assert await labelled(meter, body) == "llama3.2:latest"
        # Its silence is cut off: 408 in Ollama's shape, and the connection closed.
        reply = await asyncio.wait_for(reader.read(-1), timeout=10)
    finally:
        writer.close()
    assert status_of(reply) == 408
    assert orjson.loads(body_of(reply)) == {
        "error": "ollama-meter: the request body stopped arriving"
    }
    assert fake.count("/api/chat") == 1


async def test_the_budget_comes_back_however_a_request_ends(
    fake: FakeOllama, start_meter: MeterFactory
) -> None:
    body = orjson.dumps(CHAT)
    meter = await start_meter(max_inspect_total=len(body))
    # A client that leaves halfway through its body.
    _, writer = await asyncio.open_connection(*address(meter.url))
    writer.write(
        b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body[: len(body) // 2]
    )
    await writer.drain()
    writer.close()
    runner = meter.server.runner
    assert runner is not None
    assert runner.server is not None
    async with asyncio.timeout(5):
        # Until the proxy has seen it go (aiohttp has no event for it); each turn only yields.
        while runner.server.connections:  # noqa: ASYNC110
            await asyncio.sleep(0)
    # An upstream that is not there (502), then answers that come back.
    down = await start_meter(
        upstream=f"http://127.0.0.1:{unused_port()}", max_inspect_total=len(body)
    )
    for _ in range(3):
        assert (await post(down.url + "/api/chat", body, {}))[0] == 502
    assert down.value("requests_total", endpoint="/api/chat", model="llama3.2:latest",
                      stream="false", status="502") == 3  # fmt: skip
    for _ in range(3):
        assert await labelled(meter, body) == "llama3.2:latest"


async def test_an_encoded_body_is_never_parsed_even_when_it_is_json(
    fake: FakeOllama, meter: Meter
) -> None:
    # Labelled "br" but plain JSON: were it read, it would be labelled llama3.2.
    await post(meter.url + "/api/chat", orjson.dumps(CHAT), {"Content-Encoding": "br"})
    assert meter.value("requests_total", endpoint="/api/chat", model="unknown", stream="true",
                       status="200") == 1  # fmt: skip


async def test_a_request_that_will_be_refused_gets_no_100_continue(
    fake: FakeOllama, meter: Meter
) -> None:
    reader, writer = await asyncio.open_connection(*address(meter.url))
    try:
        writer.write(
            b"POST /api/chat HTTP/1.1\r\nHost: evil.example\r\nExpect: 100-continue\r\n"
            b"Content-Length: 1000000\r\n\r\n"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 403 ")

"""``ollama-meter top`` against a hostile proxy: one that redirects, speaks garbage with
terminal escapes in it, sends a body without end or drips it, or sends numbers at the edge of
what JSON can hold. What must hold: the admin key goes to --url only, nothing the far end sent
reaches the terminal raw, a fetch ends, and the view never crashes."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from ollama_meter.cli_top import FetchError, fetch
from ollama_meter.status.cells import sparkline
from ollama_meter.status.terminal import render_plain

from .test_top import EXAMPLE, NOW, top

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Serve], Awaitable[str]]]:
    """Start a raw TCP listener that answers with ``serve``; its URL. Connections still
    being served at the end are cut."""
    servers: list[asyncio.Server] = []
    open_: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def start(serve: Serve) -> str:
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            open_[task] = writer
            try:
                await serve(reader, writer)
            finally:
                del open_[task]
                writer.close()

        server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
    tasks = list(open_)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for server in servers:
        await server.wait_closed()


async def test_the_key_never_follows_a_redirect(aiohttp_server: AiohttpServer) -> None:
    seen: list[str | None] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response(EXAMPLE)

    other = await aiohttp_server(_app(elsewhere), host="127.0.0.1")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(str(other.make_url("/-/status.json")))

    first = await aiohttp_server(_app(redirect), host="127.0.0.1")
    url = str(first.make_url("")).rstrip("/")
    code, _, err = await top("--url", url, "--key", "om_admin_secret")
    assert seen in ([], [None])  # the other host never got the key
    assert code == 1
    assert "302" in err


def _app(handler: Callable[[web.Request], Awaitable[web.Response]]) -> web.Application:
    app = web.Application()
    app.router.add_get("/-/status.json", handler)
    return app


async def test_escapes_in_a_broken_answer_never_reach_the_terminal(
    raw: Callable[[Serve], Awaitable[str]],
) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        writer.write(b"\x1b]0;owned\x07\x1b[2J not http\r\n\r\n")
        await writer.drain()

    url = await raw(garbage)
    code, _, err = await top("--url", url)
    assert code == 1
    assert err.startswith(f"ollama-meter top: cannot reach {url}: ")
    assert "\x1b" not in err
    assert "\x07" not in err


async def test_a_body_without_end_is_refused(raw: Callable[[Serve], Awaitable[str]]) -> None:
    """A JSON object padded with 40 MB of blanks: valid, and nothing a proxy would send."""

    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        body = b'{"version": 1' + b" " * (40 << 20) + b"}"
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n"
        writer.write(head.encode() + b"Content-Type: application/json\r\n\r\n")
        writer.write(body)
        with contextlib.suppress(ConnectionError):  # the client stopped reading, as it should
            await writer.drain()

    url = await raw(huge)
    with pytest.raises(FetchError, match="too large"):
        await asyncio.to_thread(fetch, url, None)


async def test_a_dripping_body_ends_the_fetch(raw: Callable[[Serve], Awaitable[str]]) -> None:
    """One byte of blank at a time, each well inside the socket timeout: the fetch as a whole
    must still end (q is read between fetches), not after the whole drip."""
    drip = 60  # bytes; at 0.2 s each, far past the fetch's 1 s

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        body = b'{"version": 1' + b" " * drip + b"}"
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body[:13])
        try:
            for byte in body[13:]:
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            return  # the client gave up: what it should do

    url = await raw(slow)
    with pytest.raises(FetchError, match="timed out"):
        await asyncio.to_thread(fetch, url, None, 1.0)


@pytest.mark.parametrize(
    "change",
    [
        {"generated_at": 1e300},  # past any time_t
        {"generated_at": -1e18},
        {"generated_at": 1e308, "problems": [{"time": -1e308, "status": 500}]},  # an inf "ago"
    ],
)
def test_times_at_the_edge_of_a_double_still_draw(change: dict[str, object]) -> None:
    assert render_plain({**copy.deepcopy(EXAMPLE), **change}, NOW, 100)


def test_a_history_of_huge_values_still_draws() -> None:
    assert sparkline([1e308] * 180) == "█" * 20
    doc = copy.deepcopy(EXAMPLE)
    doc["models"]["total"]["history"]["completion_tokens_per_second"] = [1e308] * 180
    assert render_plain(doc, NOW, 100)

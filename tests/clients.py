"""Recording transports for the official clients, so tests see the exact bytes they received.

The ``ollama`` package is built on httpx and the ``openai`` SDK on httpx2 (an httpx fork with
the same transport API). ``recording_transport(module)`` wraps that module's HTTP transport:
every response body is captured as raw bytes (after de-chunking, before any decoding) while the
client reads it, along with status and headers.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Final

import httpx
import ollama
import openai
import openai._base_client

#: Headers that legitimately differ between a direct and a proxied response.
VOLATILE: Final = frozenset({"date", "connection", "keep-alive", "transfer-encoding"})


@dataclass
class Captured:
    method: str
    path: str
    status: int
    headers: list[tuple[str, str]]
    body: bytearray = field(default_factory=bytearray)

    def comparable(self) -> tuple[int, list[tuple[str, str]], bytes]:
        """Status, headers that must pass unchanged, and body."""
        kept = [(k.lower(), v) for k, v in self.headers if k.lower() not in VOLATILE]
        return self.status, sorted(kept), bytes(self.body)


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every recording transport. The tests speak plain HTTP on loopback,
    but a transport builds a context of its own unless given one, which takes 30-50 ms."""
    return ssl.create_default_context()


def recording_transport(httpx_module: ModuleType) -> Any:
    """An AsyncBaseTransport of ``httpx_module`` that records into its ``.captured`` list."""

    class Tee(httpx_module.AsyncByteStream):  # type: ignore[misc, name-defined]
        def __init__(self, inner: Any, sink: bytearray) -> None:
            self._inner = inner
            self._sink = sink

        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for chunk in self._inner:
                self._sink += chunk
                yield chunk

        async def aclose(self) -> None:
            await self._inner.aclose()

    class Recording(httpx_module.AsyncBaseTransport):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            self.inner = httpx_module.AsyncHTTPTransport(verify=_tls())
            self.captured: list[Captured] = []

        async def handle_async_request(self, request: Any) -> Any:
            response = await self.inner.handle_async_request(request)
            captured = Captured(
                request.method,
                request.url.raw_path.decode(),
                response.status_code,
                list(response.headers.multi_items()),
            )
            self.captured.append(captured)
            return httpx_module.Response(
                response.status_code,
                headers=response.headers,
                stream=Tee(response.stream, captured.body),
                extensions=response.extensions,
            )

        async def aclose(self) -> None:
            await self.inner.aclose()

    return Recording()


def openai_httpx() -> ModuleType:
    """The httpx flavour the installed openai SDK is built on (httpx2 since openai 3)."""
    module = getattr(openai._base_client, "httpx2", None) or httpx
    assert isinstance(module, ModuleType)
    return module


def make_ollama(url: str, transport: Any) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=url, transport=transport)


def make_openai(url: str, transport: Any) -> openai.AsyncOpenAI:
    http_client = openai_httpx().AsyncClient(transport=transport)
    return openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="ollama", http_client=http_client, max_retries=0
    )


def recording_transport_for(make: Callable[[str, Any], Any]) -> Any:
    """A recording transport of the httpx flavour the client that ``make`` builds uses."""
    return recording_transport(openai_httpx() if make is make_openai else httpx)


async def collect(call: Awaitable[Any]) -> list[Any]:
    """Every part of a streamed call (the libraries return the stream from a coroutine)."""
    return [part async for part in await call]

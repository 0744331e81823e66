"""The pass-through handler: one client request in, the same request out to Ollama, the same
response back, byte for byte, while an ``Exchange`` record is filled for metrics and logs.

Rules:
1. Bytes are never changed, added or held back. Request bodies stream upstream as they arrive,
   except the JSON body of a route that names a model, which is read whole up to
   ``max_inspect_bytes`` to learn the model and stream flag. Response chunks are written to the
   client as they arrive. Observing them (ollama.tail_for) is a side channel that cannot fail.
2. Headers pass unchanged except hop-by-hop ones (RFC 9110 §7.6.1), ``Host`` (the upstream's
   authority, unless --preserve-host; Ollama rejects foreign hosts on loopback) and the added
   ``X-Forwarded-For``/``X-Forwarded-Proto``. No header is added to responses either (aiohttp's
   ``Server`` header is taken out again when the upstream sent none).
3. A request is recorded exactly once, and before the client can see the end of its response:
   before ``write_eof`` for chunked bodies, before the last write for fixed-length ones.
4. Failures: before the response starts, an upstream failure becomes a 502/504 in Ollama's
   ``{"error": ...}`` shape. After it starts, the status cannot change: the client connection
   is closed without the end of the body, so the client sees the same truncation the proxy saw.
   A client that goes away cancels this handler (handler_cancellation), which closes the
   upstream connection, which makes Ollama stop generating.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from time import perf_counter
from typing import Final

import aiohttp
import orjson
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import exchange as ex
from .config import Config
from .errors import UpstreamClosed, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from .exchange import Exchange
from .labels import ModelLabels
from .metrics import Metrics
from .ollama import (
    Ending,
    Framing,
    LineTail,
    Route,
    RouteKind,
    WholeBody,
    framing_for,
    inspect_request,
    read_outcome,
    route_for,
    tail_for,
)

log = logging.getLogger(__name__)

SESSION: Final = web.AppKey("upstream_session", aiohttp.ClientSession)

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

_STREAMED: Final = (Framing.NDJSON, Framing.SSE)
_JSON_ERROR: Final = "application/json; charset=utf-8"


class _PassthroughResponse(web.StreamResponse):
    """A StreamResponse that adds no ``Server`` header of its own."""

    def __init__(self, *, status: int, reason: str | None, headers: CIMultiDict[str]) -> None:
        super().__init__(status=status, reason=reason, headers=headers)
        self._upstream_server = hdrs.SERVER in headers

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        if not self._upstream_server:
            self.headers.popall(hdrs.SERVER, None)


def filtered_headers(headers: CIMultiDictProxy[str], drop_host: bool) -> CIMultiDict[str]:
    """Headers minus hop-by-hop ones and those the Connection header names."""
    drop = HOP_BY_HOP
    connection = headers.get(hdrs.CONNECTION)
    if connection:
        drop = drop | {token.strip().lower() for token in connection.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in drop or (drop_host and lower == "host"):
            continue
        out.add(name, value)
    return out


async def _chain(head: list[bytes], rest: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    async for chunk in rest.iter_any():
        yield chunk


# What reading the upstream body can raise once the response has started.
_UPSTREAM_READ_ERRORS: Final = (
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    asyncio.TimeoutError,
)


class Proxy:
    """The catch-all request handler."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        labels: ModelLabels,
        access_log: Callable[[Exchange], None] | None,
    ) -> None:
        self._base = str(config.upstream).rstrip("/")
        self._config = config
        self._metrics = metrics
        self._labels = labels
        self._access_log = access_log
        #: Set when the server begins its graceful shutdown: a cancellation after that is ours.
        self.shutting_down = False
        self._tasks: set[asyncio.Task[None]] = set()

    def cut_off(self) -> None:
        """Cancel every request still in flight (the shutdown deadline has passed).

        aiohttp's own graceful shutdown cannot do this on time: it only fails reads of the
        request body, which a handler streaming a response is not doing, and then waits the
        shutdown timeout a second time before cancelling.
        """
        for task in list(self._tasks):
            task.cancel()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route = route_for(request.path)
        x = Exchange(request.method, route.template, perf_counter())
        task = request.task  # the handler's task (asyncio.current_task() costs a getpid())
        self._tasks.add(task)
        try:
            return await self._handle(request, route, x)
        except asyncio.CancelledError:
            if self.shutting_down:
                x.error = ex.SHUTDOWN
                x.status = x.status or ex.STATUS_SHUTDOWN
            else:
                x.error = ex.CLIENT_DISCONNECT
                x.status = ex.STATUS_CLIENT_CLOSED
            raise
        except ConnectionError:
            # The client went away while we read its body or wrote the response.
            x.error = ex.CLIENT_DISCONNECT
            x.status = ex.STATUS_CLIENT_CLOSED
            return web.Response()  # never sent: the connection is gone
        finally:
            self._tasks.discard(task)
            self._record(request, x)

    def _record(self, request: web.Request, x: Exchange) -> None:
        if x.recorded:
            return
        x.finished = perf_counter()
        x.request_bytes = request.content.total_bytes
        self._metrics.request_finished(x)
        if self._access_log is not None:
            self._access_log(x)

    async def _handle(self, request: web.Request, route: Route, x: Exchange) -> web.StreamResponse:
        body, data = await self._read_body(request, route)
        facts = inspect_request(route, body)
        model = facts.model
        if route.model_in_path:
            model = request.path[len("/v1/models/") :] or None
        x.model = self._labels.label(model)
        x.stream = facts.stream
        self._metrics.request_started(x)
        try:
            upstream = await request.app[SESSION].request(
                request.method,
                URL(self._base + request.raw_path, encoded=True),
                headers=self._request_headers(request),
                data=data,
                allow_redirects=False,
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return self._fail(request, x, self._translate(exc))
        clean = False
        try:
            response = await self._relay(request, route, x, upstream)
            # The request body must have gone out whole too: a body read to inspect it, or
            # no body, is at its end; a streamed one only if the client finished it.
            clean = x.error is None and request.content.is_eof()
            return response
        finally:
            # A whole exchange frees the connection for reuse; anything else closes it,
            # which is how Ollama learns that nobody is waiting for the rest.
            if clean:
                upstream.release()
            else:
                upstream.close()

    async def _read_body(
        self, request: web.Request, route: Route
    ) -> tuple[bytes | None, bytes | aiohttp.StreamReader | AsyncIterator[bytes] | None]:
        """(the whole body if it was read to inspect it, what to send upstream)."""
        if not request.body_exists:
            return None, None
        content = request.content
        if not route.inspects_body:
            return None, content
        cap = self._config.max_inspect_bytes
        length = request.content_length
        if length is not None:
            if length > cap:
                return None, content
            body = await content.read()
            return body, body
        # Unknown length (chunked): read up to the cap, then stream the rest behind it.
        chunks: list[bytes] = []
        size = 0
        while size <= cap:
            chunk = await content.readany()
            if not chunk:
                body = b"".join(chunks)
                return body, body
            chunks.append(chunk)
            size += len(chunk)
        return None, _chain(chunks, content)

    def _request_headers(self, request: web.Request) -> CIMultiDict[str]:
        headers = filtered_headers(request.headers, drop_host=not self._config.preserve_host)
        peer = request.remote
        if peer:
            prior = request.headers.getall(hdrs.X_FORWARDED_FOR, [])
            headers[hdrs.X_FORWARDED_FOR] = ", ".join([*prior, peer])
        if hdrs.X_FORWARDED_PROTO not in headers:
            headers[hdrs.X_FORWARDED_PROTO] = request.scheme
        return headers

    async def _relay(
        self,
        request: web.Request,
        route: Route,
        x: Exchange,
        upstream: aiohttp.ClientResponse,
    ) -> web.StreamResponse:
        x.status = status = upstream.status
        framing: Framing | None = None
        if (
            route.kind is not RouteKind.PLAIN
            and 200 <= status < 300
            and hdrs.CONTENT_ENCODING not in upstream.headers
        ):
            framing = framing_for(upstream.headers.get(hdrs.CONTENT_TYPE))
        tail = tail_for(framing, self._config.max_inspect_bytes) if framing else None
        x.streamed = framing in _STREAMED
        response = _PassthroughResponse(
            status=status,
            reason=upstream.reason,
            headers=filtered_headers(upstream.headers, drop_host=False),
        )
        await response.prepare(request)
        content = upstream.content
        while True:
            try:
                chunk = await content.readany()
            except _UPSTREAM_READ_ERRORS as exc:
                return self._broken(request, response, x, exc)
            if not chunk:
                break
            if x.first_byte is None:
                x.first_byte = perf_counter()
            if tail is not None:
                tail.feed(chunk)
            if content.at_eof():
                # The last chunk: with a fixed length, the client sees the end with it.
                self._complete(request, route, x, tail, content)
            await response.write(chunk)
        self._complete(request, route, x, tail, content)
        await response.write_eof()
        return response

    def _complete(
        self,
        request: web.Request,
        route: Route,
        x: Exchange,
        tail: LineTail | WholeBody | None,
        content: aiohttp.StreamReader,
    ) -> None:
        """Judge the finished body and record the exchange (once)."""
        if x.recorded:
            return
        x.response_bytes = content.total_bytes
        if tail is not None:
            outcome = read_outcome(route.kind, tail.framing, tail.lines())
            x.usage = outcome.usage
            if outcome.ending is Ending.ERROR:
                x.error = ex.STREAM_ERROR
            elif outcome.ending is Ending.UNTERMINATED:
                x.error = ex.UPSTREAM_CLOSED
        self._record(request, x)

    def _broken(
        self,
        request: web.Request,
        response: web.StreamResponse,
        x: Exchange,
        exc: BaseException,
    ) -> web.StreamResponse:
        """The upstream failed mid-body: count it, and cut the client off the same way."""
        x.error = (
            ex.UPSTREAM_TIMEOUT if isinstance(exc, asyncio.TimeoutError) else ex.UPSTREAM_CLOSED
        )
        log.warning(
            "%s %s: upstream broke off the response: %s",
            request.method,
            x.endpoint,
            self._translate(exc),
        )
        self._record(request, x)
        # Flush what was written, then close without the end of the body: never a clean end.
        response.force_close()
        if request.transport is not None:
            request.transport.close()
        return response

    def _fail(self, request: web.Request, x: Exchange, error: UpstreamError) -> web.Response:
        x.status = error.status
        x.error = error.reason
        log.warning("%s %s: %s", x.method, x.endpoint, error)
        self._record(request, x)
        return web.Response(
            status=error.status,
            body=orjson.dumps({"error": f"ollama-meter: upstream {self._base}: {error}"}),
            headers={hdrs.CONTENT_TYPE: _JSON_ERROR},
        )

    def _translate(self, exc: BaseException) -> UpstreamError:
        """The one place where aiohttp's client exceptions become ours."""
        config = self._config
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return UpstreamTimeout(f"no connection within {config.connect_timeout:g}s")
        if isinstance(exc, asyncio.TimeoutError):
            return UpstreamTimeout(f"no data for {config.read_timeout or 0:g}s")
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            return UpstreamUnavailable(f"cannot resolve host {exc.host}")
        if isinstance(exc, aiohttp.ClientConnectorError):
            if isinstance(exc.os_error, ConnectionRefusedError):
                return UpstreamUnavailable("connection refused")
            reason = exc.os_error.strerror or str(exc.os_error)
            return UpstreamUnavailable(reason.lower())
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return UpstreamClosed("connection closed before the response was complete")
        if isinstance(exc, aiohttp.ClientPayloadError):
            return UpstreamClosed("response body cut short")
        return UpstreamClosed(str(exc) or type(exc).__name__)

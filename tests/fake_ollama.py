"""A scriptable fake Ollama for tests, speaking Ollama's wire format from tests/fixtures/.

By default it answers like Ollama would (streaming defaults, Content-Length only on short
bodies, no Server header, NDJSON objects flushed one per write, errors in Ollama's shapes).
Checked against a real Ollama (v0.33.0-rc2): its Host check, 404/405 (with Allow) and
trailing-slash redirects, the texts of bad JSON bodies (tests/go_json.py), of missing models
and missing fields per route, and the /v1 error shapes. It has the models of TAGS, and every
other name but those of MISSING. Not emulated: CORS (Origin checks, preflights), model
capabilities (tools on a model without them), type errors of fields the proxy does not read.
A test can script the next replies of a route with ``Reply``: status, headers, the chunks to
write one by one, events to wait for before a chunk (to prove the proxy does not buffer), a
cut connection instead of a clean end, or an answer sent before the request body is read.

It records every request it received (method, raw path, headers, body, size and sha256), and
sets ``cancelled`` when a handler sees its client (the proxy) go away.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque

from aiohttp import hdrs, web
from multidict import CIMultiDict

from .fake_answers import EMBEDDING, MISSING_MODEL, PS_MODEL, default_reply, existing_blob
from .fake_wire import (
    GO_SERVER_ARGS,
    JSON_UTF8,
    KEEP_BODY,
    NDJSON,
    SSE,
    TAGS,
    Received,
    Reply,
    events_of,
    final_object,
    fixture,
    lines_of,
)

# What tests take from here (the fake, and what it serves).
__all__ = [
    "EMBEDDING",
    "JSON_UTF8",
    "MISSING_MODEL",
    "NDJSON",
    "PS_MODEL",
    "SSE",
    "TAGS",
    "FakeOllama",
    "Received",
    "Reply",
    "events_of",
    "final_object",
    "fixture",
    "lines_of",
]


class _GoResponse(web.StreamResponse):
    """Go's net/http sends no Server header; nor does the fake."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall(hdrs.SERVER, None)


class FakeOllama:
    def __init__(self) -> None:
        self.url = ""  # set once it listens
        self.received: list[Received] = []
        self.cancelled = asyncio.Event()
        self._arrivals = asyncio.Condition()
        self.blobs: set[str] = set()
        self._scripts: dict[tuple[str, str], deque[Reply]] = {}
        # Like Ollama: request bodies as they come (never inflate a gzip body), and heads up
        # to Go's 1 MB.
        self.app = web.Application(handler_args=GO_SERVER_ARGS)
        self.app.router.add_route("*", "/{tail:.*}", self._handle)

    def script(self, method: str, path: str, *replies: Reply) -> None:
        """The next replies to ``method path``, in order; then the defaults again."""
        self._scripts.setdefault((method, path), deque()).extend(replies)

    def count(self, path: str) -> int:
        return sum(1 for r in self.received if r.path.split("?")[0] == path)

    async def wait_for(self, path: str, count: int) -> None:
        """Until ``count`` requests for ``path`` have arrived (an event, not a poll)."""
        async with self._arrivals:
            await self._arrivals.wait_for(lambda: self.count(path) >= count)

    def last(self, path: str) -> Received:
        return next(r for r in reversed(self.received) if r.path.split("?")[0] == path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        queue = self._scripts.get((request.method, request.path))
        reply = queue.popleft() if queue else None
        if reply is None:
            reply = existing_blob(self, request)
        if reply is None or reply.read_body:
            received = await self._receive(request)
        else:
            received = Received(
                request.method, request.raw_path, CIMultiDict(request.headers), b"", 0, ""
            )
        peer = request.transport.get_extra_info("peername") if request.transport else None
        received.port = peer[1] if peer else 0
        self.received.append(received)
        async with self._arrivals:
            self._arrivals.notify_all()
        if reply is None:
            reply = default_reply(self, request, received)
        try:
            return await self._send(request, reply)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def _receive(self, request: web.Request) -> Received:
        digest = hashlib.sha256()
        kept = bytearray()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
            if size <= KEEP_BODY:
                kept += chunk
        body = bytes(kept) if size <= KEEP_BODY else b""
        return Received(
            request.method,
            request.raw_path,
            CIMultiDict(request.headers),
            body,
            size,
            digest.hexdigest(),
        )

    async def _send(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        response = _GoResponse(status=reply.status, headers=reply.headers)
        if reply.content_type is not None:
            response.headers[hdrs.CONTENT_TYPE] = reply.content_type
        if not reply.chunked:
            response.content_length = sum(len(chunk) for chunk in reply.chunks)
        # Like Ollama, send nothing, not even the status line, until the first object exists.
        if 0 in reply.gates:
            await reply.gates[0].wait()
        await response.prepare(request)
        chunks = () if request.method == "HEAD" else reply.chunks  # a HEAD answer has no body
        for index, chunk in enumerate(chunks):
            gate = reply.gates.get(index)
            if gate is not None and index:
                await gate.wait()
            await response.write(chunk)
        if reply.cut:
            response.force_close()
            assert request.transport is not None
            request.transport.close()
            return response
        if not reply.read_body and not reply.keep_alive:
            # Close after this answer; like Go's server, drain the unread body first rather
            # than reset the connection under the answer (aiohttp's lingering close does that).
            response.force_close()
        await response.write_eof()
        return response

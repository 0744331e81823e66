"""Request bodies: which are read whole to inspect them, within what memory, and how a body
goes upstream.

Rules:
1. Only a route that names its model in a JSON body is read (ollama.Route.inspects_body), and
   never a body the client encoded (``Content-Encoding`` other than identity): the proxy does
   not inflate bodies, and an encoded body's model is ``unknown``.
2. A body is read whole only up to ``max_inspect_bytes``, and only while every body being read
   or held for inspection, all requests together, stays within one ``InspectBudget``
   (``max_inspect_total``). Past either bound the body streams through as it arrives, and
   what was read of it goes first. The caller gives the taken bytes back once the body has
   gone upstream, on every path.
3. Bytes go upstream unchanged. A body held whole and larger than 1 MiB goes out in slices
   (aiohttp warns that writing a larger bytes body in one piece can hold up the event loop);
   with the client's Content-Length still in the headers, the framing does not change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

import aiohttp
from aiohttp import hdrs, web

from .ollama import Route

_IDENTITY: Final = frozenset({"", "identity"})
_WHOLE_BODY_WRITE: Final = 1024 * 1024
_SLICE: Final = 256 * 1024

#: What is sent upstream: nothing, bytes, the client's stream, or a generator over either.
Body = bytes | aiohttp.StreamReader | AsyncIterator[bytes] | None


class InspectBudget:
    """Bytes of request bodies held to inspect them, all requests together, bounded."""

    __slots__ = ("_left",)

    def __init__(self, total: int) -> None:
        self._left = total

    def take(self, size: int) -> bool:
        if size > self._left:
            return False
        self._left -= size
        return True

    def give(self, size: int) -> None:
        self._left += size


async def read_body(
    request: web.Request, route: Route, cap: int, budget: InspectBudget
) -> tuple[bytes | None, Body, int]:
    """(the whole body if it was read to inspect it, what to send upstream, the bytes taken
    from ``budget``, to give back once the body has gone upstream)."""
    if not request.body_exists:
        return None, None, 0
    content = request.content
    encoding = request.headers.get(hdrs.CONTENT_ENCODING)
    if not route.inspects_body or (encoding is not None and encoding.lower() not in _IDENTITY):
        return None, content, 0
    length = request.content_length
    if length is not None:
        if length > cap or not budget.take(length):
            return None, content, 0
        try:
            body = await content.read()
        except BaseException:
            budget.give(length)
            raise
        return body, body, length
    # Unknown length (chunked): read up to the cap, then stream the rest behind it.
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= cap:
            chunk = await content.readany()
            if not chunk:
                body = b"".join(chunks)
                return body, body, size
            chunks.append(chunk)
            if not budget.take(len(chunk)):
                break
            size += len(chunk)
    except BaseException:
        budget.give(size)
        raise
    return None, _chain(chunks, content), size


def sendable(data: Body) -> Body:
    """``data`` as it is best handed to the upstream request (rule 3)."""
    if isinstance(data, bytes) and len(data) > _WHOLE_BODY_WRITE:
        return _slices(data)
    return data


async def _slices(body: bytes) -> AsyncIterator[bytes]:
    view = memoryview(body)
    for start in range(0, len(view), _SLICE):
        yield view[start : start + _SLICE].tobytes()


async def _chain(head: list[bytes], rest: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    async for chunk in rest.iter_any():
        yield chunk

"""Request bodies: which are read whole to inspect them, within what memory, and how a body
goes upstream.

Rules:
1. Only a route that names its model in a JSON body is read (ollama.Route.inspects_body), and
   never a body the client encoded (``Content-Encoding`` other than identity): the proxy does
   not inflate bodies, and an encoded body's model is ``unknown``.
2. A body is read whole only up to ``max_inspect_bytes``, and only while every body being read
   or held for inspection, all requests together, stays within one ``InspectBudget``
   (``max_inspect_total``), charged as bytes arrive (a declared Content-Length reserves
   nothing). Past either bound the body streams through as it arrives, and what was read of
   it goes first. What a request holds is given back once its body has gone upstream (not when
   Ollama answers, which can be minutes later), and on every other path (``Hold.release``).
3. Bytes go upstream unchanged. A body held whole and larger than 1 MiB goes out in slices
   (aiohttp warns that writing a larger bytes body in one piece can hold up the event loop);
   with the client's Content-Length still in the headers, the framing does not change.
4. A body read to inspect it that stops arriving for the keep-alive timeout is refused (408):
   a client cannot hold the budget, or a connection, by never finishing its body.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
from aiohttp import hdrs, web

from .inbound import Refusal
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


class Hold:
    """What one request took from the budget; given back once, however the request goes."""

    __slots__ = ("_budget", "size")

    def __init__(self, budget: InspectBudget) -> None:
        self._budget = budget
        self.size = 0

    def take(self, size: int) -> bool:
        if not self._budget.take(size):
            return False
        self.size += size
        return True

    def release(self) -> None:
        self._budget.give(self.size)
        self.size = 0


#: What a request that holds nothing of the budget holds.
NOTHING_HELD: Final = Hold(InspectBudget(0))


async def read_body(
    request: web.Request, route: Route, cap: int, budget: InspectBudget, silence: float
) -> tuple[bytes | None, Body, Hold]:
    """(the whole body if it was read to inspect it, what to send upstream, what it holds of
    ``budget``). Bytes are taken from the budget as they arrive; a body that stops arriving
    for ``silence`` seconds while it is read is refused (408)."""
    if not request.body_exists:
        return None, None, NOTHING_HELD
    content = request.content
    encoding = request.headers.get(hdrs.CONTENT_ENCODING)
    if not route.inspects_body or (encoding is not None and encoding.lower() not in _IDENTITY):
        return None, content, NOTHING_HELD
    length = request.content_length
    if length is not None and length > cap:
        return None, content, NOTHING_HELD
    if content.is_eof() and content.total_bytes <= min(cap, _WHOLE_BODY_WRITE):
        # All of it came with the head, and it is small (the common case): it is in memory
        # already and goes upstream at once, so no budget, no waiting, no timer.
        body = await content.read()
        return body, body, NOTHING_HELD
    hold = Hold(budget)
    chunks: list[bytes] = []
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(loop.time() + silence) as silent:
            while hold.size <= cap:
                chunk = await content.readany()
                if not chunk:
                    body = b"".join(chunks)
                    return body, sent(body, hold), hold
                silent.reschedule(loop.time() + silence)
                chunks.append(chunk)
                if not hold.take(len(chunk)):
                    break
    except TimeoutError:
        hold.release()
        raise Refusal(408, "ollama-meter: the request body stopped arriving") from None
    except BaseException:
        hold.release()
        raise
    # Over a bound: what was read goes first, then the rest as it arrives.
    return None, _chain(chunks, content, hold), hold


def sent(body: bytes, hold: Hold) -> Body:
    """A body held whole, as it goes upstream (rule 3); its hold ends once it has gone."""
    if len(body) <= _WHOLE_BODY_WRITE:
        hold.release()  # small: aiohttp writes it in one piece, at once
        return body
    return _slices(body, hold)


async def _slices(body: bytes, hold: Hold) -> AsyncIterator[bytes]:
    view = memoryview(body)
    for start in range(0, len(view), _SLICE):
        yield view[start : start + _SLICE].tobytes()
    hold.release()


async def _chain(head: list[bytes], rest: aiohttp.StreamReader, hold: Hold) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    head.clear()
    hold.release()
    async for chunk in rest.iter_any():
        yield chunk

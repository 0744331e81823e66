"""Replies of ollama-meter's own (its endpoints, its refusals and errors): none carries a
``Server`` header, so the proxy never tells a client what it runs on, and never adds a header
to what it relays (proxy.py's pass-through response keeps the upstream's own).

aiohttp adds ``Server`` while it prepares the headers; ``OwnResponse`` takes it out again.
aiohttp's router would answer a wrong method on one of our paths itself (405, with its
``Server``), so our endpoints are added with ``own_route``, which answers that too. (Only
aiohttp's answers to requests it cannot parse at all, 400 before any routing, still carry it.)
"""

from __future__ import annotations

from typing import Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

_READS: Final = frozenset({hdrs.METH_GET, hdrs.METH_HEAD})


class OwnResponse(web.Response):
    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall(hdrs.SERVER, None)


def own_route(app: web.Application, path: str, handler: Handler) -> None:
    """``GET``/``HEAD`` ``path`` answered by ``handler``; any other method, 405."""

    async def route(request: web.Request) -> web.StreamResponse:
        if request.method not in _READS:
            return OwnResponse(
                status=405, text="405 method not allowed", headers={hdrs.ALLOW: "GET, HEAD"}
            )
        return await handler(request)

    app.router.add_route("*", path, route)

"""A bare aiohttp passthrough: ollama-meter minus metering, for the benchmark's baseline.

``python bench/passthrough.py LISTEN_PORT UPSTREAM_URL``

Same server and client settings as ollama-meter (one ClientSession, no pool limit, no
decompression, no added headers, handler cancellation, the same event loop), the same
hop-by-hop filtering and chunk-by-chunk streaming; no request inspection, no observer, no
metrics, no access log. "Metering is nearly free" means ollama-meter is close to this.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import hdrs, web
from yarl import URL

from ollama_meter.app import HANDLER_ARGS, NO_AUTO_HEADERS
from ollama_meter.cli import event_loop_factory, tune_runtime
from ollama_meter.inbound import HOP_BY_HOP, filtered_headers

SESSION = web.AppKey("session", aiohttp.ClientSession)


def make_app(upstream: str) -> web.Application:
    app = web.Application(handler_args=HANDLER_ARGS)
    base = upstream.rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            skip_auto_headers=NO_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        yield
        await app[SESSION].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = filtered_headers(request.headers, HOP_BY_HOP | {"host"})
        data = request.content if request.body_exists else None
        async with app[SESSION].request(
            request.method,
            URL(base + request.raw_path, encoded=True),
            headers=headers,
            data=data,
            allow_redirects=False,
        ) as upstream_response:
            response = web.StreamResponse(
                status=upstream_response.status,
                reason=upstream_response.reason,
                headers=filtered_headers(upstream_response.headers, HOP_BY_HOP),
            )
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    assert hdrs.HOST  # the upstream's Host comes from the URL, as in ollama-meter
    return app


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2]
    tune_runtime()
    web.run_app(
        make_app(upstream),
        host="127.0.0.1",
        port=port,
        access_log=None,
        handler_cancellation=True,
        print=None,
        loop=event_loop_factory()(),
    )


if __name__ == "__main__":
    main()

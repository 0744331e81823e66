"""The fake Ollama behind bench/hostile.py: ``python bench/hostile_upstream.py PORT``.

bench/upstream.py is built for speed and keeps each request body (it looks for
``"stream":false`` in it, appending piece by piece): a 60 MiB body takes it about 30 s, the
gigabyte an old proxy inflates from a gzip bomb far longer. This one is plain aiohttp, reads
every body and drops it as it arrives, accepts heads of any size a proxy forwards (so what a
proxy lets through shows up as a 200 from here, not as this server's 400), and counts
requests.

- ``POST /api/generate`` and ``/api/chat``: the body is dropped unread, the answer is a
  two-line NDJSON stream. With ``X-Bench-Long-Line-Mib: N`` the stream is instead one line of
  N MiB with no newline, then the end of the body.
- ``GET /api/tags``, ``/api/ps``, ``/api/version``, ``/``: fixed answers; the one model is
  upstream.py's ``llama3.2:latest``.
- ``GET /-/bench/counts``: requests received so far, by path (asked directly, not through the
  proxy).
- Anything else: 404.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Final

import orjson
from aiohttp import web
from upstream import FINAL_LINE, MODEL

MiB: Final = 1024 * 1024
FIRST_LINE: Final = orjson.dumps(
    {
        "model": MODEL,
        "created_at": "2026-11-22T00:00:00.000000001Z",
        "message": {"role": "assistant", "content": "Rayleigh"},
        "done": False,
    }
)
FIXED: Final = {
    "/api/tags": orjson.dumps({"models": [{"name": MODEL, "model": MODEL, "size": 2019393189}]}),
    "/api/ps": orjson.dumps(
        {"models": [{"name": MODEL, "model": MODEL, "size": 3583100928, "size_vram": 0}]}
    ),
    "/api/version": b'{"version":"0.33.0"}',
}
# Heads up to 16 MiB in all: far past what any proxy under test should pass.
HANDLER_ARGS: Final = {
    "auto_decompress": False,
    "max_line_size": MiB,
    "max_field_size": MiB,
    "max_headers": 16 * 1024,
}
COUNTS: Final = web.AppKey("counts", Counter[str])


async def handle(request: web.Request) -> web.StreamResponse:
    counts = request.app[COUNTS]
    if request.path == "/-/bench/counts":
        return web.json_response(dict(counts))
    counts[request.path] += 1
    async for _ in request.content.iter_chunked(MiB):
        pass  # dropped as it arrives
    if request.method == "POST" and request.path in ("/api/generate", "/api/chat"):
        return await stream(request, int(request.headers.get("X-Bench-Long-Line-Mib", "0")))
    if request.method == "GET" and request.path in FIXED:
        return web.Response(body=FIXED[request.path], content_type="application/json")
    if request.method == "GET" and request.path == "/":
        return web.Response(text="Ollama is running")
    return web.Response(status=404, text="404 page not found")


async def stream(request: web.Request, long_line_mib: int) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    if long_line_mib:
        # The start of a chat line whose content never ends: no closing quote, no newline.
        start = FIRST_LINE[: FIRST_LINE.index(b"Rayleigh")]
        await response.write(start)
        piece = b"a" * MiB
        for _ in range(long_line_mib - 1):
            await response.write(piece)
        await response.write(piece[: MiB - len(start)])
    else:
        await response.write(FIRST_LINE + b"\n")
        await response.write(FINAL_LINE)
    await response.write_eof()
    return response


def main() -> None:
    app = web.Application(handler_args=HANDLER_ARGS)
    app[COUNTS] = Counter()
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()

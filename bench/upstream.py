"""A fast fake Ollama for benchmarks: ``python bench/upstream.py PORT [--models N]``.

It must never be the bottleneck, so it is not built on aiohttp: a bare asyncio Protocol on
uvloop, with every body precomputed. It speaks Ollama's framing (see ../shared/ollama-api.md):
non-stream JSON with Content-Length, NDJSON streams chunk by chunk, one object per line.

- ``POST /api/generate`` and ``/api/chat``: a stream unless the body says ``"stream":false``.
  Headers ``X-Bench-Lines`` (default 256) and ``X-Bench-Delay-Ms`` (default 0: unpaced, but
  yielding between lines) shape the stream. Each line carries ``"t"``, the CLOCK_MONOTONIC
  time in ns when it was written, so a client can measure the delay of every line.
- ``POST /api/blobs/sha256:...``: reads and discards the body (Content-Length or chunked), 201.
- ``GET /api/tags``, ``/api/ps``, ``/api/version``, ``/``: fixed answers; ``--models N`` lists
  N models in /api/tags and /api/ps (for the /metrics scrape benchmark). /api/ps says the
  first three expire at a fixed time (2026-11-22, in the past), unless ``--loaded-for SECONDS``
  says they stay loaded that long after start, as Ollama's ``keep_alive`` does: a fleet's
  router (run.py ``--fleet``) then sees them hot, not cold after every poll.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import time
from typing import ClassVar, Final, cast

import orjson

MODEL: Final = "llama3.2:latest"
_monotonic_ns = time.monotonic_ns


def _response(status: str, content_type: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nDate: Sun, 22 Nov 2026 00:00:00 GMT\r\n\r\n"
    ).encode() + body


_JSON: Final = "application/json; charset=utf-8"
# What Ollama reports at the end of a reply (ns and token counts).
_METRICS: Final = {
    "total_duration": 161874209,
    "load_duration": 38412750,
    "prompt_eval_count": 34,
    "prompt_eval_duration": 52318000,
}
_FINAL: Final = {
    "model": MODEL,
    "created_at": "2026-11-22T00:00:00.000000001Z",
    "message": {"role": "assistant", "content": ""},
    "done": True,
    "done_reason": "stop",
    **_METRICS,
    "eval_count": 256,
    "eval_duration": 5120000000,
}
GENERATE_BODY: Final = orjson.dumps(
    {
        "model": MODEL,
        "created_at": "2026-11-22T00:00:00.000000001Z",
        "response": "Rayleigh scattering.",
        "done": True,
        "done_reason": "stop",
        **_METRICS,
        "eval_count": 3,
        "eval_duration": 43104000,
    }
)
GENERATE_REPLY: Final = _response("200 OK", _JSON, GENERATE_BODY)
STREAM_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
    b"Date: Sun, 22 Nov 2026 00:00:00 GMT\r\nTransfer-Encoding: chunked\r\n\r\n"
)
# A line is PREFIX + str(t) + SUFFIX: about the size of a real chat chunk (~150 bytes).
LINE_PREFIX: Final = (
    b'{"model":"llama3.2:latest","created_at":"2026-11-22T00:00:00.000000001Z",'
    b'"message":{"role":"assistant","content":" token"},"done":false,"t":'
)
LINE_SUFFIX: Final = b"}\n"
FINAL_LINE: Final = orjson.dumps(_FINAL) + b"\n"
FINAL_CHUNK: Final = f"{len(FINAL_LINE):x}\r\n".encode() + FINAL_LINE + b"\r\n0\r\n\r\n"
NOT_FOUND: Final = _response("404 Not Found", "text/plain; charset=utf-8", b"404 page not found")
BLOB_CREATED: Final = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"


#: /api/ps's expires_at without --loaded-for.
EXPIRES_AT: Final = "2026-11-22T06:04:05.123456789+01:00"


def fixed_replies(models: int, loaded_for: float | None = None) -> dict[bytes, bytes]:
    """The fixed answers; ``loaded_for``: /api/ps's models expire that many seconds from now."""
    names = [MODEL] + [f"bench-{i:03d}:latest" for i in range(1, models)]
    expires_at = EXPIRES_AT
    if loaded_for is not None:
        until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=loaded_for)
        expires_at = until.isoformat()
    tags = {"models": [{"name": n, "model": n, "size": 2019393189} for n in names]}
    ps = {
        "models": [
            {
                "name": n,
                "model": n,
                "size": 3583100928,
                "size_vram": 2684354560,
                "expires_at": expires_at,
                "context_length": 4096,
            }
            for n in names[:3]
        ]
    }
    return {
        b"/api/tags": _response("200 OK", _JSON, orjson.dumps(tags)),
        b"/api/ps": _response("200 OK", _JSON, orjson.dumps(ps)),
        b"/api/version": _response("200 OK", _JSON, b'{"version":"0.33.0"}'),
        b"/": _response("200 OK", "text/plain; charset=utf-8", b"Ollama is running"),
    }


class Upstream(asyncio.Protocol):
    """One connection: HTTP/1.1 keep-alive, requests answered in order."""

    replies: ClassVar[dict[bytes, bytes]] = {}

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.body_left = 0  # Content-Length body bytes still to come
        self.chunked = False
        self.pending: tuple[bytes, bytes, dict[bytes, bytes]] | None = None
        self.body = b""
        self.busy = False  # a stream is being written: hold further requests

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.process()

    def process(self) -> None:
        while not self.busy:
            if self.pending is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
                lines = head.split(b"\r\n")
                method, target, _ = lines[0].split(b" ", 2)
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                self.pending = (method, target, headers)
                self.body = b""
                self.chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
                self.body_left = int(headers.get(b"content-length", b"0"))
            if not self.read_body():
                return
            method, target, headers = self.pending
            self.pending = None
            self.answer(method, target.split(b"?", 1)[0], headers, self.body)

    def read_body(self) -> bool:
        """Consume the body from the buffer; True once it is complete."""
        is_blob = self.pending is not None and self.pending[1].startswith(b"/api/blobs/")
        if self.chunked:
            while True:
                line_end = self.buffer.find(b"\r\n")
                if line_end < 0:
                    return False
                size = int(self.buffer[:line_end].split(b";")[0], 16)
                if len(self.buffer) < line_end + 2 + size + 2:
                    return False
                if not is_blob:
                    self.body += self.buffer[line_end + 2 : line_end + 2 + size]
                self.buffer = self.buffer[line_end + 2 + size + 2 :]
                if size == 0:
                    return True
        take = min(self.body_left, len(self.buffer))
        if not is_blob:
            self.body += self.buffer[:take]
        self.buffer = self.buffer[take:]
        self.body_left -= take
        return self.body_left == 0

    def answer(self, method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if path in (b"/api/generate", b"/api/chat") and method == b"POST":
            if b'"stream":false' in body or b'"stream": false' in body:
                transport.write(GENERATE_REPLY)
                return
            lines = int(headers.get(b"x-bench-lines", b"256"))
            delay = int(headers.get(b"x-bench-delay-ms", b"0")) / 1000
            self.busy = True
            asyncio.get_running_loop().create_task(self.stream(lines, delay))
        elif path.startswith(b"/api/blobs/") and method == b"POST":
            transport.write(BLOB_CREATED)
        else:
            transport.write(self.replies.get(path, NOT_FOUND))

    async def stream(self, lines: int, delay: float) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(STREAM_HEAD)
        sleep = asyncio.sleep
        for _ in range(lines - 1):
            if transport.is_closing():
                return
            line = LINE_PREFIX + str(_monotonic_ns()).encode() + LINE_SUFFIX
            transport.write(b"%x\r\n%b\r\n" % (len(line), line))
            await sleep(delay)
        transport.write(FINAL_CHUNK)
        self.busy = False
        self.process()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument(
        "--loaded-for",
        type=float,
        metavar="SECONDS",
        help="/api/ps: the models stay loaded this long after start (default: expired)",
    )
    args = parser.parse_args()
    Upstream.replies = fixed_replies(args.models, args.loaded_for)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Upstream, "127.0.0.1", args.port, backlog=4096)
        print(f"upstream listening on 127.0.0.1:{args.port}", flush=True)
        async with server:
            await server.serve_forever()

    import uvloop

    uvloop.run(serve())


if __name__ == "__main__":
    main()

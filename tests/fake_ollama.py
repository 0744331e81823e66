"""A scriptable fake Ollama for tests, speaking Ollama's wire format from tests/fixtures/.

By default it answers like Ollama would (streaming defaults, Content-Length only on short
bodies, no Server header, NDJSON objects flushed one per write, errors in Ollama's shapes).
A test can script the next replies of a route with ``Reply``: status, headers, the chunks to
write one by one, events to wait for before a chunk (to prove the proxy does not buffer), a
cut connection instead of a clean end, or an answer sent before the request body is read.

It records every request it received (method, raw path, headers, body, size and sha256), and
sets ``cancelled`` when a handler sees its client (the proxy) go away.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
from aiohttp import hdrs, web
from multidict import CIMultiDict

FIXTURES: Final = Path(__file__).parent / "fixtures"

NDJSON: Final = "application/x-ndjson"
JSON_UTF8: Final = "application/json; charset=utf-8"
JSON: Final = "application/json"
SSE: Final = "text/event-stream"
TEXT: Final = "text/plain; charset=utf-8"

GO_SERVER_ARGS: Final = {
    "auto_decompress": False,
    "max_line_size": 1 << 20,
    "max_field_size": 1 << 20,
    "max_headers": 10_000,
}

#: What the fake lists in /api/tags.
TAGS: Final = ("llama3.2:latest", "qwen3:8b", "nomic-embed-text:latest")
#: Bodies up to this size are kept whole in Received.body; larger ones only hashed.
KEEP_BODY: Final = 1024 * 1024


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def lines_of(name: str) -> list[bytes]:
    """The NDJSON lines of a fixture, each with its newline."""
    return fixture(name).splitlines(keepends=True)


def events_of(name: str) -> list[bytes]:
    """The SSE events of a fixture, each with its blank line."""
    return [event + b"\n\n" for event in fixture(name).split(b"\n\n") if event]


def final_object(name: str) -> dict[str, Any]:
    """The last object of an NDJSON fixture."""
    doc: dict[str, Any] = orjson.loads(lines_of(name)[-1])
    return doc


@dataclass
class Reply:
    status: int = 200
    content_type: str | None = JSON_UTF8
    chunks: Sequence[bytes] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    #: False: send Content-Length (Go does for bodies it finished within 2 KiB).
    chunked: bool = True
    #: Before writing chunk i, wait for gates[i].
    gates: Mapping[int, asyncio.Event] = field(default_factory=dict)
    #: After the chunks, close the connection without ending the body.
    cut: bool = False
    #: False: answer before reading the request body, then close (an existing blob).
    read_body: bool = True
    #: With read_body False: keep the connection open after the answer instead (Go may, when
    #: the unread rest of the body is small enough to drain).
    keep_alive: bool = False

    @classmethod
    def body(cls, data: bytes, content_type: str | None = JSON_UTF8, status: int = 200) -> Reply:
        """A non-streamed body, with Content-Length when short, as Go sends it."""
        return cls(status, content_type, [data] if data else [], chunked=len(data) > 2048)


#: Request headers the proxy is meant to set or drop on the way up.
REWRITTEN: Final = frozenset(
    {"host", "x-forwarded-for", "x-forwarded-proto", "connection", "keep-alive"}
)


@dataclass
class Received:
    method: str
    path: str  # raw, with the query string
    headers: CIMultiDict[str]
    body: bytes
    size: int
    sha256: str
    #: The client port of the connection it came on (the same port: a reused connection).
    port: int = 0

    def view(self) -> tuple[str, str, list[tuple[str, str]], str]:
        """What must be identical whether a request came direct or through the proxy."""
        headers = [(k.lower(), v) for k, v in self.headers.items() if k.lower() not in REWRITTEN]
        return self.method, self.path, sorted(headers), self.sha256


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
            reply = self._default(request.method, request.path, received)
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

    # --- What Ollama answers when nothing is scripted -------------------------------------

    def _default(self, method: str, path: str, received: Received) -> Reply:
        if path.startswith("/api/blobs/"):  # raw bytes, not JSON
            return self._blob(method, path, received)
        try:
            doc = orjson.loads(received.body) if received.body else {}
        except orjson.JSONDecodeError:
            return Reply.body(
                b'{"error":"invalid character \'o\' looking for beginning of value"}', status=400
            )
        if not isinstance(doc, dict):
            doc = {}
        handler = _ROUTES.get((method, path))
        if handler is None:
            return Reply.body(b"404 page not found", TEXT, 404)
        return handler(self, doc)

    def _blob(self, method: str, path: str, received: Received) -> Reply:
        digest = path[len("/api/blobs/") :]
        if method == "HEAD":
            return Reply(200 if digest in self.blobs else 404, None)
        if method != "POST":
            return Reply.body(b"405 method not allowed", TEXT, 405)
        if digest != f"sha256:{received.sha256}":
            message = f"digest mismatch, expected {digest!r}, got 'sha256:{received.sha256}'"
            return Reply.body(orjson.dumps({"error": message}), status=400)
        self.blobs.add(digest)
        return Reply(201, None)


def _stream_flag(doc: dict[str, Any], default: bool) -> bool:
    stream = doc.get("stream")
    return stream if isinstance(stream, bool) else default


#: The model the fake does not have (the request of fixture error_404.json).
MISSING_MODEL: Final = "llama9"


def _not_found(doc: dict[str, Any]) -> Reply | None:
    if doc.get("model") == MISSING_MODEL:
        return Reply.body(fixture("error_404.json"), status=404)
    return None


def _chat(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    if (missing := _not_found(doc)) is not None:
        return missing
    if not doc.get("messages"):
        name = "chat_unload.json" if doc.get("keep_alive") == 0 else "generate_load.json"
        return Reply.body(fixture(name))
    source = "chat_thinking_tools_stream.ndjson" if doc.get("tools") else "chat_stream.ndjson"
    if _stream_flag(doc, True):
        return Reply(content_type=NDJSON, chunks=lines_of(source))
    final = final_object(source)
    final["message"]["content"] = "".join(
        orjson.loads(line)["message"]["content"] for line in lines_of(source)
    )
    return Reply.body(orjson.dumps(final))


def _generate(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    if (missing := _not_found(doc)) is not None:
        return missing
    if not doc.get("prompt"):
        return Reply.body(fixture("generate_load.json"))
    if _stream_flag(doc, True):
        return Reply(content_type=NDJSON, chunks=lines_of("generate_stream.ndjson"))
    final = final_object("generate_stream.ndjson")
    final["response"] = "".join(
        orjson.loads(line)["response"] for line in lines_of("generate_stream.ndjson")
    )
    return Reply.body(orjson.dumps(final))


def _embed(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    return Reply.body(fixture("embed_response.json"))


def _pull(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    name = (
        "pull_error_stream.ndjson" if doc.get("model") == "no-such-model" else "pull_stream.ndjson"
    )
    lines = lines_of(name)
    if _stream_flag(doc, True):
        return Reply(content_type=NDJSON, chunks=lines)
    return Reply.body(lines[-1].rstrip(b"\n"), JSON)


def _create(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    files = doc.get("files") or {}
    if any(digest not in fake.blobs for digest in files.values()):
        return Reply.body(b'{"error":"blob not found"}', status=400)
    statuses = [
        {"status": "parsing GGUF"},
        *({"status": f"using existing layer {digest}"} for digest in files.values()),
        {"status": "writing manifest"},
        {"status": "success"},
    ]
    lines = [orjson.dumps(status) + b"\n" for status in statuses]
    if _stream_flag(doc, True):
        return Reply(content_type=NDJSON, chunks=lines)
    return Reply.body(lines[-1].rstrip(b"\n"), JSON)


def _show(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    body = {
        "license": "LLAMA 3.2 COMMUNITY LICENSE AGREEMENT",
        "modelfile": "FROM llama3.2:latest\n",
        "parameters": 'stop "<|eot_id|>"',
        "template": "{{ .Prompt }}",
        "details": _DETAILS,
        "model_info": {"general.architecture": "llama", "llama.context_length": 131072},
        "capabilities": ["completion", "tools"],
        "modified_at": "2026-11-01T10:00:00.123456789Z",
    }
    return Reply.body(orjson.dumps(body))


_DETAILS: Final = {
    "parent_model": "",
    "format": "gguf",
    "family": "llama",
    "families": ["llama"],
    "parameter_size": "3.2B",
    "quantization_level": "Q4_K_M",
}


def _tags(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    models = [
        {
            "name": name,
            "model": name,
            "modified_at": "2026-11-01T10:00:00.123456789Z",
            "size": 2019393189,
            "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": _DETAILS,
        }
        for name in TAGS
    ]
    return Reply.body(orjson.dumps({"models": models}))


#: /api/ps as the fake reports it.
PS_MODEL: Final = {
    "name": "llama3.2:latest",
    "model": "llama3.2:latest",
    "size": 3583100928,
    "digest": hashlib.sha256(b"llama3.2:latest").hexdigest(),
    "details": _DETAILS,
    "expires_at": "2026-11-22T06:04:05.123456789+01:00",
    "size_vram": 2684354560,
    "context_length": 4096,
}


def _ps(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    return Reply.body(orjson.dumps({"models": [PS_MODEL]}))


def _v1_chat(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    if doc.get("model") == "gpt-4o":
        return Reply.body(fixture("v1_error_404.json"), JSON, 404)
    events = events_of("v1_chat_stream_usage.sse")
    if doc.get("stream") is True:
        if not (doc.get("stream_options") or {}).get("include_usage"):
            events = [event for event in events if b'"choices":[]' not in event]
        return Reply(content_type=SSE, chunks=events)
    chunks = [orjson.loads(event[len(b"data: ") :]) for event in events[:-1]]
    body = {
        "id": chunks[0]["id"],
        "object": "chat.completion",
        "created": chunks[0]["created"],
        "model": chunks[0]["model"],
        "system_fingerprint": "fp_ollama",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "".join(
                        c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]
                    ),
                },
                "finish_reason": "stop",
            }
        ],
        "usage": chunks[-1]["usage"],
    }
    return Reply.body(orjson.dumps(body) + b"\n", JSON)


def _v1_completions(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    return Reply(content_type=SSE, chunks=events_of("v1_completions_stream_usage.sse"))


EMBEDDING: Final = (0.25, -0.5, 0.125, 1.0)


def _v1_embeddings(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    vector: object = list(EMBEDDING)
    if doc.get("encoding_format") == "base64":
        vector = base64.b64encode(struct.pack(f"<{len(EMBEDDING)}f", *EMBEDDING)).decode()
    body = {
        "object": "list",
        "data": [{"object": "embedding", "embedding": vector, "index": 0}],
        "model": doc.get("model", ""),
        "usage": {"prompt_tokens": 7, "total_tokens": 7},
    }
    return Reply.body(orjson.dumps(body) + b"\n", JSON)


def _root(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    return Reply.body(b"Ollama is running", TEXT)


def _version(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    return Reply.body(b'{"version":"0.33.0"}')


def _delete(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    return Reply(200, None)


_ROUTES: Final = {
    ("GET", "/"): _root,
    ("HEAD", "/"): _root,
    ("GET", "/api/version"): _version,
    ("GET", "/api/tags"): _tags,
    ("GET", "/api/ps"): _ps,
    ("POST", "/api/show"): _show,
    ("POST", "/api/chat"): _chat,
    ("POST", "/api/generate"): _generate,
    ("POST", "/api/embed"): _embed,
    ("POST", "/api/pull"): _pull,
    ("POST", "/api/create"): _create,
    ("DELETE", "/api/delete"): _delete,
    ("POST", "/v1/chat/completions"): _v1_chat,
    ("POST", "/v1/completions"): _v1_completions,
    ("POST", "/v1/embeddings"): _v1_embeddings,
}

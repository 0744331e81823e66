"""What the fake Ollama and the tests share: fixtures, content types, scripted replies
(``Reply``) and what the fake received (``Received``)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
from multidict import CIMultiDict

FIXTURES: Final = Path(__file__).parent / "fixtures"

NDJSON: Final = "application/x-ndjson"
JSON_UTF8: Final = "application/json; charset=utf-8"
JSON: Final = "application/json"
SSE: Final = "text/event-stream"
TEXT: Final = "text/plain; charset=utf-8"
#: Ollama's router answers 404 and 405 in plain text with no charset.
PLAIN: Final = "text/plain"

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

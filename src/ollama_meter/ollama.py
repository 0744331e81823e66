"""Ollama's wire format, as far as a metering proxy needs it.

This module owns three pieces of protocol knowledge and does no I/O (no aiohttp, no
prometheus_client), so tests feed it plain bytes:

1. The route table. Every route Ollama serves maps to a fixed template, which is the only
   thing that may become an ``endpoint`` label; any other path is ``other``. A route also says
   whether its JSON request body names a model, what ``stream`` defaults to, and what kind of
   body answers it.
2. Request inspection. A JSON request body gives the model name (``model``, else ``name``) and
   the effective stream flag. Anything unparsable gives "no model" and the route's default.
3. Response observation. Usage numbers sit at the *end* of a body: the final NDJSON object
   (``done:true``), the single JSON object of a non-stream reply, or the last SSE events of a
   ``/v1`` stream. So the observer never parses while bytes flow: ``LineTail.feed`` only keeps
   the last few complete lines of a stream (counting newlines in C), ``WholeBody.feed`` keeps
   the chunks of a single-object reply, and ``read_outcome`` parses what was kept once, when
   the body has ended. Memory is bounded by a byte limit; a line (or a single-object body)
   longer than that is dropped and simply reports nothing.

Rule: nothing here may raise into the byte path. ``read_outcome`` returns an Outcome for any
input; ``feed`` does arithmetic only.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, NamedTuple

import orjson

__all__ = [
    "DEFAULT_TAG",
    "Ending",
    "Framing",
    "LineTail",
    "LoadedModel",
    "Outcome",
    "RequestFacts",
    "Route",
    "RouteKind",
    "Usage",
    "WholeBody",
    "canonical_model",
    "framing_for",
    "inspect_request",
    "judge",
    "parse_ps",
    "parse_tags",
    "parse_time",
    "read_outcome",
    "route_for",
    "tail_for",
]


class RouteKind(enum.Enum):
    """What a route's successful reply carries that we can meter."""

    PLAIN = "plain"  # nothing to meter beyond bytes and time
    NATIVE = "native"  # /api/generate, /api/chat, /api/embed(dings): final-object metrics
    PROGRESS = "progress"  # /api/pull, push, create: ends with {"status":"success"}
    OPENAI = "openai"  # /v1/chat/completions, /v1/completions, /v1/embeddings: usage
    RESPONSES = "responses"  # /v1/responses: response.completed event
    MESSAGES = "messages"  # /v1/messages (Anthropic): message_delta usage, message_stop


class Framing(enum.Enum):
    """How a response body is cut into records."""

    JSON = "json"  # one object (native: no trailing newline; /v1: one trailing newline)
    NDJSON = "ndjson"  # one object per line
    SSE = "sse"  # data: / event: lines, events separated by a blank line


#: Bytes that can only appear in the record that ends a successful stream of each kind.
_FINAL_MARKERS: Final = {
    (RouteKind.NATIVE, Framing.NDJSON): b'"done":true',
    (RouteKind.PROGRESS, Framing.NDJSON): b'"status":"success"',
    (RouteKind.OPENAI, Framing.SSE): b"[DONE]",
    (RouteKind.RESPONSES, Framing.SSE): b"response.completed",
    (RouteKind.MESSAGES, Framing.SSE): b"message_stop",
}


@dataclass(frozen=True, slots=True)
class Route:
    """One row of the route table."""

    template: str
    kind: RouteKind = RouteKind.PLAIN
    #: JSON body keys that name the model, in order of preference; empty: the body is not read.
    model_keys: tuple[str, ...] = ()
    #: What Ollama assumes when the body has no boolean ``stream``.
    stream_default: bool = False
    #: The model is the last path segment (``/v1/models/{model}``).
    model_in_path: bool = False
    #: A route that runs a model on a prompt (not model management, not plain reads).
    inference: bool = field(init=False)
    # What the final record of a successful stream holds, per framing (see final_marker).
    _ndjson_marker: bytes | None = field(init=False)
    _sse_marker: bytes | None = field(init=False)

    def __post_init__(self) -> None:
        # Computed once per route: per request, enum members would be hashed in Python code.
        object.__setattr__(self, "inference", self.kind in _INFERENCE)
        object.__setattr__(self, "_ndjson_marker", _FINAL_MARKERS.get((self.kind, Framing.NDJSON)))
        object.__setattr__(self, "_sse_marker", _FINAL_MARKERS.get((self.kind, Framing.SSE)))

    @property
    def inspects_body(self) -> bool:
        return bool(self.model_keys)

    def final_marker(self, framing: Framing) -> bytes | None:
        """What to look for in a chunk to learn that the stream's final record may have passed.

        JSON escapes quotes inside strings, so ``"done":true`` is a key; a tool call's
        arguments object could hold one too, which is why a finding is checked by parsing
        before it counts.
        """
        if framing is Framing.NDJSON:
            return self._ndjson_marker
        if framing is Framing.SSE:
            return self._sse_marker
        return None


_INFERENCE: Final = frozenset(
    {RouteKind.NATIVE, RouteKind.OPENAI, RouteKind.RESPONSES, RouteKind.MESSAGES}
)


_MODEL: Final = ("model",)
_MODEL_OR_NAME: Final = ("model", "name")

_EXACT_ROUTES: Final[dict[str, Route]] = {
    r.template: r
    for r in (
        Route("/"),
        Route("/api/version"),
        Route("/api/status"),
        Route("/api/tags"),
        Route("/api/ps"),
        Route("/api/show", model_keys=_MODEL_OR_NAME),
        Route("/api/copy", model_keys=("source",)),
        Route("/api/delete", model_keys=_MODEL_OR_NAME),
        Route("/api/pull", RouteKind.PROGRESS, _MODEL_OR_NAME, stream_default=True),
        Route("/api/push", RouteKind.PROGRESS, _MODEL_OR_NAME, stream_default=True),
        Route("/api/create", RouteKind.PROGRESS, _MODEL_OR_NAME, stream_default=True),
        Route("/api/generate", RouteKind.NATIVE, _MODEL, stream_default=True),
        Route("/api/chat", RouteKind.NATIVE, _MODEL, stream_default=True),
        Route("/api/embed", RouteKind.NATIVE, _MODEL),
        Route("/api/embeddings", RouteKind.NATIVE, _MODEL),
        Route("/api/me"),
        Route("/api/signout"),
        Route("/api/experimental/web_search"),
        Route("/api/experimental/web_fetch"),
        Route("/api/experimental/model-recommendations"),
        Route("/v1/chat/completions", RouteKind.OPENAI, _MODEL),
        Route("/v1/completions", RouteKind.OPENAI, _MODEL),
        Route("/v1/embeddings", RouteKind.OPENAI, _MODEL),
        Route("/v1/models"),
        Route("/v1/responses", RouteKind.RESPONSES, _MODEL),
        Route("/v1/messages", RouteKind.MESSAGES, _MODEL),
        # The model is a multipart form field here; the body is not read (it is audio).
        Route("/v1/audio/transcriptions"),
    )
}

# Routes with one path parameter, matched by prefix.
_PREFIX_ROUTES: Final[tuple[tuple[str, Route], ...]] = (
    ("/api/blobs/", Route("/api/blobs/{digest}")),
    ("/v1/models/", Route("/v1/models/{model}", model_in_path=True)),
    ("/api/user/keys/", Route("/api/user/keys/{key}")),
)

OTHER_ROUTE: Final = Route("other")

#: Every endpoint label value the proxy can produce.
ENDPOINTS: Final[tuple[str, ...]] = (
    *_EXACT_ROUTES,
    *(route.template for _, route in _PREFIX_ROUTES),
    OTHER_ROUTE.template,
)


def route_for(path: str) -> Route:
    """The route a (decoded, query-free) request path belongs to."""
    route = _EXACT_ROUTES.get(path)
    if route is not None:
        return route
    for prefix, prefixed in _PREFIX_ROUTES:
        if path.startswith(prefix) and len(path) > len(prefix):
            return prefixed
    return OTHER_ROUTE


DEFAULT_TAG: Final = "latest"
_DEFAULT_HOST_PREFIX: Final = "registry.ollama.ai/"
_DEFAULT_NAMESPACE_PREFIX: Final = "library/"


def canonical_model(name: str) -> str:
    """Spell a model name the way ``/api/tags`` lists it.

    ``llama3.2`` and ``registry.ollama.ai/library/llama3.2:latest`` both become
    ``llama3.2:latest``, so a client's spelling does not split one model into several series.
    Case is kept here; matching against the upstream's list is case-insensitive (as in Ollama).
    """
    name = name.strip()
    if name.startswith(_DEFAULT_HOST_PREFIX):
        name = name[len(_DEFAULT_HOST_PREFIX) :]
        if name.startswith(_DEFAULT_NAMESPACE_PREFIX):
            name = name[len(_DEFAULT_NAMESPACE_PREFIX) :]
    if "@" in name:  # pinned by digest: no tag to add
        return name
    if ":" not in name.rsplit("/", 1)[-1]:
        name = f"{name}:{DEFAULT_TAG}"
    return name


class RequestFacts(NamedTuple):
    """What a request body says about itself."""

    model: str | None
    stream: bool


def inspect_request(route: Route, body: bytes | None) -> RequestFacts:
    """Model and effective stream flag of a request, from its whole JSON body.

    ``body`` is None when it was not read (too large, or not a route that names a model).
    """
    if body is None or not route.model_keys:
        return RequestFacts(None, route.stream_default)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return RequestFacts(None, route.stream_default)
    if not isinstance(doc, dict):
        return RequestFacts(None, route.stream_default)
    model: str | None = None
    for key in route.model_keys:
        value = doc.get(key)
        if isinstance(value, str) and value.strip():
            model = value
            break
    stream = doc.get("stream")
    return RequestFacts(model, stream if isinstance(stream, bool) else route.stream_default)


_MEDIA_FRAMING: Final = {
    "application/x-ndjson": Framing.NDJSON,
    "text/event-stream": Framing.SSE,
    "application/json": Framing.JSON,
}
# Content-Type values repeat (Ollama sends a handful): remember the answer for each.
_FRAMING_CACHE: dict[str, Framing | None] = {}
_FRAMING_CACHE_LIMIT: Final = 64


def framing_for(content_type: str | None) -> Framing | None:
    """The framing of a body from its Content-Type; None for bodies we do not read."""
    if not content_type:
        return None
    try:
        return _FRAMING_CACHE[content_type]
    except KeyError:
        pass
    framing = _MEDIA_FRAMING.get(content_type.split(";", 1)[0].strip().lower())
    if len(_FRAMING_CACHE) < _FRAMING_CACHE_LIMIT:
        _FRAMING_CACHE[content_type] = framing
    return framing


#: Lines to keep: enough to hold the records that carry usage and the end marker. SSE: a
#: /v1/messages stream ends "event: message_delta / data / blank / event: message_stop / data /
#: blank"; a /v1 chat stream ends "finish chunk / blank / usage chunk / blank / [DONE] / blank".
#: NDJSON and JSON: the last object.
_KEEP_SSE_LINES: Final = 8
_KEEP_LINES: Final = 1


class LineTail:
    """The last few complete lines of a body, and its unterminated end, in bounded memory.

    ``feed`` is on the hot path: per chunk it counts newlines and appends a reference, then
    drops whole chunks from the front once the rest still holds the lines we need. Nothing
    is copied or decoded until ``lines()``.
    """

    __slots__ = (
        "_chunks",
        "_dropped",
        "_keep",
        "_limit",
        "_lost_head",
        "_newlines",
        "_size",
        "framing",
        "records",
    )

    def __init__(self, framing: Framing, limit: int) -> None:
        self.framing = framing
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._newlines = 0
        self._size = 0
        # The line starts right after the (keep+1)-th newline from the end.
        self._keep = (_KEEP_SSE_LINES if framing is Framing.SSE else _KEEP_LINES) + 1
        self._limit = limit
        self._lost_head = False
        #: A line was dropped for its size.
        self._dropped = False
        #: Records seen so far: NDJSON lines, or SSE ``data:`` lines (an approximation of the
        #: content chunks a stream delivered; see usage_missing in metrics).
        self.records = 0

    def feed(self, chunk: bytes) -> None:
        count = chunk.count(b"\n")
        self.records += chunk.count(_DATA) if self.framing is Framing.SSE else count
        chunks = self._chunks
        chunks.append((chunk, count))
        self._newlines += count
        self._size += len(chunk)
        keep = self._keep
        while len(chunks) > 1 and self._newlines - chunks[0][1] >= keep:
            dropped, dropped_count = chunks.popleft()
            self._newlines -= dropped_count
            self._size -= len(dropped)
            self._lost_head = True
        if self._size > self._limit:
            self._shrink()

    def _shrink(self) -> None:
        """Over the limit: keep the whole lines at the end that fit, drop the rest (rare, so
        the join here costs nothing on the common path)."""
        data = b"".join(chunk for chunk, _ in self._chunks)
        self._chunks.clear()
        self._newlines = self._size = 0
        self._dropped = True
        start = data.rfind(b"\n")
        if start < 0 or len(data) - start - 1 > self._limit:
            # Inside a line longer than the limit: drop it; lines() skips the rest of it.
            self._lost_head = True
            return
        while (prev := data.rfind(b"\n", 0, start)) >= 0 and len(data) - prev - 1 <= self._limit:
            start = prev
        kept = data[start + 1 :]
        self._lost_head = False
        if kept:
            count = kept.count(b"\n")
            self._chunks.append((kept, count))
            self._newlines, self._size = count, len(kept)

    def final_line_dropped(self, lines: list[bytes]) -> bool:
        """The body ended with a complete line that was dropped for its size (``lines`` is
        what lines() returned): it was the final record, and its usage is unknown."""
        if not self._dropped or not lines or lines[-1] != b"":
            return False  # none dropped, or still inside the long line (cut), or unterminated
        return not any(line.strip() for line in lines[:-1])

    def lines(self) -> list[bytes]:
        """Complete lines kept, then the unterminated end (``b""`` if the body ended in \\n)."""
        data = b"".join(chunk for chunk, _ in self._chunks)
        lines = data.split(b"\n")
        if self._lost_head:
            # The first piece may be the end of a line whose start was dropped.
            del lines[0]
        return lines


class WholeBody:
    """All of a single-object (``Framing.JSON``) body, up to a byte limit.

    The one object is the whole body, so there are no lines to track: chunks are kept as they
    come (usually there is one) and parsed once at the end. Past the limit everything is
    dropped and the reply reports nothing.
    """

    __slots__ = ("_chunks", "_limit", "_size", "framing")

    def __init__(self, framing: Framing, limit: int) -> None:
        self.framing = framing
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit

    def feed(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self._limit:
            self._chunks.append(chunk)
        elif self._chunks:
            self._chunks.clear()

    def lines(self) -> list[bytes]:
        """The body as one piece, or nothing if it was over the limit."""
        chunks = self._chunks
        return chunks if len(chunks) < 2 else [b"".join(chunks)]


def tail_for(framing: Framing, whole_limit: int, tail_limit: int) -> LineTail | WholeBody:
    """The observer for a body of this framing: a single object is kept up to
    ``whole_limit`` bytes, the end of a stream up to about ``tail_limit``."""
    if framing is Framing.JSON:
        return WholeBody(framing, whole_limit)
    return LineTail(framing, tail_limit)


class Usage(NamedTuple):
    """What the upstream reported about one reply, in base units. Absent numbers are 0.

    Per-request values are NamedTuples, not frozen dataclasses: a frozen dataclass sets each
    field through object.__setattr__, several times the cost of building a tuple (measured
    with callgrind, bench/README.md).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_eval_seconds: float = 0.0
    eval_seconds: float = 0.0
    #: Only when reported: a missing load_duration is not a zero-second load.
    load_seconds: float | None = None
    #: Raw done_reason / finish_reason / stop reason, when the reply has one.
    done_reason: str | None = None
    #: False when the reply carries no token counts at all (a /v1 stream without
    #: include_usage): then no token counter is touched, rather than counting zeros.
    tokens_reported: bool = True


class Ending(enum.Enum):
    """How a body ended, judged by its last records."""

    COMPLETE = "complete"  # an end marker, or a body that has none by design
    UNTERMINATED = "unterminated"  # a stream that stopped without its end marker
    ERROR = "error"  # a stream that reported an error in-band


class Outcome(NamedTuple):
    ending: Ending
    usage: Usage | None = None
    #: The final record was longer than the tail kept: complete, usage unknown.
    oversized: bool = False


_COMPLETE: Final = Outcome(Ending.COMPLETE)
_OVERSIZED: Final = Outcome(Ending.COMPLETE, oversized=True)
_UNTERMINATED: Final = Outcome(Ending.UNTERMINATED)
_ERROR: Final = Outcome(Ending.ERROR)
_NS_PER_S: Final = 1e9


def judge(kind: RouteKind, tail: LineTail | WholeBody) -> Outcome:
    """Judge a finished (or cut) body of a successful reply from what its observer kept."""
    lines = tail.lines()
    if isinstance(tail, LineTail) and tail.final_line_dropped(lines):
        return _OVERSIZED
    return read_outcome(kind, tail.framing, lines)


def read_outcome(kind: RouteKind, framing: Framing, lines: list[bytes]) -> Outcome:
    """Judge a finished body of a successful (2xx) reply from its last lines."""
    if kind is RouteKind.PLAIN:
        return _COMPLETE
    if framing is Framing.SSE:
        return _read_sse(kind, lines)
    if framing is Framing.JSON:
        # A whole body: complete by construction (a short body fails in the transport),
        # unless Ollama says it is not: a runner that stopped early leaves "done": false.
        doc = _parse_object(lines[0]) if len(lines) == 1 else None
        if doc is None:
            return _COMPLETE
        ending = Ending.UNTERMINATED if doc.get("done") is False else Ending.COMPLETE
        return Outcome(ending, _usage_of(kind, doc))
    # NDJSON: only the last object matters.
    doc = _last_object(lines)
    if doc is None:
        return _UNTERMINATED
    if "error" in doc:
        return _ERROR
    if kind is RouteKind.PROGRESS:
        return _COMPLETE if doc.get("status") == "success" else _UNTERMINATED
    # One 2026 client report saw a final object with done_reason but no done: final too.
    if doc.get("done") is True or "done_reason" in doc:
        return Outcome(Ending.COMPLETE, _usage_of(kind, doc))
    return _UNTERMINATED


def _last_object(lines: list[bytes]) -> dict[str, object] | None:
    for line in reversed(lines):
        if line.strip():
            return _parse_object(line)
    return None


def _parse_object(data: bytes) -> dict[str, object] | None:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _usage_of(kind: RouteKind, doc: dict[str, object]) -> Usage | None:
    if kind is RouteKind.NATIVE:
        return _native_usage(doc)
    if kind is RouteKind.OPENAI:
        return _openai_usage(doc)
    if kind is RouteKind.RESPONSES:
        return _io_usage(doc.get("usage"), None)
    if kind is RouteKind.MESSAGES:
        return _io_usage(doc.get("usage"), _str(doc.get("stop_reason")))
    return None


def _native_usage(doc: dict[str, object]) -> Usage:
    get = doc.get
    prompt = get("prompt_eval_count", 0)
    completion = get("eval_count", 0)
    prompt_ns = get("prompt_eval_duration", 0)
    eval_ns = get("eval_duration", 0)
    load_ns = get("load_duration")
    reason = get("done_reason")
    # The common case inline (type() is int also rules out bool); anything odd goes to _count.
    if not (
        type(prompt) is int
        and type(completion) is int
        and type(prompt_ns) is int
        and type(eval_ns) is int
        and prompt >= 0
        and completion >= 0
        and prompt_ns >= 0
        and eval_ns >= 0
    ):
        prompt, completion = _count(prompt), _count(completion)
        prompt_ns, eval_ns = _count(prompt_ns), _count(eval_ns)
    return Usage(
        prompt,
        completion,
        prompt_ns / _NS_PER_S,
        eval_ns / _NS_PER_S,
        None if load_ns is None else _count(load_ns) / _NS_PER_S,
        reason if type(reason) is str and reason else None,
    )


def _openai_usage(doc: dict[str, object]) -> Usage | None:
    usage = doc.get("usage")
    if not isinstance(usage, dict):
        return None
    return Usage(
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
        done_reason=_finish_reason(doc),
    )


def _io_usage(usage: object, done_reason: str | None) -> Usage | None:
    """Usage in the Responses and Anthropic shapes (``input_tokens``/``output_tokens``)."""
    if not isinstance(usage, dict):
        return None
    return Usage(
        prompt_tokens=_count(usage.get("input_tokens")),
        completion_tokens=_count(usage.get("output_tokens")),
        done_reason=done_reason,
    )


def _finish_reason(doc: dict[str, object]) -> str | None:
    choices = doc.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return _str(choices[0].get("finish_reason"))
    return None


def _count(value: object) -> int:
    # type() rather than isinstance(): bool is an int in Python, and a JSON true is no count.
    return value if type(value) is int and value > 0 else 0


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


_DATA: Final = b"data:"
_EVENT: Final = b"event:"
_DONE: Final = b"[DONE]"


def _sse_records(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """(event name, data) of each ``data:`` line, oldest first; ``event:`` names the next."""
    records: list[tuple[bytes, bytes]] = []
    event = b""
    for raw in lines:
        line = raw.rstrip(b"\r")
        if line.startswith(_EVENT):
            event = line[len(_EVENT) :].strip()
        elif line.startswith(_DATA):
            records.append((event, line[len(_DATA) :].strip()))
        elif not line:
            event = b""
    return records


def _read_sse(kind: RouteKind, lines: list[bytes]) -> Outcome:
    records = _sse_records(lines)
    if kind is RouteKind.OPENAI:
        return _read_openai_stream(records)
    if kind is RouteKind.RESPONSES:
        return _read_responses_stream(records)
    if kind is RouteKind.MESSAGES:
        return _read_messages_stream(records)
    return _COMPLETE


def _read_openai_stream(records: list[tuple[bytes, bytes]]) -> Outcome:
    # Ollama's /v1 layer loses a mid-stream error and just stops before [DONE].
    if not records or records[-1][1] != _DONE:
        return _ERROR
    prompt = completion = 0
    has_usage = False
    reason: str | None = None
    for _, data in reversed(records[:-1]):
        doc = _parse_object(data)
        if doc is None:
            continue
        choices = doc.get("choices")
        usage = doc.get("usage")
        # Only the chunk with empty choices holds real numbers (/v1/completions puts zeros in
        # every other chunk): never sum across chunks.
        if not has_usage and choices == [] and isinstance(usage, dict):
            prompt = _count(usage.get("prompt_tokens"))
            completion = _count(usage.get("completion_tokens"))
            has_usage = True
        if reason is None:
            reason = _finish_reason(doc)
    if not has_usage and reason is None:
        return _COMPLETE
    if not has_usage:
        # No include_usage: the stream carries no token counts. Report the finish reason only.
        return Outcome(Ending.COMPLETE, Usage(done_reason=reason, tokens_reported=False))
    return Outcome(Ending.COMPLETE, Usage(prompt, completion, done_reason=reason))


def _read_responses_stream(records: list[tuple[bytes, bytes]]) -> Outcome:
    for event, data in reversed(records):
        doc = _parse_object(data)
        name = event
        if not name and doc is not None:
            name = (_str(doc.get("type")) or "").encode()
        if name in (b"response.failed", b"error"):
            return _ERROR
        if name == b"response.completed":
            response = doc.get("response") if doc else None
            if isinstance(response, dict):
                return Outcome(Ending.COMPLETE, _io_usage(response.get("usage"), None))
            return _COMPLETE
    return _UNTERMINATED


def _read_messages_stream(records: list[tuple[bytes, bytes]]) -> Outcome:
    if any(event == b"error" for event, _ in records):
        return _ERROR
    if not records or records[-1][0] != b"message_stop":
        return _UNTERMINATED
    for event, data in reversed(records):
        if event == b"message_delta":
            doc = _parse_object(data)
            if doc is not None:
                delta = doc.get("delta")
                reason = _str(delta.get("stop_reason")) if isinstance(delta, dict) else None
                return Outcome(Ending.COMPLETE, _io_usage(doc.get("usage"), reason))
    return _COMPLETE


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """One entry of ``/api/ps``."""

    name: str
    size_bytes: int
    vram_bytes: int
    expires_at: float | None  # Unix seconds; None when absent or Go's zero time
    context_length: int | None


def parse_version(body: bytes | None) -> str | None:
    """The ``version`` of an ``/api/version`` body (at most 64 characters), or None."""
    if not body:
        return None
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    version = _str(value.get("version")) if isinstance(value, dict) else None
    return None if version is None else version[:64]


def parse_ps(body: bytes) -> list[LoadedModel] | None:
    """The loaded models of a ``/api/ps`` body; None if it is not the expected shape."""
    models = _model_list(body)
    if models is None:
        return None
    return [model for model in map(loaded_model, models) if model is not None]


def loaded_model(entry: Mapping[str, object]) -> LoadedModel | None:
    """One entry of ``/api/ps``'s ``models``; None without a name."""
    name = _str(entry.get("name")) or _str(entry.get("model"))
    if name is None:
        return None
    context = entry.get("context_length")
    return LoadedModel(
        name=name,
        size_bytes=_count(entry.get("size")),
        vram_bytes=_count(entry.get("size_vram")),
        expires_at=_timestamp(entry.get("expires_at")),
        context_length=_count(context) if context is not None else None,
    )


def parse_tags(body: bytes) -> list[str] | None:
    """The model names of a ``/api/tags`` body; None if it is not the expected shape."""
    models = _model_list(body)
    if models is None:
        return None
    names = (_str(entry.get("name")) or _str(entry.get("model")) for entry in models)
    return [name for name in names if name is not None]


def _model_list(body: bytes) -> list[dict[str, object]] | None:
    doc = _parse_object(body)
    if doc is None:
        return None
    models = doc.get("models")
    if models is None:  # Go marshals an empty slice as null in some versions
        return []
    if not isinstance(models, list):
        return None
    return [entry for entry in models if isinstance(entry, dict)]


def parse_time(value: object) -> float | None:
    """An RFC 3339 time of Ollama's (``expires_at``, ``modified_at``) as Unix seconds."""
    return _timestamp(value)


def _timestamp(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        seconds = datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None
    return seconds if seconds > 0 else None

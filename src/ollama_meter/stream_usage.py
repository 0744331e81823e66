"""Opt-in (--openai-stream-usage): token counts for ``/v1/chat/completions`` streams whose
client did not ask for them, without the client seeing any difference.

An OpenAI-style stream carries token counts only when the request says
``"stream_options": {"include_usage": true}``; then the server sends one more event before
``data: [DONE]``, a chunk with ``"choices": []`` and ``usage``. Most OpenAI-compatible tools
never ask, so their streams would meter no tokens. With the option on, the proxy

1. adds ``"stream_options":{"include_usage":true}`` to such a request body
   (``with_include_usage``): inserted after the opening brace, so every other byte stays as
   the client sent it; only a body that already has a ``stream_options`` object without
   ``include_usage: true`` is re-serialised;
2. removes that usage event from the response (``HiddenUsage``), after the metering side
   channel has seen it, so the client receives exactly the bytes it would have received
   without the option. Events are forwarded whole: a partial event waits for its end (up to
   a bound, past which the stream passes unfiltered).

Only ``/v1/chat/completions``: on ``/v1/completions`` Ollama adds zero usage to *every*
chunk once include_usage is set, so those bytes could not be kept. Pure: no I/O.
"""

from __future__ import annotations

from typing import Final

import orjson

_INCLUDE_USAGE: Final = b'"stream_options":{"include_usage":true},'
_EVENT_END: Final = b"\n\n"
_EMPTY_CHOICES: Final = b'"choices":[]'
_DATA: Final = b"data:"


def with_include_usage(body: bytes) -> bytes | None:
    """The body asking for usage, or None when nothing needs to change or must not: not a
    stream, the client asked for usage itself, the body is not a JSON object, or its
    ``stream_options`` is one Ollama would read differently or refuse (Go matches JSON keys
    case-insensitively: ``Stream_Options`` is ``stream_options`` to it)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or doc.get("stream") is not True:
        return None
    spellings = [key for key in doc if key.casefold() == "stream_options"]
    if not spellings:
        brace = body.index(b"{")  # a JSON object's first non-space byte
        return body[: brace + 1] + _INCLUDE_USAGE + body[brace + 1 :]
    options = doc.get("stream_options")
    if spellings != ["stream_options"] or not isinstance(options, dict):
        return None
    if [key for key in options if key.casefold() == "include_usage"] not in ([], ["include_usage"]):
        return None
    if options.get("include_usage", False) is not False:
        return None  # true (asked for already), or a value Ollama would refuse
    doc["stream_options"] = {**options, "include_usage": True}
    return orjson.dumps(doc)


def _is_usage_event(event: bytes) -> bool:
    data = event.strip()
    if not data.startswith(_DATA):
        return False
    try:
        doc = orjson.loads(data[len(_DATA) :])
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and doc.get("choices") == [] and isinstance(doc.get("usage"), dict)


class HiddenUsage:
    """Filters a ``/v1/chat/completions`` SSE body: every event passes but the usage event.

    A partial event waits for its end, at most ``limit`` bytes of it: past that (an event
    that never ends, a stream framed otherwise) everything passes through unfiltered from then
    on, the usage event included. The separator is looked for in new bytes only.
    """

    __slots__ = ("_last", "_limit", "_parts", "_passing", "_size")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._last = b""  # the last byte held, to find a separator split across chunks
        self._passing = False

    def feed(self, chunk: bytes) -> bytes:
        """What of the body so far may go to the client now."""
        if self._passing or not chunk:
            return chunk
        end = chunk.rfind(_EVENT_END)
        if end >= 0:
            end += len(_EVENT_END)
        elif self._last == b"\n" and chunk[:1] == b"\n":
            end = 1
        else:
            self._hold(chunk)
            if self._size > self._limit:
                self._passing = True
                return self.flush()
            return b""
        complete = b"".join([*self._parts, chunk[:end]])
        self._parts.clear()
        self._size = 0
        self._last = b""
        self._hold(chunk[end:])
        if _EMPTY_CHOICES not in complete:
            return complete
        events = complete.split(_EVENT_END)[:-1]
        return b"".join(e + _EVENT_END for e in events if not _is_usage_event(e + _EVENT_END))

    def _hold(self, part: bytes) -> None:
        if part:
            self._parts.append(part)
            self._size += len(part)
            self._last = part[-1:]

    def flush(self) -> bytes:
        """The unfinished end of the body (a stream cut inside an event)."""
        pending = b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        self._last = b""
        return pending

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
   without the option. Events are forwarded whole: a partial event waits for its end.

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
    """The body asking for usage, or None when nothing needs to change (not a stream, the
    client asked for usage itself, or the body is not a JSON object)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or doc.get("stream") is not True:
        return None
    if "stream_options" not in doc:
        brace = body.index(b"{")  # a JSON object's first non-space byte
        return body[: brace + 1] + _INCLUDE_USAGE + body[brace + 1 :]
    options = doc["stream_options"]
    if isinstance(options, dict) and options.get("include_usage") is True:
        return None
    doc["stream_options"] = {
        **(options if isinstance(options, dict) else {}),
        "include_usage": True,
    }
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
    """Filters a ``/v1/chat/completions`` SSE body: every event passes but the usage event."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """What of the body so far may go to the client now."""
        data = self._pending + chunk if self._pending else chunk
        end = data.rfind(_EVENT_END)
        if end < 0:
            self._pending = data
            return b""
        end += len(_EVENT_END)
        complete, self._pending = data[:end], data[end:]
        if _EMPTY_CHOICES not in complete:
            return complete
        events = complete.split(_EVENT_END)[:-1]
        return b"".join(e + _EVENT_END for e in events if not _is_usage_event(e + _EVENT_END))

    def flush(self) -> bytes:
        """The unfinished end of the body (a stream cut inside an event)."""
        pending, self._pending = self._pending, b""
        return pending

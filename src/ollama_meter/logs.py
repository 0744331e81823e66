"""Log output: the access log (one line per exchange), and plain or JSON log formatting.

One access-log line per request, written when the exchange is recorded. aiohttp's access
logger is not used: it writes nothing for a request whose client went away, and those are the
requests an operator most needs to see. A line carries method, endpoint label, model label,
status, times and token counts; never the raw path, query, prompt or completion.

The access log does not go through ``logging`` either: a LogRecord, its formatting and a
write and flush per line cost about 120k instructions a request, a sixth of the whole proxy
(callgrind, bench/README.md). Like nginx's ``access_log ... buffer= flush=``, lines are
formatted cheaply, kept in memory, and written to stderr in one call at most ``FLUSH_SECONDS``
later, or sooner once ``FLUSH_BYTES`` have gathered; whatever is left is written at shutdown.
The line format is the one the ``logging`` formatters below give every other log line.

A text line can be forged by a value with a line break in it, so every logged value is
escaped (``escape_controls``): access-line values here, and the message of every other text
log line in ``TextFormatter`` (a message may quote what an upstream sent). JSON lines are
escaped by JSON itself.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from typing import Final, TextIO

import orjson
from aiohttp.http_exceptions import HttpProcessingError

from .exchange import Exchange

ACCESS_LOGGER: Final = "ollama_meter.access"
FLUSH_SECONDS: Final = 0.2
FLUSH_BYTES: Final = 64 * 1024
_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def access_fields(x: Exchange) -> dict[str, object]:
    fields: dict[str, object] = {
        "method": x.method,
        "endpoint": x.endpoint,
        "model": x.model,
        "stream": x.stream,
        "status": x.status,
        "duration_s": round(x.duration, 6),
    }
    ttfb = x.time_to_first_byte
    if x.streamed and ttfb is not None:
        fields["ttft_s"] = round(ttfb, 6)
    if x.usage is not None and x.usage.tokens_reported:
        fields["prompt_tokens"] = x.usage.prompt_tokens
        fields["completion_tokens"] = x.usage.completion_tokens
    if x.error is not None:
        fields["error"] = x.error
    if x.gate is not None:
        fields["key"] = x.key or "anonymous"
    return fields


def escape_controls(text: str) -> str:
    """``text`` with every character that is not printable (line breaks, tabs, escapes, other
    control and separator characters) written as a ``\\x``/``\\u`` escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def _escaped(char: str) -> str:
    return repr(char)[1:-1] if ord(char) < 128 else f"\\u{ord(char):04x}"


def access_text(x: Exchange) -> str:
    """The message of a plain access-log line: ``POST endpoint=/api/chat model=... ...``."""
    clean = escape_controls
    text = (
        f"{clean(x.method)} endpoint={clean(x.endpoint)} model={clean(x.model)} "
        f"stream={'true' if x.stream else 'false'} status={x.status} "
        f"duration_s={round(x.duration, 6)}"
    )
    ttfb = x.time_to_first_byte
    if x.streamed and ttfb is not None:
        text += f" ttft_s={round(ttfb, 6)}"
    usage = x.usage
    if usage is not None and usage.tokens_reported:
        text += f" prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens}"
    if x.error is not None:
        text += f" error={x.error}"
    if x.gate is not None:  # access control is on
        text += f" key={x.key or 'anonymous'}"
    return text


class AccessLog:
    """Writes one line per exchange to ``stream`` (stderr by default), in batches."""

    def __init__(self, log_format: str, stream: TextIO | None = None) -> None:
        self._json = log_format == "json"
        self._stream = stream
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    def __call__(self, x: Exchange) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(
                "%Y-%m-%dT%H:%M:%S" if self._json else "%Y-%m-%d %H:%M:%S",
                time.gmtime(second) if self._json else time.localtime(second),
            )
        millis = int((now - second) * 1000)
        if self._json:
            doc = {
                "time": f"{self._stamp}.{millis:03d}Z",
                "level": "info",
                "logger": ACCESS_LOGGER,
                **access_fields(x),
            }
            line = orjson.dumps(doc).decode() + "\n"
        else:
            line = f"{self._stamp},{millis:03d} INFO {ACCESS_LOGGER}: {access_text(x)}\n"
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        stream = self._stream or sys.stderr
        stream.write("".join(self._lines))
        stream.flush()
        self._lines.clear()
        self._size = 0


class TextFormatter(logging.Formatter):
    """The plain format, with control characters in messages escaped (tracebacks stay)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, and access fields."""

    converter = staticmethod(time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            doc.update(access)
        else:
            doc["message"] = record.getMessage()
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


#: What could be a credential in a client's bytes quoted by a parse error: an API key, or the
#: token after Bearer/Basic.
_SECRET: Final = re.compile(
    r"(om_[a-z0-9]{8}_)[A-Za-z0-9_-]+|(\b(?:bearer|basic)\s+)[^\s'\"\\]+", re.IGNORECASE
)


def redact(text: str) -> str:
    return _SECRET.sub(lambda m: (m.group(1) or m.group(2)) + "***", text)


class ClientErrors(logging.Filter):
    """aiohttp logs a request it cannot parse (a malformed or oversized head: the client's
    fault, answered 400) as an error with a traceback, so one hostile client could flood the
    log. Such records become debug lines without the traceback, and with anything that looks
    like a credential in the quoted bytes masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        # The client's bytes are arguments, never part of the format string.
        record.msg, record.args = "%s: %s", (redact(record.getMessage()), redact(error.message))
        record.exc_info = record.exc_text = None
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def setup_logging(log_format: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = TextFormatter(_TEXT_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientErrors) for f in server.filters):
        server.addFilter(ClientErrors())

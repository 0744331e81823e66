"""Log output: the access-log line of each exchange, and plain or JSON formatting.

One access-log line per request, on logger ``ollama_meter.access``, written when the exchange
is recorded (aiohttp's own access logger is not used: it writes nothing for a request whose
client went away, and those are the requests an operator most needs to see). A line carries
method, endpoint label, model label, status, times and token counts; never the raw path,
query, prompt or completion.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Final

import orjson

from .exchange import Exchange

ACCESS_LOGGER: Final = "ollama_meter.access"
_access = logging.getLogger(ACCESS_LOGGER)


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
    return fields


def log_access(x: Exchange) -> None:
    if not _access.isEnabledFor(logging.INFO):
        return
    fields = access_fields(x)
    text = " ".join(
        f"{key}={str(value).lower() if isinstance(value, bool) else value}"
        for key, value in fields.items()
        if key != "method"
    )
    _access.info("%s %s", x.method, text, extra={"access": fields})


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


def setup_logging(log_format: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

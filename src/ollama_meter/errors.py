"""The failures ollama-meter reports itself, each with the HTTP status it maps to.

    UpstreamError            the upstream leg failed before a response began; not the client's
    ├── UpstreamUnavailable  502: connection refused, host unresolvable, network unreachable
    ├── UpstreamClosed       502: connected, but closed or reset before a valid response
    └── UpstreamTimeout      504: no connection, or no response, within the configured time

An upstream 4xx/5xx is not an error of ours: it passes through byte for byte. proxy.py turns
aiohttp client exceptions into these types once, at the edge. Their message is what the client
is told, a fixed text that names no address and quotes no upstream bytes; the detail (which
upstream, what it sent) goes to the log.

``error_body`` renders any error of ours in the shape of the route's own errors: Ollama's
``{"error": "..."}`` on native routes, OpenAI's ``{"error": {"message", "type", ...}}`` on
``/v1``, so each official client raises its usual exception with our text.
"""

from __future__ import annotations

from typing import ClassVar, Final

import orjson

from . import exchange

#: OpenAI's error type for each status we answer ourselves.
_OPENAI_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    501: "invalid_request_error",
    503: "server_overloaded",
}


def error_body(endpoint: str, status: int, message: str) -> bytes:
    """An error of ours in the route's error shape (``endpoint``: the route template or the
    request's path; ``/v1/...`` gets OpenAI's shape)."""
    if endpoint.startswith("/v1/"):
        kind = _OPENAI_TYPES.get(status, "api_error")
        error = {"message": message, "type": kind, "param": None, "code": None}
        return orjson.dumps({"error": error})
    return orjson.dumps({"error": message})


class UpstreamError(Exception):
    status: ClassVar[int] = 502
    #: Value of the ``reason`` label of request_errors_total.
    reason: ClassVar[str] = exchange.UPSTREAM_UNREACHABLE

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        #: For the log only: may name the upstream and quote what it sent.
        self.detail = detail or message


class UpstreamUnavailable(UpstreamError):
    pass


class UpstreamClosed(UpstreamError):
    reason = exchange.UPSTREAM_CLOSED


class UpstreamTimeout(UpstreamError):
    status = 504
    reason = exchange.UPSTREAM_TIMEOUT

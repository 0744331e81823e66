"""The failures ollama-meter reports itself, each with the HTTP status it maps to.

    UpstreamError            the upstream leg failed before a response began; not the client's
    ├── UpstreamUnavailable  502: connection refused, host unresolvable, network unreachable
    ├── UpstreamClosed       502: connected, but closed or reset before a valid response
    └── UpstreamTimeout      504: no connection, or no response, within the configured time

An upstream 4xx/5xx is not an error of ours: it passes through byte for byte. proxy.py turns
aiohttp client exceptions into these types once, at the edge, and renders them in Ollama's
error shape, ``{"error": "..."}``, so Ollama's clients raise their usual error with our text.
"""

from __future__ import annotations

from typing import ClassVar

from . import exchange


class UpstreamError(Exception):
    status: ClassVar[int] = 502
    #: Value of the ``reason`` label of request_errors_total.
    reason: ClassVar[str] = exchange.UPSTREAM_UNREACHABLE


class UpstreamUnavailable(UpstreamError):
    pass


class UpstreamClosed(UpstreamError):
    reason = exchange.UPSTREAM_CLOSED


class UpstreamTimeout(UpstreamError):
    status = 504
    reason = exchange.UPSTREAM_TIMEOUT

"""The Ollama backend as a whole: its health and what it holds, asked at scrape time.

The proxy path never comes here. This module asks the upstream three questions, each with a
short timeout so that a slow Ollama can neither fail nor stall a Prometheus scrape:
``/api/version`` (is it up), ``/api/ps`` (which models are loaded) and ``/api/tags`` (which
model names exist, so that their labels are always allowed). Scrapes share one probe: those
that come while a probe is under way wait for it, and an answer younger than ``MAX_AGE`` is
reused, so however many scrapers there are, Ollama is asked at most once a second.

It must not know about metrics or labels: it returns a plain ``UpstreamState``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import aiohttp
from yarl import URL

from .ollama import LoadedModel, parse_ps, parse_tags, parse_version

log = logging.getLogger(__name__)

# Errors that mean "no answer" for a probe. A probe never raises.
_PROBE_ERRORS: Final = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
#: Seconds an upstream state is reused for.
MAX_AGE: Final = 1.0


@dataclass(frozen=True, slots=True)
class UpstreamState:
    up: bool
    loaded: list[LoadedModel]
    #: Model names from /api/tags; None when that call failed (keep the previous list).
    tags: list[str] | None
    #: What /api/version said (None: no answer, or none in it).
    version: str | None = None


class Upstream:
    """Health and inventory probes against one Ollama server."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base: URL,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._base = str(base).rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._probe: asyncio.Future[UpstreamState] | None = None
        self._last: UpstreamState | None = None
        self._last_at = 0.0

    async def _get(self, path: str) -> bytes | None:
        """Body of a 2xx answer to GET path, or None."""
        try:
            async with self._session.get(
                URL(self._base + path, encoded=True), timeout=self._timeout
            ) as response:
                if not 200 <= response.status < 300:
                    return None
                return await response.read()
        except _PROBE_ERRORS as exc:
            log.debug("probe %s failed: %r", path, exc)
            return None

    async def is_up(self) -> bool:
        return await self._get("/api/version") is not None

    async def tags(self) -> list[str] | None:
        body = await self._get("/api/tags")
        return None if body is None else parse_tags(body)

    async def state(self) -> UpstreamState:
        """The upstream's state: fresh, shared with a probe under way, or under MAX_AGE old."""
        if self._last is not None and self._clock() - self._last_at < MAX_AGE:
            return self._last
        if self._probe is None:
            self._probe = asyncio.ensure_future(self._ask())
            self._probe.add_done_callback(self._remember)
        # A scrape that gives up must not cancel the probe the others wait for.
        return await asyncio.shield(self._probe)

    async def latest(self) -> tuple[UpstreamState, float]:
        """The last state and its age in seconds, without waiting on Ollama once there is
        one (the status page): an older one starts a probe for the next reader."""
        if self._last is None:
            return await self.state(), 0.0
        age = self._clock() - self._last_at
        if age >= MAX_AGE and self._probe is None:
            self._probe = asyncio.ensure_future(self._ask())
            self._probe.add_done_callback(self._remember)
        return self._last, age

    def _remember(self, probe: asyncio.Future[UpstreamState]) -> None:
        self._probe = None
        if not probe.cancelled() and probe.exception() is None:
            self._last, self._last_at = probe.result(), self._clock()

    async def _ask(self) -> UpstreamState:
        version, ps, tags = await asyncio.gather(
            self._get("/api/version"), self._get("/api/ps"), self._get("/api/tags")
        )
        loaded = parse_ps(ps) if ps is not None else None
        return UpstreamState(
            up=version is not None,
            loaded=loaded or [],
            tags=None if tags is None else parse_tags(tags),
            version=parse_version(version),
        )

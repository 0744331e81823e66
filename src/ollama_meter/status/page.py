"""The status page's handlers: ``/-/status`` (the page), ``/-/status/NAME`` (its script, style
sheet and vendored chart library, package data read once at start) and ``/-/status.json``.

Rules:
1. status.json never waits on Ollama or on the ledger's store: the fleet poller's snapshot,
   or with one upstream the core's last probe (a probe older than a second is started for
   the next reader; only the very first reader waits for one), and the ledger's totals for
   today as last read, refreshed in the background at most every ``TODAY_EVERY`` seconds.
2. The static files hold no data and need no key; they are sent with a content security
   policy that allows nothing from elsewhere, so a model name that slipped into markup could
   still run nothing.
3. Who may read status.json (an admin key with access control on) and the Host rule are
   app.py's, as for the proxy's other endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import orjson
from aiohttp import hdrs, web

from ..gateway.admission import Admission
from ..gateway.fleet import Fleet
from ..gateway.ledger_report import summarise
from ..gateway.ledger_writer import LedgerWriter
from ..gateway.router import model_key
from ..metrics import Metrics
from ..responses import OwnResponse
from ..upstreams import Upstream
from .recorder import Recorder
from .snapshot import Meter, Queue, Single, Today, build, fleet_upstreams, single_upstream

TODAY_EVERY: Final = 30.0
_DAY: Final = 86400
#: The largest static file read (the chart library is ~50 KB).
_MAX_STATIC: Final = 1024 * 1024
_JSON: Final = "application/json"
_SECURITY: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def static_files() -> dict[str, tuple[bytes, str]]:
    """The page's files by name, with their content type (read once, at start)."""
    found: dict[str, tuple[bytes, str]] = {}
    folder = resources.files(__package__).joinpath("static")
    if not folder.is_dir():
        return found
    for entry in folder.iterdir():
        if entry.is_file() and not entry.name.startswith("."):
            data = entry.read_bytes()[:_MAX_STATIC]
            kind = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
            if kind.startswith("text/") or kind.endswith("javascript"):
                kind += "; charset=utf-8"
            found[entry.name] = (data, kind)
    return found


@dataclass
class _TodayCache:
    value: Today | None = None
    read_at: float = float("-inf")
    task: asyncio.Task[None] | None = None


class StatusPage:
    def __init__(
        self,
        meter: Meter,
        recorder: Recorder,
        metrics: Metrics,
        fleet: Fleet | None,
        admission: Admission[Any] | None,
        ledger: LedgerWriter | None,
        upstream: Callable[[], Upstream],
        upstream_url: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.meter = meter
        self.recorder = recorder
        self._metrics = metrics
        self._fleet = fleet
        self._admission = admission
        self._ledger = ledger
        self._upstream = upstream
        self._upstream_url = upstream_url
        self._clock = clock
        self._files = static_files()
        self._today = _TodayCache()

    # --- the data -------------------------------------------------------------------------

    def queue(self) -> Queue:
        admission = self._admission
        if admission is None:
            return Queue(0, None, None, {}, {}, {})
        in_use: dict[tuple[str, str], int] = {}
        in_use_by: dict[str, int] = {}
        for upstream, model, count in admission.slots_in_use():
            if count:
                where = (upstream, model_key(model))
                in_use[where] = in_use.get(where, 0) + count
                in_use_by[upstream] = in_use_by.get(upstream, 0) + count
        return Queue(
            admission.depth,
            admission.max_queue,
            admission.max_queue_wait,
            dict(admission.slots),
            in_use,
            in_use_by,
        )

    async def data(self) -> dict[str, Any]:
        queue = self.queue()
        if self._fleet is not None:
            now = self._clock()
            upstreams = fleet_upstreams(self._fleet.nodes, queue, now)
        else:
            state, age = await self._upstream().latest()
            now = self._clock()
            in_flight: dict[str, int] = {}
            for model, count in self._metrics.in_flight_by_model().items():
                key = model_key(model)
                in_flight[key] = in_flight.get(key, 0) + count
            single = Single(
                self._upstream_url,
                state.up,
                state.version,
                state.loaded,
                in_flight,
                now - age,
            )
            upstreams = single_upstream(single, queue, now)
        return build(self.meter, self.recorder, upstreams, queue, self._today_totals(now), now)

    def _today_totals(self, now: float) -> Today | None:
        ledger = self._ledger
        if ledger is None:
            return None
        since = int(now) // _DAY * _DAY
        cache = self._today
        fresh = cache.value is not None and cache.value.since == since
        if (not fresh or now - cache.read_at >= TODAY_EVERY) and cache.task is None:
            cache.task = asyncio.get_running_loop().create_task(self._read_today(ledger, since))
        if not fresh:
            return Today(float(since), None, [])
        return cache.value

    async def read_today(self) -> None:
        """Read today's totals from the ledger now (the background read, awaited)."""
        if self._ledger is not None:
            await self._read_today(self._ledger, int(self._clock()) // _DAY * _DAY, False)

    async def _read_today(self, ledger: LedgerWriter, since: int, background: bool = True) -> None:
        cache = self._today
        try:

            def make(rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
                report = summarise(rows, since, since + _DAY, ("key",))
                items = [
                    {
                        "key": row["key"],
                        "requests": row["requests"],
                        "prompt_tokens": row["prompt_tokens"],
                        "completion_tokens": row["completion_tokens"],
                    }
                    for row in report.rows
                ]
                items.sort(key=lambda i: (-(i["prompt_tokens"] + i["completion_tokens"]), i["key"]))
                return items

            with contextlib.suppress(Exception):  # a store down: keep the last answer
                items = await ledger.report(since, since + _DAY, None, make)
                read_at = self._clock()
                cache.value = Today(float(since), read_at, items)
                cache.read_at = read_at
        finally:
            if background:
                cache.task = None

    async def close(self) -> None:
        task = self._today.task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- handlers -------------------------------------------------------------------------

    async def status_json(self, request: web.Request) -> web.StreamResponse:
        body = orjson.dumps(await self.data())
        return OwnResponse(
            body=body, headers={hdrs.CONTENT_TYPE: _JSON, hdrs.CACHE_CONTROL: "no-store"}
        )

    async def page(self, request: web.Request) -> web.StreamResponse:
        return self._file("index.html")

    async def asset(self, request: web.Request) -> web.StreamResponse:
        return self._file(request.match_info["name"])

    def _file(self, name: str) -> web.StreamResponse:
        found = self._files.get(name)
        if found is None:
            return OwnResponse(status=404, text="404 page not found")
        data, kind = found
        return OwnResponse(body=data, headers={hdrs.CONTENT_TYPE: kind, **_SECURITY})

"""The usage ledger wired into the application: its rollup fed by the record step, its writer
running for the app's lifetime, and the report served at ``GET /-/usage``.

Without a ``[ledger]`` table none of this is built: no file, no thread, no metric.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry

from .errors import error_body
from .gateway.ledger import HOUR, Rollup
from .gateway.ledger_metrics import LedgerMetrics
from .gateway.ledger_report import (
    DEFAULT_BY,
    ReportError,
    as_csv,
    as_json,
    month_start,
    parse_by,
    parse_time,
    summarise,
)
from .gateway.ledger_store import SqliteStore, StoreDown, open_store
from .gateway.ledger_writer import LedgerWriter
from .ledger_settings import LedgerSettings
from .responses import OwnResponse

LEDGER: Final = web.AppKey("ledger", LedgerWriter)
_JSON: Final = "application/json; charset=utf-8"
_CSV: Final = "text/csv; charset=utf-8"


def start_ledger(
    app: web.Application, settings: LedgerSettings, registry: CollectorRegistry, fleet: bool
) -> LedgerWriter:
    """The rollup and its writer (a cleanup context). A SQLite file is opened now, so that a
    missing directory or a corrupt file refuses the start (LedgerError)."""
    store = open_store(settings.path, settings.url)
    if isinstance(store, SqliteStore):
        store.open()
    writer = LedgerWriter(
        Rollup(settings.max_pending_rows, fleet=fleet),
        store,
        settings.replica or socket.gethostname(),
        settings.flush_interval,
        settings.keep,
    )
    registry.register(LedgerMetrics(writer))
    app[LEDGER] = writer

    async def running(app: web.Application) -> AsyncIterator[None]:
        await writer.start()
        task = asyncio.get_running_loop().create_task(writer.run())
        try:
            yield
        finally:
            # After the requests in flight were recorded (aiohttp runs cleanup contexts
            # after its handlers finished): the last rows are written here.
            await writer.close()
            await task

    app.cleanup_ctx.append(running)
    return writer


def _refused(request: web.Request, status: int, message: str) -> web.StreamResponse:
    return OwnResponse(
        status=status,
        body=error_body(request.path, status, message),
        headers={aiohttp.hdrs.CONTENT_TYPE: _JSON},
    )


def usage_handler(writer: LedgerWriter, allowed: bool) -> Handler:
    """``GET /-/usage?since=&until=&by=&key=&format=json|csv``: the report of the stored rows
    (rows still in memory appear after the next flush). ``allowed`` False: a listener that is
    not loopback without access control, which gets a 403."""

    async def usage(request: web.Request) -> web.StreamResponse:
        if not allowed:
            return _refused(
                request,
                403,
                "ollama-meter: /-/usage is served on a loopback listener, or to admin keys "
                "with access control on",
            )
        query = request.query
        now = time.time()
        try:
            since = parse_time(query["since"], "since", now) if "since" in query else None
            until = parse_time(query["until"], "until", now) if "until" in query else None
            by = parse_by(query["by"]) if "by" in query else DEFAULT_BY
            fmt = query.get("format", "json")
            if fmt not in ("json", "csv"):
                raise ReportError(f"format: must be json or csv, got {fmt[:20]!r}")
        except ReportError as exc:
            return _refused(request, 400, f"ollama-meter: {exc}")
        since = month_start(now) if since is None else since
        until = int(now) // HOUR * HOUR + HOUR if until is None else until
        try:
            rows = await writer.report_rows(since, until, query.get("key"))
        except StoreDown as exc:
            return _refused(request, 503, f"ollama-meter: the ledger's store: {exc}")
        report = summarise(rows, since, until, by)
        if fmt == "csv":
            return OwnResponse(
                body=as_csv(report).encode(), headers={aiohttp.hdrs.CONTENT_TYPE: _CSV}
            )
        return OwnResponse(body=as_json(report), headers={aiohttp.hdrs.CONTENT_TYPE: _JSON})

    return usage

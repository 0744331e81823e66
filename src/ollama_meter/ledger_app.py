"""The usage ledger wired into the application: its rollup fed by the record step, its writer
running for the app's lifetime, and the report served at ``GET /-/usage``.

Without a ``[ledger]`` table none of this is built: no file, no thread, no metric.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

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
    check_span,
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
_PARAMETERS: Final = ("since", "until", "by", "key", "format")


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


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def usage_handler(
    writer: LedgerWriter,
    allowed: bool,
    client_of: Callable[[web.BaseRequest], str | None] | None = None,
) -> Handler:
    """``GET /-/usage?since=&until=&by=&key=&format=json|csv``: the report of the stored rows
    (rows still in memory appear after the next flush). ``allowed`` False: a listener that is
    not loopback without access control, which gets a 403. ``client_of`` (without access
    control): the client's address, which must be a loopback one (a reverse proxy on this
    machine forwards others' requests)."""

    async def usage(request: web.Request) -> web.StreamResponse:
        if not allowed or (client_of is not None and not _is_loopback(client_of(request))):
            return _refused(
                request,
                403,
                "ollama-meter: /-/usage is served on a loopback listener, or to admin keys "
                "with access control on",
            )
        query = request.query
        now = time.time()
        try:
            for name in query:
                if name not in _PARAMETERS:
                    raise ReportError(
                        f"{name[:40]!r} is not a parameter (one of {', '.join(_PARAMETERS)})"
                    )
                if len(query.getall(name)) > 1:
                    raise ReportError(f"{name}: given more than once")
            since = parse_time(query["since"], "since", now) if "since" in query else None
            until = parse_time(query["until"], "until", now) if "until" in query else None
            by = parse_by(query["by"]) if "by" in query else DEFAULT_BY
            fmt = query.get("format", "json")
            if fmt not in ("json", "csv"):
                raise ReportError(f"format: must be json or csv, got {fmt[:20]!r}")
            since = month_start(now) if since is None else since
            until = int(now) // HOUR * HOUR + HOUR if until is None else until
            check_span(since, until, ("since", "until"))
        except ReportError as exc:
            return _refused(request, 400, f"ollama-meter: {exc}")

        def make(rows: list[tuple[Any, ...]]) -> bytes:
            report = summarise(rows, since, until, by)
            return as_csv(report).encode() if fmt == "csv" else as_json(report)

        try:
            body = await writer.report(since, until, query.get("key"), make)
        except StoreDown as exc:
            return _refused(request, 503, f"ollama-meter: the ledger's store: {exc}")
        return OwnResponse(
            body=body, headers={aiohttp.hdrs.CONTENT_TYPE: _CSV if fmt == "csv" else _JSON}
        )

    return usage

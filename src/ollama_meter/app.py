"""``create_app``: the production web.Application, built from a Config and a registry.

Wiring only. Routes: ``/metrics`` (unless it has its own listener), ``/-/healthy``,
``/-/ready``, and everything else, every method, to the proxy. Things with a lifetime (the
upstream ClientSession, the optional metrics listener) are cleanup contexts, set up in order and
torn down in reverse, and only if their setup finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry

from . import __version__
from .client_warmup import warm_up
from .config import Config, is_loopback_listener
from .errors import error_body
from .gateway.access import Access
from .gateway.admission import Admission
from .gateway.audit import AuditLog
from .gateway.dispatch import Dispatch
from .gateway.fleet import Fleet
from .gateway.fleet_metrics import FleetMetrics
from .gateway.identity import KeyRing
from .gateway.keys import Role
from .gateway.limit_metrics import LimitMetrics, anonymous_label
from .gateway.limits import Limiter, WindowStore
from .gateway.queueing import gated_slots, queue_bounds, where_of
from .gateway.reload import KeysFile
from .gateway.shared_windows import SharedWindows
from .gateway.usage import KeyUsage
from .gateway.windows import MemoryWindows
from .hosts import HostCheck, host_check_for
from .inbound import Refusal, target_of
from .labels import ModelLabels
from .ledger_app import start_ledger, usage_handler
from .limit_settings import LimitSettings
from .logs import AccessLog
from .metrics import Metrics, exposition_handler
from .proxy import JSON_ERROR, SESSION, Proxy
from .responses import OwnResponse, own_route
from .settings import AccessSettings, Listener, Settings
from .status.config_view import config_view
from .status.page import StatusPage
from .status.recorder import Recorder
from .status.snapshot import Meter as StatusMeter
from .upstreams import Upstream

log = logging.getLogger(__name__)

METRICS: Final = web.AppKey("metrics", Metrics)
PROXY: Final = web.AppKey("proxy", Proxy)
#: Whether Ollama answered /api/tags at start-up (cli.py warns once listening if not).
UPSTREAM_ANSWERED: Final = web.AppKey("upstream_answered", bool)
ACCESS_LOG: Final = web.AppKey("access_log", AccessLog)
UPSTREAM: Final = web.AppKey("upstream", Upstream)
#: The runner of the --metrics-listen listener (its ``addresses`` say where it listens).
METRICS_RUNNER: Final = web.AppKey("metrics_runner", web.AppRunner)
#: With access control on: the keys file, the access step, and the runners of role listeners.
KEYS_FILE: Final = web.AppKey("keys_file", KeysFile)
ACCESS: Final = web.AppKey("access", Access)
#: In fleet mode ([[upstream]] tables): the upstreams and their poller.
FLEET: Final = web.AppKey("fleet", Fleet)
LIMITER: Final = web.AppKey("limiter", Limiter)
ADMISSION: Final = web.AppKey("admission", Admission[Any])
LISTENER_RUNNERS: Final = web.AppKey("listener_runners", list[web.AppRunner])
#: The status page (unless --no-status-page).
STATUS_PAGE: Final = web.AppKey("status_page", StatusPage)

# The session adds none of its default headers: what the client sent is what Ollama gets.
NO_AUTO_HEADERS: Final = (
    aiohttp.hdrs.ACCEPT,
    aiohttp.hdrs.ACCEPT_ENCODING,
    aiohttp.hdrs.USER_AGENT,
    aiohttp.hdrs.CONTENT_TYPE,
)

# What the server side accepts. Request bodies pass as the client encoded them (aiohttp would
# inflate gzip and deflate bodies itself). Request heads are bounded in total, as Ollama's Go
# server bounds them (1 MB): a request line, then at most 64 header fields of at most 16 KiB
# each (name and value), about 1 MiB in all.
# After an answer given before its request body was read (a refusal, an existing blob), the
# rest of the body is read and dropped for at most lingering_time (aiohttp: 10 s) so that the
# client sees the answer: a stalled client must not hold its connection that long.
HANDLER_ARGS: Final = {
    "auto_decompress": False,
    "max_line_size": 16 * 1024,
    "max_field_size": 16 * 1024,
    "max_headers": 64,
    "lingering_time": 2.0,
}


def create_app(
    config: Config, registry: CollectorRegistry, settings: Settings | None = None
) -> web.Application:
    """The application. Raises KeysFileError when access control is on and its keys file
    does not load."""
    app = web.Application(handler_args=HANDLER_ARGS)
    metrics = Metrics(__version__)
    labels = ModelLabels(config.max_models)
    access_log = AccessLog(config.log_format) if config.access_log else None
    settings = settings or Settings()
    access = None
    if settings.access is not None:
        access = _access_control(app, settings.access, registry)
    fleet = None
    dispatch = None
    if settings.upstreams:
        fleet = app[FLEET] = Fleet(settings.upstreams, config.probe_timeout)
        dispatch = Dispatch(fleet, settings.routing)
        metrics.upstream_families = False  # per upstream, from the poller (fleet_metrics.py)
        registry.register(FleetMetrics(fleet))
    limiter = None
    limit_metrics = None
    if settings.limits is not None:
        limiter, limit_metrics = _limits(app, settings.limits, registry, access)
    admission = None
    slots = gated_slots(settings)
    if slots:
        if limit_metrics is None:
            limit_metrics = LimitMetrics(registry, _key_label(access), redis=False)
        admission = Admission(
            slots,
            where_of(dispatch),
            *queue_bounds(settings.limits or LimitSettings()),
            clock=time.monotonic,
            refused=limit_metrics.refused,
        )
        limit_metrics.watch(admission)
        app[ADMISSION] = admission
    ledger = None
    if settings.ledger is not None:
        ledger = start_ledger(app, settings.ledger, registry, fleet is not None)
    recorder = Recorder(_key_label(access), time.time, access is not None)
    proxy = Proxy(
        config,
        metrics,
        labels,
        access_log,
        access,
        dispatch,
        limiter,
        admission,
        limit_metrics,
        ledger=None if ledger is None else ledger.rollup.add,
        status=recorder.record if config.status_page else None,
    )
    app[METRICS] = metrics
    app[PROXY] = proxy
    if access_log is not None:
        app[ACCESS_LOG] = access_log

    async def upstream_session(app: web.Application) -> AsyncIterator[None]:
        warm_up()  # before the first request of any kind (client_warmup.py says why)
        session = aiohttp.ClientSession(
            # No total timeout: a stream can legitimately last many minutes, and headers wait
            # for the first token (queue + model load + prompt). Silence is what is bounded.
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=config.connect_timeout, sock_read=config.read_timeout
            ),
            # No pool limit: Ollama queues requests itself (OLLAMA_MAX_QUEUE).
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            skip_auto_headers=NO_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),  # never share one client's cookies with another
        )
        app[SESSION] = session
        upstream = app[UPSTREAM] = Upstream(session, config.upstream, config.probe_timeout)
        poller: asyncio.Task[None] | None = None
        try:
            if fleet is None:
                names = await upstream.tags()
                if names is not None:
                    labels.set_known(names)
                app[UPSTREAM_ANSWERED] = names is not None
            else:
                # The fleet is known before the listener opens (the first poll), then kept
                # current in the background.
                await fleet.start(session)
                labels.set_known(fleet.tag_names())
                app[UPSTREAM_ANSWERED] = any(node.answered for node in fleet.nodes)
                poller = asyncio.get_running_loop().create_task(fleet.run(session))
            yield
        finally:
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            if fleet is not None:
                await fleet.settle()
            await session.close()

    app.cleanup_ctx.append(upstream_session)

    deadline: list[asyncio.TimerHandle] = []
    draining = [0, 0]  # requests in flight when shutdown began, and how many were cut

    async def on_shutdown(app: web.Application) -> None:
        # New connections are refused from here on; requests in flight get shutdown_timeout
        # seconds to finish, then are cut (and counted with reason "shutdown").
        proxy.shutting_down = True
        draining[0] = proxy.in_flight
        if draining[0]:
            log.info(
                "shutting down: %d requests in flight get %gs to finish",
                draining[0],
                config.shutdown_timeout,
            )
        loop = asyncio.get_running_loop()
        deadline.append(loop.call_later(config.shutdown_timeout, cut_off))

    def cut_off() -> None:
        draining[1] = proxy.cut_off()
        if draining[1]:
            log.warning("shutdown deadline: cutting %d requests still in flight", draining[1])

    async def on_cleanup(app: web.Application) -> None:
        for handle in deadline:
            handle.cancel()
        if access_log is not None:
            access_log.flush()
        in_flight, cut = draining
        if in_flight:
            log.info(
                "stopped: %d requests finished during shutdown, %d cut",
                max(in_flight - cut, 0),
                cut,
            )

    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)

    async def serve_metrics(request: web.Request) -> web.StreamResponse:
        if fleet is not None:  # the poller's snapshot: a scrape never waits on the fleet
            labels.set_known(fleet.tag_names())
            return await expose(request)
        # Ask Ollama now (or share a probe not a second old), so the scrape shows the state at
        # scrape time; never fails.
        state = await app[UPSTREAM].state()
        if state.tags is not None:
            labels.set_known(state.tags)
        metrics.set_upstream(state.up, state.loaded)
        response: web.StreamResponse = await expose(request)
        return response

    expose = exposition_handler(metrics, registry)
    page = None
    if config.status_page:
        metrics_at = config.metrics_listen
        page = StatusPage(
            StatusMeter(
                __version__,
                time.time(),
                "fleet" if fleet is not None else "core",
                access is not None,
                limiter is not None,
                ledger is not None,
                "/metrics"
                if metrics_at is None
                else f"http://{metrics_at.host}:{metrics_at.port}/metrics",
                config_view(config, settings),
            ),
            recorder,
            metrics,
            fleet,
            admission,
            ledger,
            lambda: app[UPSTREAM],
            str(config.upstream.with_user(None)),
        )
        app[STATUS_PAGE] = page
        _status_routes(app, page, access, proxy.host_check)
    if config.metrics_listen is None:
        scrape = serve_metrics if access is None else _keyed(access, serve_metrics)
        own_route(app, "/metrics", _host_checked(proxy.host_check, scrape))
    else:
        app.cleanup_ctx.append(_metrics_listener(config, serve_metrics, page, access))

    async def healthy(request: web.Request) -> web.StreamResponse:
        return OwnResponse(text="ollama-meter is healthy.\n")

    async def ready(request: web.Request) -> web.StreamResponse:
        up = any(fleet.healthy()) if fleet is not None else await app[UPSTREAM].is_up()
        if up:
            return OwnResponse(text="ollama-meter is ready.\n")
        return OwnResponse(status=503, text="upstream is not answering.\n")

    if fleet is not None:

        async def fleet_status(request: web.Request) -> web.StreamResponse:
            return OwnResponse(
                body=orjson.dumps(fleet.status()),
                headers={aiohttp.hdrs.CONTENT_TYPE: JSON_ERROR},
            )

        # Upstream addresses and their errors: an admin's (with keys on).
        status = fleet_status if access is None else _keyed(access, fleet_status, "admin")
        own_route(app, "/-/fleet", _host_checked(proxy.host_check, status))

    if ledger is not None:
        # Who used what: an admin's (with keys on); else only on a loopback listener.
        # Without keys, a loopback client only: behind a trusted reverse proxy on this
        # machine, the client it forwards for (X-Forwarded-For), not the proxy itself.
        report = usage_handler(
            ledger,
            access is not None or is_loopback_listener(config.listen),
            None if access is not None else proxy.client_of,
        )
        report = report if access is None else _keyed(access, report, "admin")
        own_route(app, "/-/usage", _host_checked(proxy.host_check, report))

    # /-/healthy answers any Host: probes (Docker, Kubernetes) use whatever address they have.
    own_route(app, "/-/healthy", healthy)
    own_route(app, "/-/ready", _host_checked(proxy.host_check, ready))
    app.router.add_route("*", "/{tail:.*}", proxy.handle, expect_handler=proxy.expect)
    if settings.access is not None:
        for listener in settings.access.listeners:
            app.cleanup_ctx.append(_role_listener(config, listener, proxy))
    return app


def _limits(
    app: web.Application,
    settings: LimitSettings,
    registry: CollectorRegistry,
    access: Access | None,
) -> tuple[Limiter, LimitMetrics]:
    """Per-key limits over windows in memory, or in Redis for a fleet of proxies."""
    metrics = LimitMetrics(registry, _key_label(access), redis=settings.redis is not None)
    windows: WindowStore
    shared = None
    if settings.redis is not None:
        windows = shared = SharedWindows(
            settings.redis, settings.replicas, on_change=metrics.redis_changed
        )
    else:
        windows = MemoryWindows()
    limiter = Limiter(windows, settings.defaults, metrics.refused)
    app[LIMITER] = limiter

    async def running(app: web.Application) -> AsyncIterator[None]:
        if shared is not None:
            await shared.start()
        try:
            yield
        finally:
            await limiter.settle()
            if shared is not None:
                await shared.close()

    app.cleanup_ctx.append(running)
    return limiter, metrics


def _key_label(access: Access | None) -> Callable[[str | None], str]:
    if access is None:
        return anonymous_label
    usage = access.usage
    return lambda name: usage.label(name, None)[0]


def _access_control(
    app: web.Application, settings: AccessSettings, registry: CollectorRegistry
) -> Access:
    """Keys (loaded now, then reloaded while the app runs), per-key usage and the audit log."""
    usage = KeyUsage(registry, settings.max_key_labels)
    audit = None
    if settings.audit_log is not None:
        audit = AuditLog(settings.audit_log, usage.audit_errors.inc)

    def loaded(ring: KeyRing, ok: bool) -> None:
        access.ring = ring
        usage.keys_configured.set(len(ring))
        usage.in_force({e.name for e in ring.entries}, {e.team for e in ring.entries if e.team})
        usage.reloads.labels("ok" if ok else "error").inc()
        usage.last_reload_ok.set(1 if ok else 0)

    keys = KeysFile(settings.keys_file, loaded)
    ring = keys.load()
    usage.keys_configured.set(len(ring))
    access = Access(
        ring,
        usage,
        anonymous=settings.anonymous,
        max_keep_alive=settings.max_keep_alive,
        audit=audit,
    )
    app[KEYS_FILE] = keys
    app[ACCESS] = access

    async def running(app: web.Application) -> AsyncIterator[None]:
        if audit is not None:
            audit.start()
        try:
            async with keys.watching():
                yield
        finally:
            if audit is not None:
                await asyncio.to_thread(audit.close)

    app.cleanup_ctx.append(running)
    return access


def _role_listener(
    config: Config, listener: Listener, proxy: Proxy
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A listener whose requests all have the listener's role (``[[access.listener]]``)."""

    async def serve(app: web.Application) -> AsyncIterator[None]:
        role_app = web.Application(handler_args=HANDLER_ARGS)
        role_app[SESSION] = app[SESSION]
        role_app.router.add_route(
            "*", "/{tail:.*}", proxy.handler_for(listener.role, listener.listen)
        )
        runner = web.AppRunner(
            role_app,
            access_log=None,
            handler_cancellation=True,
            keepalive_timeout=config.keepalive_timeout,
        )
        await runner.setup()
        app.setdefault(LISTENER_RUNNERS, []).append(runner)
        try:
            await web.TCPSite(runner, listener.listen.host, listener.listen.port).start()
            yield
        finally:
            await runner.cleanup()

    return serve


def _keyed(access: Access, handler: Handler, role: Role | None = None) -> Handler:
    """An endpoint of ours that needs a working API key (access.check_scraper)."""

    async def keyed(request: web.Request) -> web.StreamResponse:
        refusal = access.check_scraper(request.headers, role, request.path)
        if refusal is None:
            return await handler(request)
        return OwnResponse(
            status=refusal.status,
            body=error_body(request.path, refusal.status, refusal.message or ""),
            headers={aiohttp.hdrs.CONTENT_TYPE: JSON_ERROR, **(refusal.headers or {})},
        )

    return keyed


def _host_checked(check: HostCheck | None, handler: Handler) -> Handler:
    """One of our own endpoints, behind the same Host rule as the proxied routes."""
    if check is None:
        return handler

    async def checked(request: web.Request) -> web.StreamResponse:
        try:
            _, host = target_of(request)
        except Refusal as refusal:
            return OwnResponse(status=refusal.status, text=refusal.message)
        if not check.allows(host):
            return OwnResponse(status=403)
        return await handler(request)

    return checked


def _status_routes(
    app: web.Application, page: StatusPage, access: Access | None, check: HostCheck | None
) -> None:
    """/-/status, its files, and /-/status.json (an admin's, with keys on)."""
    data = page.status_json if access is None else _keyed(access, page.status_json, "admin")
    own_route(app, "/-/status.json", _host_checked(check, data))
    own_route(app, "/-/status", _host_checked(check, page.page))
    own_route(app, "/-/status/{name}", _host_checked(check, page.asset))

    async def closing(app: web.Application) -> None:
        await page.close()

    app.on_cleanup.append(closing)


def _metrics_listener(
    config: Config, handler: Handler, page: StatusPage | None, access: Access | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A second listener for --metrics-listen: /metrics, and the status page when it is on."""
    where = config.metrics_listen
    assert where is not None

    async def listener(app: web.Application) -> AsyncIterator[None]:
        metrics_app = web.Application(handler_args=HANDLER_ARGS)
        check = host_check_for(config, where)
        own_route(metrics_app, "/metrics", _host_checked(check, handler))
        if page is not None:
            _status_routes(metrics_app, page, access, check)
        runner = web.AppRunner(metrics_app, access_log=None, handler_cancellation=True)
        await runner.setup()
        app[METRICS_RUNNER] = runner
        try:
            await web.TCPSite(runner, where.host, where.port).start()
            yield
        finally:
            await runner.cleanup()

    return listener

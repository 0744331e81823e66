"""``create_app``: the production web.Application, built from a Config and a registry.

Wiring only. Routes: ``/metrics`` (unless it has its own listener), ``/-/healthy``,
``/-/ready``, and everything else, every method, to the proxy. Things with a lifetime (the
upstream ClientSession, the optional metrics listener) are cleanup contexts, set up in order and
torn down in reverse, and only if their setup finished.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Final

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry

from . import __version__
from .config import Config
from .labels import ModelLabels
from .logs import AccessLog
from .metrics import Metrics, exposition_handler
from .proxy import SESSION, Proxy
from .upstreams import Upstream

METRICS: Final = web.AppKey("metrics", Metrics)
ACCESS_LOG: Final = web.AppKey("access_log", AccessLog)
UPSTREAM: Final = web.AppKey("upstream", Upstream)
#: The runner of the --metrics-listen listener (its ``addresses`` say where it listens).
METRICS_RUNNER: Final = web.AppKey("metrics_runner", web.AppRunner)

# The session adds none of its default headers: what the client sent is what Ollama gets.
NO_AUTO_HEADERS: Final = (
    aiohttp.hdrs.ACCEPT,
    aiohttp.hdrs.ACCEPT_ENCODING,
    aiohttp.hdrs.USER_AGENT,
    aiohttp.hdrs.CONTENT_TYPE,
)

# Ollama (Go net/http) takes up to 1 MB of headers; aiohttp's default field limit is 8 KiB.
HANDLER_ARGS: Final = {"max_field_size": 64 * 1024, "max_line_size": 64 * 1024}


def create_app(config: Config, registry: CollectorRegistry) -> web.Application:
    app = web.Application(handler_args=HANDLER_ARGS)
    metrics = Metrics(__version__)
    labels = ModelLabels(config.max_models)
    access_log = AccessLog(config.log_format) if config.access_log else None
    proxy = Proxy(config, metrics, labels, access_log)
    app[METRICS] = metrics
    if access_log is not None:
        app[ACCESS_LOG] = access_log

    async def upstream_session(app: web.Application) -> AsyncIterator[None]:
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
        names = await upstream.tags()
        if names is not None:
            labels.set_known(names)
        yield
        await session.close()

    app.cleanup_ctx.append(upstream_session)

    deadline: list[asyncio.TimerHandle] = []

    async def on_shutdown(app: web.Application) -> None:
        # New connections are refused from here on; requests in flight get shutdown_timeout
        # seconds to finish, then are cut (and counted with reason "shutdown").
        proxy.shutting_down = True
        loop = asyncio.get_running_loop()
        deadline.append(loop.call_later(config.shutdown_timeout, proxy.cut_off))

    async def on_cleanup(app: web.Application) -> None:
        for handle in deadline:
            handle.cancel()
        if access_log is not None:
            access_log.flush()

    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)

    async def serve_metrics(request: web.Request) -> web.StreamResponse:
        # Ask Ollama now, so the scrape shows the state at scrape time; never fails.
        state = await app[UPSTREAM].state()
        if state.tags is not None:
            labels.set_known(state.tags)
        metrics.set_upstream(state.up, state.loaded)
        response: web.StreamResponse = await expose(request)
        return response

    expose = exposition_handler(metrics, registry)
    if config.metrics_listen is None:
        app.router.add_get("/metrics", serve_metrics)
    else:
        app.cleanup_ctx.append(_metrics_listener(config, serve_metrics))

    async def healthy(request: web.Request) -> web.StreamResponse:
        return web.Response(text="ollama-meter is healthy.\n")

    async def ready(request: web.Request) -> web.StreamResponse:
        if await app[UPSTREAM].is_up():
            return web.Response(text="ollama-meter is ready.\n")
        return web.Response(status=503, text=f"upstream {config.upstream} is not answering.\n")

    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


def _metrics_listener(
    config: Config, handler: Handler
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A second listener, serving only /metrics, for --metrics-listen."""
    where = config.metrics_listen
    assert where is not None

    async def listener(app: web.Application) -> AsyncIterator[None]:
        metrics_app = web.Application()
        metrics_app.router.add_get("/metrics", handler)
        runner = web.AppRunner(metrics_app, access_log=None, handler_cancellation=True)
        await runner.setup()
        app[METRICS_RUNNER] = runner
        try:
            await web.TCPSite(runner, where.host, where.port).start()
            yield
        finally:
            await runner.cleanup()

    return listener

"""The ``ollama-meter`` command: options and environment in, a running server out.

The only module that reads argv and the environment. Every option has an ``OLLAMA_METER_*``
variable, shown in ``--help`` with its default. ``OLLAMA_HOST`` is deliberately not read: Ollama
uses it as its own bind address and its clients as their target, so it means something else on
every machine. A refused start is one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click
from aiohttp import web
from click.core import ParameterSource

from . import __version__
from .app import ACCESS, UPSTREAM_ANSWERED, create_app
from .cli_config import Invocation, config_command, gateway_settings
from .cli_fleet import fleet_command
from .cli_keys import keys_command
from .cli_usage import usage_command
from .config import Config, ConfigError, HostCheckMode, LogFormat
from .gateway.keys import KeysFileError
from .gateway.ledger_store import LedgerError
from .logs import setup_logging
from .metrics import build_registry
from .settings import Settings

log = logging.getLogger("ollama_meter")

_MiB = 1024 * 1024
_SHUTDOWN_GRACE = 1.0
_GC_THRESHOLD = 20_000


_F = TypeVar("_F", bound=Callable[..., Any])


def _option(name: str, **kwargs: Any) -> Callable[[_F], _F]:
    """A click option with its OLLAMA_METER_* variable, both shown in --help."""
    env = "OLLAMA_METER_" + name.lstrip("-").split("/")[0].replace("-", "_").upper()
    return click.option(name, envvar=env, show_envvar=True, show_default=True, **kwargs)


@click.group(
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@_option(
    "--config",
    default=None,
    metavar="PATH",
    help="The gateway's settings file (TOML): access control, and more in later versions.",
)
@_option(
    "--keys-file",
    default=None,
    metavar="PATH",
    help="The API keys file: turns access control on (over [access] keys_file of --config).",
)
@_option(
    "--ledger",
    default=None,
    metavar="PATH|URL",
    help="The usage ledger: a SQLite file, or postgresql://... (over [ledger] of --config).",
)
@_option(
    "--listen", default="127.0.0.1:11435", metavar="HOST:PORT", help="Where the proxy listens."
)
@_option(
    "--upstream",
    default=("http://127.0.0.1:11434",),
    multiple=True,
    metavar="ADDRESS",
    help="Ollama, written as OLLAMA_HOST is: host, host:port or URL (no scheme: http, port "
    "11434). Several (the option again, or the variable's values separated by spaces): a "
    "fleet of u1, u2, ... (or [[upstream]] tables in --config).",
)
@_option(
    "--slots",
    default=None,
    type=click.IntRange(min=1),
    help="Requests Ollama runs at once per model (its OLLAMA_NUM_PARALLEL): with it, at most "
    "that many go up at once and the rest wait in the proxy's queue ([limits] in --config). "
    "Unset: not gated.",
)
@_option(
    "--metrics-listen",
    default=None,
    metavar="HOST:PORT",
    help="Serve /metrics on its own listener; the proxy port then passes /metrics to Ollama.",
)
@_option(
    "--preserve-host/--no-preserve-host",
    default=False,
    help="Send the client's Host header upstream instead of the upstream's own authority.",
)
@_option(
    "--max-inspect-bytes",
    default=64 * _MiB,
    type=click.IntRange(min=0),
    help="Largest JSON request body read whole to learn its model; larger ones stream through "
    "with model 'unknown'.",
)
@_option(
    "--max-inspect-total",
    default=256 * _MiB,
    type=click.IntRange(min=0),
    help="Request bodies held to learn their model, all requests together; past it, bodies "
    "stream through with model 'unknown'.",
)
@_option(
    "--max-response-tail",
    default=1 * _MiB,
    type=click.IntRange(min=0),
    help="How much of a stream's end is kept to read its usage; a final line longer than "
    "this reports none (usage_missing_total reason too_large).",
)
@_option(
    "--max-models",
    default=100,
    type=click.IntRange(min=0),
    help="Model label values allowed beyond those Ollama lists in /api/tags; later ones are "
    "'other'.",
)
@_option(
    "--host-check",
    default="auto",
    type=click.Choice(["auto", "on", "off"]),
    help="Apply Ollama's Host rule (against DNS rebinding): auto, on a loopback listener as "
    "Ollama does; on, on every listener (a container published on the host's loopback); off.",
)
@_option(
    "--allowed-hosts",
    default="",
    metavar="NAME,...",
    help="Host names accepted beyond Ollama's own rule (localhost, private addresses, "
    ".local, ...) where it applies; '.example.com' allows every name under it.",
)
@_option(
    "--trusted-proxies",
    default="",
    metavar="CIDR,...",
    help="Peers whose X-Forwarded-Proto/-Host/-Port are passed on; from anyone else they are "
    "replaced or removed.",
)
@_option(
    "--openai-stream-usage/--no-openai-stream-usage",
    default=False,
    help="Add stream_options.include_usage to /v1/chat/completions streams that lack it and "
    "hide the usage event from the client, so their tokens are counted. Rewrites those "
    "request bodies.",
)
@_option(
    "--connect-timeout",
    default=10.0,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds to wait for a connection to Ollama (then 504).",
)
@_option(
    "--read-timeout",
    default=600.0,
    type=click.FloatRange(min=0),
    help="Seconds of silence from Ollama before giving up, response headers included (they "
    "come with the first token, after any model load); 0 waits forever.",
)
@_option(
    "--probe-timeout",
    default=2.0,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a /metrics scrape or /-/ready waits for Ollama's answers.",
)
@_option(
    "--shutdown-timeout",
    default=30.0,
    type=click.FloatRange(min=0),
    help="On SIGTERM/SIGINT, seconds requests in flight may take to finish before they are cut.",
)
@_option(
    "--keepalive-timeout",
    default=10.0,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds an idle client connection is kept open, and a request head may take to "
    "arrive in full (a client trickling one is cut off).",
)
@_option("--log-format", default="text", type=click.Choice(["text", "json"]), help="Log format.")
@_option(
    "--log-level",
    default="info",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="Least severe log level written.",
)
@_option(
    "--access-log/--no-access-log",
    default=True,
    help="Write one log line per request (never prompt or completion text).",
)
@_option(
    "--status-page/--no-status-page",
    default=True,
    help="Serve the status page at /-/status and its data at /-/status.json.",
)
@click.version_option(__version__, prog_name="ollama-meter")
@click.pass_context
def main(
    ctx: click.Context,
    config: str | None,
    keys_file: str | None,
    ledger: str | None,
    listen: str,
    upstream: tuple[str, ...],
    slots: int | None,
    metrics_listen: str | None,
    preserve_host: bool,
    max_inspect_bytes: int,
    max_inspect_total: int,
    max_response_tail: int,
    max_models: int,
    host_check: HostCheckMode,
    allowed_hosts: str,
    trusted_proxies: str,
    openai_stream_usage: bool,
    connect_timeout: float,
    read_timeout: float,
    probe_timeout: float,
    shutdown_timeout: float,
    keepalive_timeout: float,
    log_format: LogFormat,
    log_level: str,
    access_log: bool,
    status_page: bool,
) -> None:
    """A transparent proxy for Ollama that turns every request into Prometheus metrics.

    Point clients at it instead of Ollama (OLLAMA_HOST=127.0.0.1:11435, or
    base_url="http://127.0.0.1:11435/v1" for OpenAI SDKs) and scrape GET /metrics.
    Without a command it serves; the commands manage API keys and check settings.
    """
    ctx.obj = Invocation(config, keys_file, ctx.params)
    if ctx.invoked_subcommand is not None:
        return
    try:
        core = Config.build(
            listen=listen,
            upstream=upstream[0] if upstream else "",
            metrics_listen=metrics_listen,
            preserve_host=preserve_host,
            max_inspect_bytes=max_inspect_bytes,
            max_inspect_total=max_inspect_total,
            max_response_tail=max_response_tail,
            max_models=max_models,
            host_check=host_check,
            allowed_hosts=allowed_hosts,
            trusted_proxies=trusted_proxies,
            openai_stream_usage=openai_stream_usage,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            probe_timeout=probe_timeout,
            shutdown_timeout=shutdown_timeout,
            keepalive_timeout=keepalive_timeout,
            log_format=log_format,
            # Access lines are info lines: a higher log level turns them off too.
            access_log=access_log and log_level.lower() in ("debug", "info"),
            status_page=status_page,
        )
        given = ctx.get_parameter_source("upstream") not in (None, ParameterSource.DEFAULT)
        settings = gateway_settings(config, keys_file, core, upstream, given, slots, ledger)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    setup_logging(log_format, log_level)
    run(core, settings)


main.add_command(keys_command)
main.add_command(config_command)
main.add_command(fleet_command)
main.add_command(usage_command)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's event loop where it is installed (the default on Linux and macOS), else
    asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def tune_runtime() -> None:
    """Garbage collection sized for a proxy: each request allocates many short-lived objects
    and few reference cycles, so CPython's default (a collection every 700 allocations) spends
    several percent of the CPU rescanning live objects. Freeze what start-up allocated and
    collect less often; cycles are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_THRESHOLD, 20, 20)


def run(config: Config, settings: Settings | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain for up to ``shutdown_timeout`` seconds."""
    metrics_at = config.metrics_listen.url if config.metrics_listen else config.listen.url
    try:
        app = create_app(config, build_registry(), settings)
    except (KeysFileError, LedgerError) as exc:
        raise click.ClickException(str(exc)) from None

    fleet = settings.upstreams if settings is not None else ()
    forwarding = (
        f"{len(fleet)} upstreams ({', '.join(u.name for u in fleet)})"
        if fleet
        else str(config.upstream)
    )

    def announce(_: str) -> None:
        log.info(
            "ollama-meter %s listening on %s, forwarding to %s; metrics at %s/metrics",
            __version__,
            config.listen.url,
            forwarding,
            metrics_at,
        )
        access = app.get(ACCESS)
        if access is not None and settings is not None and settings.access is not None:
            log.info(
                "access control on: %d keys from %s; clients without a key: %s",
                len(access.ring),
                settings.access.keys_file,
                settings.access.anonymous or "public routes only",
            )
        if not app.get(UPSTREAM_ANSWERED, False):
            log.warning(
                "Ollama at %s does not answer: requests will get 502 until it does",
                forwarding,
            )

    tune_runtime()
    try:
        web.run_app(
            app,
            host=config.listen.host,
            port=config.listen.port,
            # The app cuts requests at shutdown_timeout itself (see Proxy.cut_off); aiohttp's
            # own wait only has to outlast that.
            shutdown_timeout=config.shutdown_timeout + _SHUTDOWN_GRACE,
            # The same as aiohttp's test server: a client that leaves cancels its handler,
            # which closes the upstream request so that Ollama stops generating.
            handler_cancellation=True,
            keepalive_timeout=config.keepalive_timeout,
            access_log=None,  # logs.AccessLog writes one line per request instead
            print=announce,
            loop=event_loop_factory()(),
        )
    except LedgerError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot start: {exc.strerror or exc}") from None

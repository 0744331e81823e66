"""``ollama-meter usage``: the ledger's report on the command line.

It reads the store itself (the SQLite file, or PostgreSQL), so it works while the proxy runs
and after it stopped. The store is the one of ``--ledger`` (here or before the command), or
of the settings file's ``[ledger]`` table. A problem is one line and exit status 1.
"""

from __future__ import annotations

import time

import click

from .config import ConfigError
from .gateway.ledger import HOUR
from .gateway.ledger_report import (
    DEFAULT_BY,
    FORMATS,
    ReportError,
    check_span,
    month_start,
    parse_by,
    parse_time,
    render,
    summarise,
)
from .gateway.ledger_store import LedgerError, Store, open_store
from .ledger_settings import store_of
from .settings import load_settings


@click.command("usage")
@click.option("--since", default=None, help="A date (2026-11-01, UTC) or an age (7d, 12h). "
              "Default: the start of this month.")  # fmt: skip
@click.option("--until", default=None, help="A date or an age, as --since. Default: now.")
@click.option(
    "--by",
    default=",".join(DEFAULT_BY),
    show_default=True,
    help="Group by any of key, team, model, endpoint, upstream, status, replica, day, hour.",
)
@click.option("--key", default=None, metavar="NAME", help="Only this key's requests.")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(FORMATS))
@click.option(
    "--ledger",
    default=None,
    metavar="PATH|URL",
    help="The ledger: a SQLite file or postgresql://... (default: --ledger or [ledger] of "
    "--config).",
)
@click.option("--config", default=None, metavar="PATH", help="The settings file to use.")
@click.pass_context
def usage_command(
    ctx: click.Context,
    since: str | None,
    until: str | None,
    by: str,
    key: str | None,
    fmt: str,
    ledger: str | None,
    config: str | None,
) -> None:
    """Requests, tokens, GPU seconds and errors per key and model (or --by), from the ledger."""
    now = time.time()
    try:
        groups = parse_by(by)
        start = month_start(now) if since is None else parse_time(since, "--since", now)
        end = int(now) // HOUR * HOUR + HOUR if until is None else parse_time(until, "--until", now)
        check_span(start, end)
        store = _store(ctx, ledger, config)
        try:
            store.open(create=False)  # a report never creates a ledger
            rows = store.rows(start, end, key)
        finally:
            store.close()
    except (ReportError, ConfigError, LedgerError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(render(summarise(rows, start, end, groups), fmt), nl=False)


def _store(ctx: click.Context, ledger: str | None, config: str | None) -> Store:
    params = ctx.parent.params if ctx.parent is not None else {}
    value = ledger or params.get("ledger")
    if value:
        path, url = store_of(value, "--ledger")
        return open_store(path, url)
    settings = load_settings(config or params.get("config"))
    if settings.ledger is None:
        raise ConfigError("no ledger: give --ledger PATH|URL, or [ledger] in --config")
    return open_store(settings.ledger.path, settings.ledger.url)

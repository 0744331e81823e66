"""``ollama-meter keys``: create, list, disable, enable and remove API keys in a keys file.

``create`` prints the new key once, on standard output, and nothing else there (so that
``KEY=$(ollama-meter keys create ...)`` works); everything else is on standard error. A
running proxy picks every change up within 2 s (or at once on SIGHUP).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import click
from tomlkit.items import Table

from .gateway.keys import (
    LIMIT_FIELDS,
    NAME,
    ROLES,
    KeyEntry,
    KeysFileError,
    Role,
    append_key,
    edit_key,
    load_keys,
    parse_expiry,
)

_file_option = click.option(
    "--file",
    "path",
    required=True,
    envvar="OLLAMA_METER_KEYS_FILE",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The keys file.",
)


def _name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not NAME.fullmatch(value):
        raise click.BadParameter("must be 1-32 of a-z, 0-9, '_', '.', '-'")
    return value


def _team(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    return None if value is None else _name(ctx, param, value)


def _expires(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        when = parse_expiry(value, "expires")
    except KeysFileError as exc:
        raise click.BadParameter(str(exc).removeprefix("expires: ")) from None
    return datetime.fromtimestamp(when, UTC)


@click.group("keys")
def keys_command() -> None:
    """Manage API keys (the keys file holds their SHA-256 hashes only)."""


def _limit_options(command: Callable[..., None]) -> Callable[..., None]:
    for name, what in reversed(
        (
            ("--rpm", "requests per minute"),
            ("--tpm", "prompt + completion tokens per minute"),
            ("--concurrency", "requests in flight at once"),
        )
    ):
        command = click.option(
            name,
            default=None,
            type=click.IntRange(min=0),
            metavar="N",
            help=f"Its own limit of {what} (0: unlimited; unset: [limits]' default).",
        )(command)
    return command


def _given(rpm: int | None, tpm: int | None, concurrency: int | None) -> dict[str, int]:
    values = zip(LIMIT_FIELDS, (rpm, tpm, concurrency), strict=True)
    return {field: value for field, value in values if value is not None}


@keys_command.command("create")
@_file_option
@click.option("--name", required=True, callback=_name, help="Unique; the key's metric label.")
@click.option("--role", required=True, type=click.Choice(ROLES), help="What the key may do.")
@click.option("--team", default=None, callback=_team, help="A team name, for usage reports.")
@click.option(
    "--models", default=None, metavar="GLOB,...", help="Models it may use, e.g. 'llama3*,qwen*'."
)
@click.option(
    "--expires", default=None, callback=_expires, metavar="DATE", help="e.g. 2027-06-30 (UTC)."
)
@_limit_options
def create(
    path: Path,
    name: str,
    role: Role,
    team: str | None,
    models: str | None,
    expires: datetime | None,
    rpm: int | None,
    tpm: int | None,
    concurrency: int | None,
) -> None:
    """Add a key and print it, once: only its hash is kept."""
    patterns = None
    if models is not None:
        patterns = tuple(m.strip() for m in models.split(",") if m.strip())
        if not patterns:
            raise click.BadParameter("no model names", param_hint="--models")
    try:
        key, entry = append_key(
            path,
            name=name,
            role=role,
            team=team,
            models=patterns,
            expires=expires,
            limits=_given(rpm, tpm, concurrency),
        )
    except (KeysFileError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(key)
    click.echo(
        f"created key {entry.name!r} (id {entry.id}, role {entry.role}) in {path}; "
        "it is shown only now",
        err=True,
    )


def _state(entry: KeyEntry, now: float) -> str:
    if entry.disabled:
        return "disabled"
    if entry.expires is not None and now >= entry.expires:
        return "expired"
    return "active"


@keys_command.command("list")
@_file_option
def list_keys(path: Path) -> None:
    """List the keys (never their secrets or hashes)."""
    try:
        entries = load_keys(path)
    except KeysFileError as exc:
        raise click.ClickException(str(exc)) from None
    now = time.time()
    rows = [("NAME", "ID", "ROLE", "TEAM", "MODELS", "EXPIRES", "LIMITS", "STATE")]
    for e in entries:
        expires = "" if e.expires is None else datetime.fromtimestamp(e.expires, UTC).isoformat()
        models = ",".join(e.models) if e.models is not None else "*"
        own = _given(e.rpm, e.tpm, e.concurrency)
        limits = ",".join(f"{field}={value}" for field, value in own.items()) or "default"
        rows.append((e.name, e.id, e.role, e.team or "", models, expires, limits, _state(e, now)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _edit(path: Path, name: str, disabled: bool | None) -> None:
    def change(table: Table) -> None:
        if disabled:
            table["disabled"] = True
        elif "disabled" in table:
            del table["disabled"]

    try:
        edit_key(path, name, None if disabled is None else change)
    except (KeysFileError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


@keys_command.command("limit")
@_file_option
@click.argument("name")
@_limit_options
@click.option("--default", "default", is_flag=True, help="Remove its own limits first.")
def limit(
    path: Path,
    name: str,
    rpm: int | None,
    tpm: int | None,
    concurrency: int | None,
    default: bool,
) -> None:
    """Set a key's own limits (a running proxy reloads them within seconds)."""
    given = _given(rpm, tpm, concurrency)
    if not given and not default:
        raise click.UsageError("nothing to change: give --rpm, --tpm, --concurrency or --default")

    def change(table: Table) -> None:
        if default:
            for field in LIMIT_FIELDS:
                if field in table:
                    del table[field]
        for field, value in given.items():
            table[field] = value

    try:
        edit_key(path, name, change)
    except (KeysFileError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


@keys_command.command("disable")
@_file_option
@click.argument("name")
def disable(path: Path, name: str) -> None:
    """Stop a key from working (it stays in the file)."""
    _edit(path, name, True)
    click.echo(f"disabled key {name!r}", err=True)


@keys_command.command("enable")
@_file_option
@click.argument("name")
def enable(path: Path, name: str) -> None:
    """Let a disabled key work again."""
    _edit(path, name, False)
    click.echo(f"enabled key {name!r}", err=True)


@keys_command.command("remove")
@_file_option
@click.argument("name")
def remove(path: Path, name: str) -> None:
    """Delete a key from the file."""
    _edit(path, name, None)
    click.echo(f"removed key {name!r}", err=True)

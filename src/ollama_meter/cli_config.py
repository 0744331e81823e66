"""``ollama-meter config check`` and ``config show``: the settings file, checked without
starting, and the effective settings printed.

Both take the same options as the server (``ollama-meter --keys-file K config show``), and
``--config`` also after the command name. A problem is one line naming the file and the key,
and exit status 1.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import tomlkit
from yarl import URL

from .config import Config, ConfigError, HostPort
from .fleet_settings import shorthand
from .gateway.keys import KeysFileError, load_keys
from .ledger_settings import with_ledger
from .settings import Settings, load_settings, with_keys_file


@dataclass(frozen=True, slots=True)
class Invocation:
    """What the top-level command was given, for its subcommands."""

    config: str | None
    keys_file: str | None
    params: dict[str, Any]


def gateway_settings(
    path: str | None,
    keys_file: str | None,
    core: Config,
    upstreams: tuple[str, ...] = (),
    explicit: bool = False,
    slots: int | None = None,
    ledger: str | None = None,
) -> Settings:
    """The settings file (and --keys-file over it; several --upstream as a fleet), checked
    against the core's listeners; ``${VAR}`` in the file from the environment."""
    settings = with_keys_file(load_settings(path, os.environ), keys_file)
    if ledger is not None:
        settings = dataclasses.replace(settings, ledger=with_ledger(settings.ledger, ledger))
    if len(upstreams) > 1 or explicit:
        if settings.upstreams:
            raise ConfigError(
                f"upstream: given as --upstream (or OLLAMA_METER_UPSTREAM) and as "
                f"[[upstream]] tables in {settings.source}: use one or the other"
            )
        if len(upstreams) > 1:
            settings = dataclasses.replace(settings, upstreams=shorthand(list(upstreams)))
    if slots is not None:
        if settings.upstreams and len(upstreams) <= 1:
            raise ConfigError(
                f"slots: given as --slots (or OLLAMA_METER_SLOTS) and [[upstream]] tables are "
                f"in {settings.source}: set slots in each [[upstream]]"
            )
        fleet = tuple(dataclasses.replace(u, slots=slots) for u in settings.upstreams)
        settings = dataclasses.replace(settings, upstreams=fleet, slots=slots)
    for upstream in settings.upstreams:
        core.check_upstream(upstream.url)
    access = settings.access
    if access is not None:
        taken: list[HostPort] = [core.listen]
        if core.metrics_listen is not None:
            taken.append(core.metrics_listen)
        for number, listener in enumerate(access.listeners, 1):
            if listener.listen in taken:
                raise ConfigError(
                    f"{settings.source}: access.listener[{number}].listen: "
                    f"{listener.listen} is already a listener of this proxy"
                )
            taken.append(listener.listen)
    return settings


def _core(invocation: Invocation) -> Config:
    accepted = inspect.signature(Config.build).parameters
    params = dict(invocation.params) or {"listen": "127.0.0.1:11435"}
    addresses = params.get("upstream") or ("127.0.0.1:11434",)
    params["upstream"] = addresses[0]
    return Config.build(**{k: v for k, v in params.items() if k in accepted})


def _load(ctx: click.Context, config: str | None) -> tuple[Config, Settings]:
    invocation: Invocation = ctx.find_object(Invocation) or Invocation(None, None, {})
    try:
        core = _core(invocation)
        addresses = tuple(invocation.params.get("upstream") or ())
        settings = gateway_settings(
            config or invocation.config,
            invocation.keys_file,
            core,
            addresses,
            slots=invocation.params.get("slots"),
            ledger=invocation.params.get("ledger"),
        )
        if settings.access is not None:
            load_keys(settings.access.keys_file)
    except (ConfigError, KeysFileError) as exc:
        raise click.ClickException(str(exc)) from None
    return core, settings


_config_option = click.option(
    "--config", "config", default=None, metavar="PATH", help="The settings file to use."
)


@click.group("config")
def config_command() -> None:
    """Check the settings file, or print the effective settings."""


@config_command.command("check")
@_config_option
@click.pass_context
def check(ctx: click.Context, config: str | None) -> None:
    """Check the settings (file, options, variables, and the keys file) without starting."""
    _, settings = _load(ctx, config)
    what = settings.source or "no settings file"
    if settings.access is not None:
        count = len(load_keys(settings.access.keys_file))
        what += f"; access control on, {count} keys in {settings.access.keys_file}"
    ledger = settings.ledger
    if ledger is not None:
        if ledger.path is not None and not ledger.path.parent.is_dir():
            raise click.ClickException(
                f"{ledger.path}: directory {ledger.path.parent} does not exist"
            )
        what += f"; usage ledger in {ledger.where}"
    click.echo(f"ok: {what}")


def _plain(value: object) -> object:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, HostPort | Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


@config_command.command("show")
@_config_option
@click.pass_context
def show(ctx: click.Context, config: str | None) -> None:
    """Print the effective settings, as TOML (keys are in their own file, as hashes, and are
    not printed; upstream header values are masked)."""
    core, settings = _load(ctx, config)
    doc: dict[str, Any] = {"settings_file": settings.source or ""}
    doc["core"] = {k: v for k, v in dict(_plain(core)).items() if v is not None}  # type: ignore[call-overload]
    if settings.access is not None:
        access = _plain(settings.access)
        doc["access"] = {k: v for k, v in dict(access).items() if v is not None}  # type: ignore[call-overload]
    if settings.upstreams:
        doc["upstream"] = [
            {
                "name": u.name,
                "url": str(u.url),
                "slots": u.slots if u.slots is not None else "not set",
                "max_loaded": u.max_loaded,
                "headers": {name: "***" for name, _ in u.headers},
            }
            for u in settings.upstreams
        ]
        doc["routing"] = {"admin_upstream": settings.routing.admin_upstream or ""}
    if settings.limits is not None:
        limits = settings.limits
        doc["limits"] = {
            "default_rpm": limits.defaults.rpm,
            "default_tpm": limits.defaults.tpm,
            "default_concurrency": limits.defaults.concurrency,
            "max_queue": limits.max_queue,
            "max_queue_wait": f"{limits.max_queue_wait:g}s",
            "max_queued_per_key": limits.max_queued_per_key,
            "redis": "" if limits.redis is None else str(URL(limits.redis).with_password(None)),
            "replicas": limits.replicas,
        }
    if settings.ledger is not None:
        ledger = settings.ledger
        doc["ledger"] = {
            "store": ledger.where,
            "flush_interval": f"{ledger.flush_interval:g}s",
            "replica": ledger.replica or "(the host name)",
            "max_pending_rows": ledger.max_pending_rows,
            "keep": f"{ledger.keep / 86400:g}d",
        }
    click.echo(tomlkit.dumps(doc), nl=False)

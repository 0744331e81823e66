"""The gateway's settings file (``--config PATH``): TOML in, validated frozen settings out.

Rules:
1. Read with the standard library's ``tomllib``. Every table and key is known: an unknown one
   is an error, so a typo never silently turns a feature off.
2. Every problem is a ``ConfigError`` of one line naming the file, the table and the key:
   ``ollama-meter.toml: access.anonymous: must be none, read or inference, got 'all'``.
3. Paths in the file are relative to the file's own directory.
4. No I/O beyond reading the file: the keys file it names is read by the gateway.

The tables (each gateway issue adds its own; ``[[upstream]]`` and ``[routing]``: see
fleet_settings.py; ``[limits]``: limit_settings.py; ``[ledger]``: ledger_settings.py):

``[access]``
    ``keys_file`` (turns access control on), ``anonymous`` (``none``, ``read`` or
    ``inference``), ``max_keep_alive`` (a duration such as ``"30m"``), ``audit_log`` (a path,
    or ``-`` for standard output), ``max_key_labels`` (default 100), and
    ``[[access.listener]]`` tables (``listen``, ``role``): a listener whose every request has
    that role without a key (for the Go CLI on loopback).
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal, cast

from .config import ConfigError, HostPort, is_loopback_listener, parse_listen
from .fleet_settings import RoutingSettings, UpstreamSettings, parse_routing, parse_upstreams
from .gateway.keep_alive import MAX_BOUND_SECONDS
from .gateway.keys import ROLES, Role
from .ledger_settings import LedgerSettings, parse_ledger
from .limit_settings import LimitSettings, parse_limits

AnonymousRole = Literal["none", "read", "inference"]

_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_ACCESS_KEYS: Final = frozenset(
    {"keys_file", "anonymous", "max_keep_alive", "audit_log", "max_key_labels", "listener"}
)


def parse_duration(value: object, where: str) -> float:
    """``"30s"``, ``"30m"``, ``"1h30m"``, ``"400d"``, or a number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(f'{where}: must be a duration such as "30m", got {value!r}')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value and _DURATION.sub("", value) == "":
        seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(value))
    else:
        raise ConfigError(f'{where}: must be a duration such as "30m", got {value!r}'[:300])
    if not math.isfinite(seconds):  # TOML's nan and inf: no duration (nan < 0 is false)
        raise ConfigError(f'{where}: must be a duration such as "30m", got {value!r}'[:300])
    if seconds < 0:
        raise ConfigError(f"{where}: must not be negative")
    return seconds


@dataclass(frozen=True, slots=True)
class Listener:
    """A listener whose requests all have ``role``, keyed or not."""

    listen: HostPort
    role: Role


@dataclass(frozen=True, slots=True)
class AccessSettings:
    keys_file: Path
    #: What a client without a key may do beyond the public routes (None: nothing).
    anonymous: Role | None = None
    #: Longest keep_alive a non-admin key may ask for, in seconds (None: no clamp).
    max_keep_alive: float | None = None
    #: A file path, "-" for standard output, or None for no audit log.
    audit_log: str | None = None
    max_key_labels: int = 100
    listeners: tuple[Listener, ...] = ()


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the settings file can set; the defaults are the core's behaviour."""

    source: str | None = None
    access: AccessSettings | None = None
    #: The fleet (empty: the core's one --upstream).
    upstreams: tuple[UpstreamSettings, ...] = ()
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    #: ``[limits]`` (None: no limits; the queue has its defaults if slots are set).
    limits: LimitSettings | None = None
    #: ``[ledger]`` (None: no ledger, no file written: the core's behaviour).
    ledger: LedgerSettings | None = None
    #: ``--slots``: requests the one upstream runs at once per model (None: not gated).
    slots: int | None = None
    #: The file's tables as read (for ``config show``).
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


def load_settings(path: str | None, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings in ``path`` (None: no file, the defaults); ``${VAR}`` in upstream
    headers from ``environ``."""
    if path is None:
        return Settings()
    source = Path(path)
    try:
        with source.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_settings(doc, path, source.parent, environ or {})


def parse_settings(
    doc: dict[str, Any], name: str, base: Path, environ: Mapping[str, str] | None = None
) -> Settings:
    unknown = sorted(set(doc) - {"access", "upstream", "routing", "limits", "ledger"})
    if unknown:
        raise ConfigError(f"{name}: {unknown[0]}: unknown table or key")
    access = doc.get("access")
    limits = doc.get("limits")
    ledger = doc.get("ledger")
    upstreams = parse_upstreams(doc.get("upstream", []), name, environ or {})
    return Settings(
        source=name,
        access=None if access is None else _access(access, f"{name}: access", base),
        upstreams=upstreams,
        routing=parse_routing(doc.get("routing"), name, upstreams),
        limits=None
        if limits is None
        else parse_limits(limits, f"{name}: limits", environ or {}, parse_duration),
        ledger=None
        if ledger is None
        else parse_ledger(ledger, f"{name}: ledger", base, environ or {}, parse_duration),
        raw=doc,
    )


def _access(table: object, where: str, base: Path) -> AccessSettings | None:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = sorted(set(table) - _ACCESS_KEYS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key")
    keys_file = table.get("keys_file")
    if keys_file is None:
        if len(table):
            raise ConfigError(f"{where}.keys_file: missing (it turns access control on)")
        return None
    if not isinstance(keys_file, str) or not keys_file:
        raise ConfigError(f"{where}.keys_file: must be a path")
    anonymous = table.get("anonymous", "none")
    if anonymous not in ("none", "read", "inference"):
        raise ConfigError(
            f"{where}.anonymous: must be none, read or inference, got {anonymous!r}"[:300]
        )
    keep = table.get("max_keep_alive")
    if keep is not None:
        keep = parse_duration(keep, f"{where}.max_keep_alive")
        if keep > MAX_BOUND_SECONDS:
            raise ConfigError(f"{where}.max_keep_alive: longer than Ollama can hold (292 years)")
    audit = table.get("audit_log")
    if audit is not None and (not isinstance(audit, str) or not audit):
        raise ConfigError(f"{where}.audit_log: must be a path, or - for standard output")
    labels = table.get("max_key_labels", 100)
    if isinstance(labels, bool) or not isinstance(labels, int) or labels < 0:
        raise ConfigError(f"{where}.max_key_labels: must be an integer >= 0")
    return AccessSettings(
        keys_file=base / keys_file,
        anonymous=None if anonymous == "none" else cast(Role, anonymous),
        max_keep_alive=keep,
        audit_log=audit if audit in (None, "-") else str(base / audit),
        max_key_labels=labels,
        listeners=_listeners(table.get("listener", []), f"{where}.listener"),
    )


def _listeners(tables: object, where: str) -> tuple[Listener, ...]:
    if not isinstance(tables, list):
        raise ConfigError(f"{where}: must be [[access.listener]] tables")
    listeners = []
    for number, table in enumerate(tables, 1):
        at = f"{where}[{number}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{at}: must be a table")
        unknown = sorted(set(table) - {"listen", "role"})
        if unknown:
            raise ConfigError(f"{at}.{unknown[0]}: unknown key")
        listen, role = table.get("listen"), table.get("role")
        if not isinstance(listen, str):
            raise ConfigError(f"{at}.listen: must be HOST:PORT")
        if role not in ROLES:
            raise ConfigError(f"{at}.role: must be read, inference or admin, got {role!r}"[:300])
        address = parse_listen(listen, f"{at}.listen")
        if not is_loopback_listener(address):
            raise ConfigError(
                f"{at}.listen: {address} is not a loopback address: a role listener lets "
                "every request in without a key, so it listens on 127.0.0.1 or ::1 only"
            )
        listeners.append(Listener(address, cast(Role, role)))
    return tuple(listeners)


def with_keys_file(settings: Settings, keys_file: str | None) -> Settings:
    """``--keys-file`` over the file's ``[access] keys_file`` (turning access on if need be).
    An empty value is an error, not "off": ``--keys-file "$KEYS"`` with KEYS unset must not
    start a proxy without access control."""
    if keys_file is None:
        return settings
    if not keys_file.strip():
        raise ConfigError("keys-file: empty (leave the option out to run without API keys)")
    access = settings.access or AccessSettings(keys_file=Path(keys_file))
    # Every other setting as it was (a field added to Settings is carried without a change here).
    return replace(settings, access=replace(access, keys_file=Path(keys_file)))

"""The fleet's tables of the settings file: ``[[upstream]]`` and ``[routing]``.

```toml
[[upstream]]
name = "gpu-a"                 # [a-z0-9_.-]{1,32}, unique; the `upstream` label
url = "http://10.0.0.5:11434"  # written as --upstream accepts it
slots = 4                      # its OLLAMA_NUM_PARALLEL; unset: not known (estimated as 1)
max_loaded = 2                 # its OLLAMA_MAX_LOADED_MODELS; 0 (the default): not known
headers = { Authorization = "Bearer ${GPU_B_TOKEN}" }  # sent upstream; ${VAR} from the environment

[routing]
admin_upstream = "gpu-a"       # where model management goes without X-Ollama-Meter-Upstream
```

Rules: every problem is one line naming the file, the entry (counting from 1) and the key
(``fleet.toml: upstream[2].slots: must be an integer >= 1``). A ``${VAR}`` that is not set is
an error, never an empty value. Header values are secrets: ``config show`` masks them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from yarl import URL

from .config import ConfigError, parse_upstream
from .gateway.keys import NAME

_UPSTREAM_KEYS: Final = frozenset({"name", "url", "slots", "max_loaded", "headers"})
_VARIABLE: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: Not allowed in a header value (tab is).
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: Headers the proxy sets itself on the way up: an upstream's headers may not replace them.
_RESERVED: Final = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "x-forwarded-for"}
)


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    name: str
    url: URL
    #: Requests it runs at once per model, when configured (None: not known).
    slots: int | None = None
    #: Models it holds at once (0: not known).
    max_loaded: int = 0
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    admin_upstream: str | None = None


def _count(table: Mapping[str, object], key: str, where: str, least: int) -> int | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{where}.{key}: must be an integer >= {least}, got {value!r}"[:300])
    return value


def _expand(value: str, where: str, environ: Mapping[str, str]) -> str:
    def variable(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise ConfigError(f"{where}: ${{{name}}} is not set in the environment")
        return environ[name]

    return _VARIABLE.sub(variable, value)


def _headers(value: object, where: str, environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a table of header names and values")
    headers = []
    for name, text in value.items():
        if not _HEADER_NAME.fullmatch(name) or name.lower() in _RESERVED:
            raise ConfigError(f"{where}.{name}: not a header an upstream may be given"[:300])
        if not isinstance(text, str):
            raise ConfigError(f"{where}.{name}: must be a string")
        expanded = _expand(text, f"{where}.{name}", environ)
        if _CONTROL.search(expanded):
            raise ConfigError(f"{where}.{name}: a header value cannot hold control characters")
        headers.append((name, expanded))
    return tuple(headers)


def parse_upstreams(
    tables: object, source: str, environ: Mapping[str, str]
) -> tuple[UpstreamSettings, ...]:
    if not isinstance(tables, list):
        raise ConfigError(f"{source}: upstream: must be [[upstream]] tables")
    upstreams: list[UpstreamSettings] = []
    for number, table in enumerate(tables, 1):
        where = f"{source}: upstream[{number}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        unknown = sorted(set(table) - _UPSTREAM_KEYS)
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key"[:300])
        name = table.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ConfigError(f"{where}.name: must match {NAME.pattern}, got {name!r}"[:300])
        if any(u.name == name for u in upstreams):
            raise ConfigError(f"{where}.name: {name!r} is used by an earlier upstream")
        url = table.get("url")
        if not isinstance(url, str):
            raise ConfigError(f"{where}.url: must be an address such as http://10.0.0.5:11434")
        try:
            parsed = parse_upstream(url)
        except ConfigError as exc:
            raise ConfigError(f"{where}.url: {str(exc).removeprefix('upstream: ')}") from None
        upstreams.append(
            UpstreamSettings(
                name=name,
                url=parsed,
                slots=_count(table, "slots", where, 1),
                max_loaded=_count(table, "max_loaded", where, 0) or 0,
                headers=_headers(table.get("headers"), f"{where}.headers", environ),
            )
        )
    return tuple(upstreams)


def parse_routing(
    table: object, source: str, upstreams: tuple[UpstreamSettings, ...]
) -> RoutingSettings:
    where = f"{source}: routing"
    if table is None:
        return RoutingSettings()
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = sorted(set(table) - {"admin_upstream"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key"[:300])
    admin = table.get("admin_upstream")
    names = [u.name for u in upstreams]
    if admin is not None and admin not in names:
        known = ", ".join(names) or "none"
        raise ConfigError(
            f"{where}.admin_upstream: {admin!r} is not an upstream (known: {known})"[:300]
        )
    return RoutingSettings(admin_upstream=admin)


def shorthand(addresses: list[str]) -> tuple[UpstreamSettings, ...]:
    """``--upstream`` given several times: u1, u2, ... in order (slots not known)."""
    return tuple(
        UpstreamSettings(name=f"u{number}", url=parse_upstream(address))
        for number, address in enumerate(addresses, 1)
    )

"""The ``[limits]`` table of the settings file.

```toml
[limits]
default_rpm = 0            # requests/minute of keys that set none, and anonymous (0: unlimited)
default_tpm = 0            # prompt + completion tokens per minute, the same way
default_concurrency = 0    # requests in flight at once, the same way
max_queue = 64             # requests waiting for a slot, all upstreams together (0: 503 at once)
max_queue_wait = "30s"     # longest wait for a slot before a 503
max_queued_per_key = 16    # so one key cannot fill the queue
redis = ""                 # "redis://redis:6379/0": rpm and tpm shared by every replica
redis_password_env = ""    # an environment variable holding Redis's password
replicas = 1               # proxies sharing them (each keeps limit / replicas without Redis)
```

Every problem is one line naming the file and the key: ``meter.toml: limits.default_rpm:
must be an integer >= 0, got -1``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from yarl import URL

from .config import ConfigError
from .gateway.limits import KeyLimits

LIMIT_KEYS: Final = frozenset(
    {
        "default_rpm",
        "default_tpm",
        "default_concurrency",
        "max_queue",
        "max_queue_wait",
        "max_queued_per_key",
        "redis",
        "redis_password_env",
        "replicas",
    }
)
_REDIS_SCHEMES: Final = ("redis", "rediss", "unix")
#: The password of a URL's user information (``//user:PASSWORD@``).
_PASSWORD: Final = re.compile(r"(//[^/@:]*:)[^/@]*@")


@dataclass(frozen=True, slots=True)
class LimitSettings:
    defaults: KeyLimits = field(default_factory=KeyLimits)
    max_queue: int = 64
    max_queue_wait: float = 30.0
    max_queued_per_key: int = 16
    #: Redis URL (with the password from ``redis_password_env`` put in), or None.
    redis: str | None = None
    replicas: int = 1


def count(table: Mapping[str, object], key: str, where: str, least: int = 0) -> int | None:
    """An integer >= ``least`` at ``key`` of ``table``, None when absent."""
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{where}.{key}: must be an integer >= {least}, got {value!r}"[:300])
    return value


def parse_limits(
    table: object,
    where: str,
    environ: Mapping[str, str],
    duration: Callable[[object, str], float],
) -> LimitSettings:
    """``[limits]``; ``duration`` parses ``max_queue_wait`` (settings.parse_duration)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = sorted(set(table) - LIMIT_KEYS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key"[:300])
    d = LimitSettings()
    wait = d.max_queue_wait
    if "max_queue_wait" in table:
        wait = duration(table["max_queue_wait"], f"{where}.max_queue_wait")
    return LimitSettings(
        defaults=KeyLimits(
            _or(count(table, "default_rpm", where), 0),
            _or(count(table, "default_tpm", where), 0),
            _or(count(table, "default_concurrency", where), 0),
        ),
        max_queue=_or(count(table, "max_queue", where), d.max_queue),
        max_queue_wait=wait,
        max_queued_per_key=_or(count(table, "max_queued_per_key", where, 1), d.max_queued_per_key),
        redis=_redis(table, where, environ),
        replicas=_or(count(table, "replicas", where, 1), 1),
    )


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _redis(table: Mapping[str, object], where: str, environ: Mapping[str, str]) -> str | None:
    url = table.get("redis", "")
    if not isinstance(url, str):
        raise ConfigError(f'{where}.redis: must be a URL such as "redis://redis:6379/0"')
    if not url.strip():
        return None
    try:
        parsed = URL(url.strip())
    except ValueError:
        parsed = URL()
    if parsed.scheme not in _REDIS_SCHEMES or (parsed.scheme != "unix" and not parsed.host):
        raise ConfigError(
            f"{where}.redis: must be redis://HOST[:PORT][/DB], rediss://... or unix://PATH, "
            f"got {_masked(url)!r}"[:300]
        )
    variable = table.get("redis_password_env", "")
    if not isinstance(variable, str):
        raise ConfigError(f"{where}.redis_password_env: must be the name of a variable")
    if variable:
        if variable not in environ:
            raise ConfigError(f"{where}.redis_password_env: ${variable} is not set")
        parsed = parsed.with_password(environ[variable])
    return str(parsed)


def _masked(url: str) -> str:
    """A URL as an error may show it: a password in it replaced (errors reach logs)."""
    return _PASSWORD.sub(r"\1***@", url)

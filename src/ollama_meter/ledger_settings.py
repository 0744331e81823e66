"""The ``[ledger]`` table of the settings file, and ``--ledger PATH|URL`` over it.

```toml
[ledger]
path = "usage.sqlite"          # a SQLite file (relative to this file), or:
url = ""                       # "postgresql://meter@db/meter": a PostgreSQL shared by replicas
password_env = ""              # an environment variable holding PostgreSQL's password
flush_interval = "10s"         # how often the rollups in memory are added to the store
replica = ""                   # this proxy's name in the store (default: the host name)
max_pending_rows = 100000      # rows kept in memory while the store is down; then the oldest go
keep = "400d"                  # rows older than this are deleted (once a day)
```

Every problem is one line naming the file and the key. Nothing here touches the store: it is
opened (and refused: a missing directory, a corrupt file) by gateway/ledger_store.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from yarl import URL

from .config import ConfigError

LEDGER_KEYS: Final = frozenset(
    {"path", "url", "password_env", "flush_interval", "replica", "max_pending_rows", "keep"}
)
_SCHEMES: Final = ("postgresql", "postgres")


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    #: The SQLite file, or None with ``url``.
    path: Path | None = None
    #: The PostgreSQL URL, with the password from ``password_env`` put in.
    url: str | None = None
    flush_interval: float = 10.0
    #: "" means the host name, read when the ledger starts.
    replica: str = ""
    max_pending_rows: int = 100_000
    keep: float = 400 * 86400.0

    @property
    def where(self) -> str:
        """The store, fit to print (no password)."""
        if self.url is not None:
            return printable(self.url)
        return str(self.path)


#: Query parameters that hold a secret: libpq's password and its client key's passphrase
#: (redis-py reads ``password`` too).
_SECRET_PARAMETERS: Final = frozenset({"password", "sslpassword"})


def printable(url: str) -> str:
    """A PostgreSQL (or Redis) URL without its password: neither the one before the host nor
    a ``?password=`` parameter. A URL without a host (a socket: ``postgresql:///db?host=/run``,
    ``unix:///run/redis.sock``) has no place for one before it."""
    try:
        parsed = URL(url)
    except ValueError:
        return "(a URL that does not parse)"
    query = parsed.query
    kept = [(k, v) for k, v in query.items() if k not in _SECRET_PARAMETERS]
    if parsed.absolute:
        if len(kept) < len(query):
            parsed = parsed.with_query(kept)
        return str(parsed.with_password(None))
    # (yarl would print ``unix:///run/x`` as ``unix:/run/x``: keep the text as written.)
    rest = URL.build(query=kept).raw_query_string
    return url.partition("?")[0] + (f"?{rest}" if rest else "")


def store_of(value: str, where: str) -> tuple[Path | None, str | None]:
    """A SQLite path or a PostgreSQL URL, told apart by the scheme."""
    if not value.strip():
        raise ConfigError(f"{where}: empty (a SQLite file, or postgresql://...)")
    if "://" in value:
        try:
            parsed = URL(value.strip())
        except ValueError:
            parsed = URL()
        if parsed.scheme not in _SCHEMES or not (parsed.host or parsed.query.get("host")):
            raise ConfigError(
                f"{where}: must be postgresql://USER@HOST[:PORT]/DB, got {printable(value)!r}"[:300]
            )
        return None, value.strip()
    return Path(value), None


def parse_ledger(
    table: object,
    where: str,
    base: Path,
    environ: Mapping[str, str],
    duration: Callable[[object, str], float],
) -> LedgerSettings:
    """``[ledger]``; ``duration`` parses ``flush_interval`` and ``keep``."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = sorted(set(table) - LEDGER_KEYS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key"[:300])
    path, url = table.get("path"), table.get("url")
    if (path is None) == (url is None):
        raise ConfigError(f"{where}: set one of path (SQLite) or url (PostgreSQL)")
    d = LedgerSettings()
    if path is not None:
        if not isinstance(path, str) or not path or "://" in path:
            raise ConfigError(f"{where}.path: must be a file path")
        settings = replace(d, path=base / path)
    else:
        if not isinstance(url, str):
            raise ConfigError(f"{where}.url: must be a postgresql:// URL")
        _, checked = store_of(url, f"{where}.url")
        settings = replace(d, url=_with_password(checked or "", table, where, environ))
    interval = d.flush_interval
    if "flush_interval" in table:
        interval = duration(table["flush_interval"], f"{where}.flush_interval")
        if interval <= 0:
            raise ConfigError(f"{where}.flush_interval: must be longer than 0s")
    keep = d.keep
    if "keep" in table:
        keep = duration(table["keep"], f"{where}.keep")
        if keep < 3600:
            raise ConfigError(f'{where}.keep: must be at least "1h" (rows are hourly)')
    replica = table.get("replica", "")
    if not isinstance(replica, str) or len(replica) > 64:
        raise ConfigError(f"{where}.replica: must be a name of at most 64 characters")
    rows = table.get("max_pending_rows", d.max_pending_rows)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ConfigError(f"{where}.max_pending_rows: must be an integer >= 1, got {rows!r}")
    return replace(
        settings, flush_interval=interval, keep=keep, replica=replica, max_pending_rows=rows
    )


def _with_password(
    url: str, table: Mapping[str, object], where: str, environ: Mapping[str, str]
) -> str:
    variable = table.get("password_env", "")
    if not isinstance(variable, str):
        raise ConfigError(f"{where}.password_env: must be the name of a variable")
    if not variable:
        return url
    if variable not in environ:
        raise ConfigError(f"{where}.password_env: ${variable} is not set")
    return str(URL(url).with_password(environ[variable]))


def with_ledger(settings: LedgerSettings | None, value: str | None) -> LedgerSettings | None:
    """``--ledger PATH|URL`` (``OLLAMA_METER_LEDGER``) over the file's table."""
    if value is None:
        return settings
    path, url = store_of(value, "ledger")
    return replace(settings or LedgerSettings(), path=path, url=url)

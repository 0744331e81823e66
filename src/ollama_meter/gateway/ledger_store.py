"""Where the ledger's rows live: a SQLite file (standard library, WAL mode) or PostgreSQL
(psycopg 3). One table of hourly rows, upserted by adding, and a ``schema_version`` table.

Rules:
1. Every method blocks: it runs on the ledger's own thread (ledger_writer.py) or in the
   ``ollama-meter usage`` command, never on the event loop.
2. ``add`` is one transaction: all the rows of a flush are in the store, or none is. A row
   adds to the stored one with the same key (and ``replica``: each proxy writes its own rows,
   so replicas never overwrite each other).
3. Errors, drawn as a tree::

       LedgerError            the store cannot be used: refuse to start (one line)
       └── StoreDown          the store did not answer or refused a write: keep the rows, retry

   A file that is not a SQLite database, another program's database, or a schema newer than
   this version knows, is a LedgerError: the file is never overwritten or migrated down.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

from ..ledger_settings import printable
from .ledger import COUNTS, Row, RowKey

#: The schema this version writes and reads (``schema_version`` holds the store's).
SCHEMA_VERSION: Final = 1
KEY_COLUMNS: Final = ("hour", "replica", *RowKey._fields[1:])
_SECONDS: Final = frozenset({"prompt_eval_seconds", "eval_seconds", "load_seconds"})
#: The longest a PostgreSQL statement may run (a year's report is well under it).
_STATEMENT_TIMEOUT: Final = 60


class LedgerError(Exception):
    """The store cannot be used as it is (one line, naming it)."""


class StoreDown(LedgerError):
    """The store did not take a write or a read now; later it may."""


class Store(Protocol):
    where: str

    def open(self, create: bool = True) -> None: ...
    def add(self, rows: Sequence[Row], replica: str) -> None: ...
    def prune(self, before: int) -> int: ...
    def rows(self, since: int, until: int, key: str | None) -> list[tuple[Any, ...]]: ...
    def close(self) -> None: ...


def _table(integer: str, real: str) -> str:
    columns = [f"{name} {integer if name == 'hour' else 'TEXT'} NOT NULL" for name in KEY_COLUMNS]
    columns += [
        f"{name} {real if name in _SECONDS else integer} NOT NULL DEFAULT 0" for name in COUNTS
    ]
    primary = ", ".join(KEY_COLUMNS)
    return f"CREATE TABLE usage ({', '.join(columns)}, PRIMARY KEY ({primary}))"


def _upsert(mark: str) -> str:
    names = (*KEY_COLUMNS, *COUNTS)
    marks = ", ".join([mark] * len(names))
    adds = ", ".join(f"{c} = usage.{c} + excluded.{c}" for c in COUNTS)
    return (
        f"INSERT INTO usage ({', '.join(names)}) VALUES ({marks}) "
        f"ON CONFLICT ({', '.join(KEY_COLUMNS)}) DO UPDATE SET {adds}"
    )


def _values(rows: Iterable[Row], replica: str) -> list[tuple[object, ...]]:
    integer = [name not in _SECONDS for name in COUNTS]
    return [
        (
            key.hour,
            replica,
            *key[1:],
            *(int(v) if i else v for v, i in zip(counts, integer, strict=True)),
        )
        for key, counts in rows
    ]


_SELECT: Final = f"SELECT {', '.join((*KEY_COLUMNS, *COUNTS))} FROM usage"


def _newer(where: str, version: int) -> LedgerError:
    return LedgerError(
        f"{where}: the ledger's schema is version {version}, newer than this ollama-meter "
        f"reads ({SCHEMA_VERSION}): upgrade ollama-meter"
    )


class SqliteStore:
    """A SQLite file in WAL mode; created (and its schema) when missing."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.where = str(path)
        self._timeout = timeout
        self._db: sqlite3.Connection | None = None

    def open(self, create: bool = True) -> None:
        if self._db is not None:
            return
        if not self.path.parent.is_dir():
            raise LedgerError(f"{self.path}: directory {self.path.parent} does not exist")
        if not create and not self.path.exists():
            raise LedgerError(f"{self.path}: no such ledger file")
        try:
            db = sqlite3.connect(self.path, timeout=self._timeout, check_same_thread=False)
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.path}: cannot open: {exc}") from None
        try:
            self._refuse_foreign(db)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._migrate(db)
        except sqlite3.DatabaseError as exc:
            db.close()
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise StoreDown(f"{self.path}: {exc}") from None
            raise LedgerError(
                f"{self.path}: not a usable SQLite ledger ({exc}); it is left as it is"
            ) from None
        except LedgerError:
            db.close()
            raise
        self._db = db

    def _refuse_foreign(self, db: sqlite3.Connection) -> None:
        """Someone else's database: adding our tables (or WAL mode) to it would change it."""
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            return
        # A table named schema_version is common: ours comes with our usage table.
        if not {"schema_version", "usage"} <= tables:
            raise LedgerError(
                f"{self.path}: a SQLite database, but not an ollama-meter ledger (its tables: "
                f"{', '.join(sorted(tables))[:100]}); it is left as it is"
            )
        # Read before anything is written (WAL mode changes the file's header).
        found = db.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        if isinstance(found, int) and found > SCHEMA_VERSION:
            raise _newer(self.where, found)

    def _migrate(self, db: sqlite3.Connection) -> None:
        with db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            found = db.execute("SELECT max(version) FROM schema_version").fetchone()[0]
            if found is None:
                db.execute(_table("INTEGER", "REAL"))
                db.execute("CREATE INDEX usage_key ON usage (key, hour)")
                db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif found > SCHEMA_VERSION:
                raise _newer(self.where, found)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self.open()
        assert self._db is not None
        return self._db

    def add(self, rows: Sequence[Row], replica: str) -> None:
        try:
            db = self._connection()
            with db:
                db.executemany(_upsert("?"), _values(rows, replica))
        except sqlite3.Error as exc:
            raise StoreDown(f"{self.path}: {exc}") from None

    def prune(self, before: int) -> int:
        try:
            db = self._connection()
            with db:
                return db.execute("DELETE FROM usage WHERE hour < ?", (before,)).rowcount
        except sqlite3.Error as exc:
            raise StoreDown(f"{self.path}: {exc}") from None

    def rows(self, since: int, until: int, key: str | None) -> list[tuple[Any, ...]]:
        query, args = _query(since, until, key, "?")
        try:
            return self._connection().execute(query, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreDown(f"{self.path}: {exc}") from None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _query(since: int, until: int, key: str | None, mark: str) -> tuple[str, tuple[object, ...]]:
    query = f"{_SELECT} WHERE hour >= {mark} AND hour < {mark}"
    args: tuple[object, ...] = (since, until)
    if key is not None:
        query += f" AND key = {mark}"
        args += (key,)
    return query + " ORDER BY hour", args


class PostgresStore:
    """A PostgreSQL database shared by the replicas of a fleet (psycopg 3, one connection,
    made again after a failure)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self._url = url
        self.where = printable(url)
        self._timeout = timeout
        self._db: Any = None

    def open(self, create: bool = True) -> None:
        import psycopg  # only a PostgreSQL ledger needs it

        if self._db is not None:
            return
        try:
            db = psycopg.connect(self._url, connect_timeout=max(1, round(self._timeout)))
        except psycopg.Error as exc:
            raise StoreDown(f"{self.where}: {_first_line(exc)}") from None
        try:
            # A lock held elsewhere (VACUUM FULL, LOCK TABLE, a migration) fails a write after
            # the timeout instead of holding the writer's one thread (and the last flush at
            # shutdown) for as long as it lasts; any statement is bounded too.
            db.execute(
                "SELECT set_config('lock_timeout', %s, false), "
                "set_config('statement_timeout', %s, false)",
                (f"{round(self._timeout * 1000)}ms", f"{_STATEMENT_TIMEOUT}s"),
            )
            db.commit()
            self._migrate(db, create)
        except psycopg.Error as exc:
            db.close()
            raise StoreDown(f"{self.where}: {_first_line(exc)}") from None
        except LedgerError:
            db.close()
            raise
        self._db = db

    def _migrate(self, db: Any, create: bool) -> None:
        with db.transaction():
            # Two replicas starting at once must not both create the table.
            db.execute("SELECT pg_advisory_xact_lock(1329795153)")
            if not self._refuse_foreign(db) and not create:
                raise LedgerError(f"{self.where}: no ollama-meter ledger in this database")
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            found = db.execute("SELECT max(version) FROM schema_version").fetchone()[0]
            if found is None:
                db.execute(_table("BIGINT", "DOUBLE PRECISION"))
                db.execute("CREATE INDEX usage_key ON usage (key, hour)")
                db.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION,))
            elif found > SCHEMA_VERSION:
                raise _newer(self.where, found)

    def _refuse_foreign(self, db: Any) -> bool:
        """A shared database holds other programs' tables: only ours are taken, both of
        them (a ``schema_version`` alone is someone else's, and is left as it is). True if
        the ledger is there."""
        ours = {"schema_version", "usage"}
        found = {
            row[0]
            for row in db.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema() AND table_name = ANY(%s)",
                (sorted(ours),),
            )
        }
        if found and found != ours:
            raise LedgerError(
                f"{self.where}: its table {sorted(found)[0]} is not an ollama-meter ledger's "
                f"(no {sorted(ours - found)[0]} table); it is left as it is"
            )
        return bool(found)

    def _run(self, work: Any) -> Any:
        import psycopg

        self.open()
        try:
            with self._db.transaction():
                return work(self._db)
        except psycopg.Error as exc:
            self.close()
            raise StoreDown(f"{self.where}: {_first_line(exc)}") from None

    def add(self, rows: Sequence[Row], replica: str) -> None:
        values = _values(rows, replica)

        def work(db: Any) -> None:
            with db.cursor() as cursor:
                cursor.executemany(_upsert("%s"), values)

        self._run(work)

    def prune(self, before: int) -> int:
        count: int = self._run(
            lambda db: db.execute("DELETE FROM usage WHERE hour < %s", (before,)).rowcount
        )
        return count

    def rows(self, since: int, until: int, key: str | None) -> list[tuple[Any, ...]]:
        query, args = _query(since, until, key, "%s")
        found: list[tuple[Any, ...]] = self._run(lambda db: db.execute(query, args).fetchall())
        return found

    def close(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            finally:
                self._db = None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def open_store(path: Path | None, url: str | None) -> Store:
    """The store of a ``[ledger]`` table (not opened yet)."""
    if url is not None:
        return PostgresStore(url)
    assert path is not None
    return SqliteStore(path)

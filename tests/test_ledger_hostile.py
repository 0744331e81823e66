"""The usage ledger reviewed as a hostile client, a finance user and a careful reviewer (issue
13): each test names one problem found, proved through the real proxy on loopback sockets, the
real command line or the real SQLite store.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from ollama_meter.cli import main
from ollama_meter.gateway.ledger import COUNTS, HOUR, Rollup, RowKey
from ollama_meter.gateway.ledger_store import LedgerError, PostgresStore, SqliteStore, StoreDown
from ollama_meter.gateway.ledger_writer import LedgerWriter
from ollama_meter.ledger_app import LEDGER
from ollama_meter.ledger_settings import LedgerSettings, store_of
from ollama_meter.settings import Settings

from .conftest import Meter, MeterFactory
from .fake_ollama import FakeOllama
from .ledger_helpers import sqlite_totals
from .real_postgres import Postgres
from .real_postgres import postgres as postgres
from .test_ledger import exchange, seeded


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout_bytes.decode() + result.stderr


async def _ledgered(start_meter: MeterFactory, tmp_path: Path, **overrides: Any) -> Meter:
    return await start_meter(
        Settings(ledger=LedgerSettings(path=tmp_path / "u.sqlite")), **overrides
    )


async def _get(meter: Meter, query: str, **headers: str) -> tuple[int, str, Any]:
    url = meter.url + "/-/usage" + query
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as r:
        body = await r.read()
        doc = await r.json() if r.content_type == "application/json" else None
        return r.status, body.decode(), doc


# --- /-/usage and `ollama-meter usage`: hostile times -------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "?since=1000000d",  # 2,700 years ago: datetime cannot print it (ValueError)
        "?since=99999999999999999999d",  # more than a float holds (OverflowError)
        "?until=999999999h",
        "?since=0001-01-01",  # before the ledger's epoch
    ],
)
async def test_an_age_or_date_out_of_range_is_a_400_not_a_500(
    fake: FakeOllama, start_meter: MeterFactory, tmp_path: Path, query: str
) -> None:
    """Was: a 500 (a traceback in the log) for a huge age; the command line crashed too."""
    meter = await _ledgered(start_meter, tmp_path)
    status, _, doc = await _get(meter, query)
    assert status == 400
    assert doc["error"].startswith("ollama-meter: ")


def test_the_command_line_refuses_an_age_out_of_range_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "u.sqlite"
    seeded(path).close()
    for option in ("--since", "--until"):
        code, out = _cli("usage", "--ledger", str(path), option, "1000000d")
        assert code == 1
        assert out.startswith(f"Error: {option}: '1000000d' is before 1970 or after 9999")
        assert len(out.strip().splitlines()) == 1


async def test_until_not_after_since_is_refused_not_an_empty_report(
    fake: FakeOllama, start_meter: MeterFactory, tmp_path: Path
) -> None:
    """Was: `--since 2026-11-05 --until 2026-11-01` printed an empty table, exit 0: a finance
    user swapping the two reads "no usage"."""
    path = tmp_path / "u.sqlite"
    seeded(path).close()
    code, out = _cli(
        "usage", "--ledger", str(path), "--since", "2026-11-05", "--until", "2026-11-01"
    )
    assert (code, out) == (
        1,
        "Error: --until: 2026-11-01T00:00:00Z is not after --since 2026-11-05T00:00:00Z\n",
    )
    meter = await _ledgered(start_meter, tmp_path)
    status, _, doc = await _get(meter, "?since=2026-11-05&until=2026-11-01")
    assert status == 400
    assert doc["error"] == (
        "ollama-meter: until: 2026-11-01T00:00:00Z is not after since 2026-11-05T00:00:00Z"
    )


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?by=key&by=model", "by: given more than once"),
        ("?format=json&format=../../etc/passwd", "format: given more than once"),
        ("?since=7d&since=2026-11-01", "since: given more than once"),
        ("?sinse=7d", "'sinse' is not a parameter"),
    ],
)
async def test_repeated_or_unknown_parameters_are_a_clear_400(
    fake: FakeOllama, start_meter: MeterFactory, tmp_path: Path, query: str, message: str
) -> None:
    """Was: the first of repeated parameters won silently, and a misspelt one was ignored (a
    report for the whole month instead of the week asked for)."""
    meter = await _ledgered(start_meter, tmp_path)
    status, _, doc = await _get(meter, query)
    assert status == 400
    assert doc["error"].startswith("ollama-meter: " + message)


# --- CSV opened by a spreadsheet ---------------------------------------------------------


async def test_csv_names_a_spreadsheet_would_evaluate_are_made_text(
    fake: FakeOllama, start_meter: MeterFactory, tmp_path: Path
) -> None:
    """A client picks the model name: `-2-3` and `@now` are valid model labels (letters,
    digits and ._:/@-), and a spreadsheet opening the CSV reads `-2-3:latest` as a formula.
    Was: written as is (CSV injection)."""
    meter = await _ledgered(start_meter, tmp_path)
    async with aiohttp.ClientSession() as session:
        for model in ("-2-3", "@now", "llama3.2"):
            async with session.post(
                meter.url + "/api/generate", json={"model": model, "prompt": "x", "stream": False}
            ) as r:
                await r.read()
    assert await meter.app[LEDGER].flush()
    status, text, _ = await _get(meter, "?format=csv&by=model")
    assert status == 200
    rows = list(csv.reader(io.StringIO(text)))
    models = [row[0] for row in rows[1:]]
    assert len(models) == 3
    assert not [m for m in models if m[:1] in ("=", "+", "-", "@", "\t", "\r")], models
    assert "'-2-3:latest" in models
    assert "llama3.2:latest" in models
    # The JSON keeps the name as it is (a program reads it, not a spreadsheet).
    _, _, doc = await _get(meter, "?by=model")
    assert "-2-3:latest" in [row["model"] for row in doc["rows"]]


# --- Access without keys: loopback clients only ------------------------------------------


async def test_behind_a_trusted_reverse_proxy_only_loopback_clients_get_the_report(
    fake: FakeOllama, start_meter: MeterFactory, tmp_path: Path
) -> None:
    """A loopback listener behind nginx on the same host (declared with --trusted-proxies):
    every request comes from 127.0.0.1. Was: anyone nginx forwards for read who used what."""
    meter = await _ledgered(start_meter, tmp_path, trusted_proxies="127.0.0.1/32")
    status, _, doc = await _get(meter, "", **{"X-Forwarded-For": "203.0.113.7"})
    assert status == 403
    assert doc["error"].startswith("ollama-meter: /-/usage is served on a loopback")
    status, _, _ = await _get(meter, "", **{"X-Forwarded-For": "127.0.0.1"})
    assert status == 200
    # Without trusted proxies the header is the client's own say: the peer decides.
    (tmp_path / "plain").mkdir()
    plain = await _ledgered(start_meter, tmp_path / "plain")
    status, _, _ = await _get(plain, "", **{"X-Forwarded-For": "203.0.113.7"})
    assert status == 200


# --- The SQLite file: never someone else's, never changed when refused --------------------


@pytest.mark.parametrize("version", [1, 7])
def test_another_programs_database_with_a_schema_version_table_is_left_as_it_is(
    tmp_path: Path, version: int
) -> None:
    """`schema_version` is a common table name (Flyway-like tools, many apps). Was: such a
    database was taken for a ledger: switched to WAL mode (its header rewritten) and, at
    version 1, accepted, with every flush failing on the missing `usage` table; at 7 it
    said "upgrade ollama-meter"."""
    path = tmp_path / "app.sqlite"
    db = sqlite3.connect(path)
    with db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (?)", (version,))
        db.execute("CREATE TABLE invoices (id INTEGER, total REAL)")
    db.close()
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="not an ollama-meter ledger"):
        SqliteStore(path).open()
    assert path.read_bytes() == before
    code, out = _cli("--ledger", str(path), "--upstream", "127.0.0.1:1")
    assert code == 1
    assert "not an ollama-meter ledger" in out
    assert path.read_bytes() == before


# --- Secrets ----------------------------------------------------------------------------


def test_a_password_in_the_url_query_is_never_shown(tmp_path: Path) -> None:
    """libpq takes `?password=`: `config show` and the logs (the store's name) printed it.
    And a misspelt scheme echoed the whole URL, password included, in the error."""
    config = tmp_path / "m.toml"
    config.write_text(
        '[ledger]\nurl = "postgresql://meter@db/meter?password=hunter2&sslmode=require"\n'
    )
    code, out = _cli("config", "show", "--config", str(config))
    assert code == 0, out
    assert "hunter2" not in out
    assert 'store = "postgresql://meter@db/meter?sslmode=require"' in out
    with pytest.raises(Exception, match="must be postgresql://") as refused:
        store_of("postgresq://meter:hunter2@db/meter", "--ledger")
    assert "hunter2" not in str(refused.value)


# --- Shutdown: the timer's flush and the last one -----------------------------------------


async def test_rows_a_failing_timer_flush_gives_back_during_shutdown_are_written(
    tmp_path: Path,
) -> None:
    """SIGTERM while the timer's flush waits on a locked store: ``close`` flushed at once,
    concurrently; the timer's rows, given back after that, stayed in memory and were lost
    with no error logged. Now the last flush waits for the one in progress."""
    path = tmp_path / "u.sqlite"
    store = SqliteStore(path, timeout=1.0)
    store.open()
    writer = LedgerWriter(Rollup(1000), store, "r1", interval=3600, keep=400 * 86400)
    await writer.start()
    writer.rollup.add(exchange(key="alice"))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another writer holds the file: writes wait, then fail
    timer = asyncio.get_running_loop().create_task(writer.flush())
    await asyncio.sleep(0)  # one turn of the loop: the timer's flush takes alice's row
    assert len(writer.rollup) == 0
    writer.rollup.add(exchange(key="bob"))
    closing = asyncio.get_running_loop().create_task(writer.close())
    assert not await timer  # the store did not take alice's row: given back
    holder.execute("ROLLBACK")  # the store takes writes again
    holder.close()
    await closing
    rows = sqlite_totals(path)
    assert {k: r["requests"] for k, r in rows.items()} == {
        ("alice", "llama3.2:latest"): 1,
        ("bob", "llama3.2:latest"): 1,
    }
    assert len(writer.rollup) == 0


# --- The event loop never waits on a report -----------------------------------------------


async def test_a_big_report_is_made_off_the_event_loop(
    fake: FakeOllama, start_meter: MeterFactory, tmp_path: Path
) -> None:
    """Months of hourly rows (200,000 here: 25 keys x 8 models x 1,000 hours) were summed on
    the event loop's thread: every request and stream through the proxy stood still for
    seconds while an admin or the status page asked for /-/usage (here about 1 s, per day
    for a finance report; 0.04 s once made on the writer's thread). Measured: the longest
    gap between two turns of the loop while the report is made."""
    path = tmp_path / "u.sqlite"
    store = SqliteStore(path)
    store.open()
    start = 1764547200  # 2025-12-01T00Z
    store.add(
        [
            (RowKey(start + HOUR * h, f"k{k}", "t", f"m{m}", "/api/chat", "default", "2xx"), ones)
            for h in range(1000)
            for k in range(25)
            for m in range(8)
            for ones in ([1.0] * len(COUNTS),)
        ],
        "r1",
    )
    store.close()
    meter = await start_meter(Settings(ledger=LedgerSettings(path=path)))
    loop = asyncio.get_running_loop()
    turns: list[float] = []

    def turn() -> None:
        turns.append(loop.time())
        handle[0] = loop.call_later(0.01, turn)

    handle = [loop.call_soon(turn)]
    try:
        status, _, doc = await _get(meter, "?since=2025-12-01&by=key,model,day")
    finally:
        handle[0].cancel()
    assert status == 200
    assert sum(row["requests"] for row in doc["rows"]) == 200_000
    longest = max(b - a for a, b in itertools.pairwise(turns))
    assert longest < 0.4, f"the event loop stood still for {longest:.2f}s"


@pytest.mark.parametrize("column", ["version", "installed_rank"])
def test_a_postgresql_database_with_another_programs_schema_version_is_refused(
    postgres: Postgres, column: str
) -> None:
    """The database a fleet shares often holds other programs' tables, and `schema_version`
    is a common one (Flyway's own, many apps'). Was: one with a `version` column was taken
    for the ledger (every flush then failed on the missing `usage` table, retried forever);
    one without was "down" and retried forever, where it should refuse at once."""
    import psycopg

    with psycopg.connect(postgres.url, autocommit=True) as db:
        db.execute(f"CREATE TABLE schema_version ({column} INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (1)")
    store = PostgresStore(postgres.url)
    with pytest.raises(LedgerError, match="not an ollama-meter ledger") as refused:
        store.open()
    assert not isinstance(refused.value, StoreDown)
    with psycopg.connect(postgres.url) as db:
        found = db.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'usage'"
        ).fetchone()
    assert found == (0,)  # nothing was added to it


async def test_a_postgresql_lock_held_elsewhere_fails_the_flush_instead_of_hanging_it(
    postgres: Postgres,
) -> None:
    """A DBA's `VACUUM FULL usage` or `LOCK TABLE usage` (or a stuck migration) holds the
    table: the upsert waited for it with no bound, the writer's one thread with it: no flush
    failed, so no error was counted or logged, and at SIGTERM the last flush waited too (the
    process hangs until it is killed, losing every row in memory). Now a flush that waits on
    a lock longer than the store's timeout fails, keeps its rows and is retried."""
    import psycopg

    store = PostgresStore(postgres.url, timeout=1.0)
    writer = LedgerWriter(Rollup(1000), store, "r1", interval=3600, keep=400 * 86400)
    await writer.start()
    holder = psycopg.connect(postgres.url)
    try:
        holder.execute("LOCK TABLE usage IN ACCESS EXCLUSIVE MODE")
        writer.rollup.add(exchange(key="alice"))
        assert not await asyncio.wait_for(writer.flush(), 10)  # was: waits as long as the lock
        assert writer.write_errors == 1
        assert len(writer.rollup) == 1  # kept
    finally:
        holder.rollback()
        holder.close()
    await writer.close()
    with psycopg.connect(postgres.url) as db:
        assert db.execute("SELECT sum(requests) FROM usage").fetchone() == (1,)


async def test_a_store_that_becomes_unusable_while_running_keeps_the_rows_and_counts_it(
    postgres: Postgres,
) -> None:
    """A rolling upgrade of a fleet: a newer replica migrates the shared schema, then this
    one reconnects (after any blip) and finds a schema it cannot write. Was: the flush raised
    LedgerError: its rows were lost, the writer's task died (no more flushes, ever), and no
    failure was counted, so the flush-failing alert never fired."""
    import psycopg

    store = PostgresStore(postgres.url, timeout=1.0)
    writer = LedgerWriter(Rollup(1000), store, "r1", interval=3600, keep=400 * 86400)
    await writer.start()
    with psycopg.connect(postgres.url, autocommit=True) as db:
        db.execute("UPDATE schema_version SET version = 99")
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND datname = current_database()"
        )
    writer.rollup.add(exchange(key="alice"))
    assert not await writer.flush()  # the connection is gone: down
    assert not await writer.flush()  # connected again: a schema it cannot write
    assert len(writer.rollup) == 1  # kept, for when it is upgraded
    assert writer.flushes["error"] == 2
    assert writer.write_errors == 2
    await writer.close()


def test_a_report_never_creates_a_ledger_in_postgresql(postgres: Postgres) -> None:
    """`ollama-meter usage --ledger postgresql://...` on a database with no ledger (a typo
    in the database name's twin, the wrong server): it made the ledger's tables there and
    printed an empty report, exit 0, as SQLite does not (no such ledger file)."""
    import psycopg

    code, out = _cli("usage", "--ledger", postgres.url)
    assert (code, out) == (
        1,
        f"Error: {postgres.url}: no ollama-meter ledger in this database\n",
    )
    with psycopg.connect(postgres.url) as db:
        found = db.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_name IN ('usage', 'schema_version')"
        ).fetchone()
    assert found == (0,)

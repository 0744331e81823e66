"""The ledger without sockets: the rollup's rows and bound, the stores' upserts and schema,
reports (grouping, --since, the table, CSV and JSON, golden for a seeded ledger), the
settings table and the command line's refusals."""

from __future__ import annotations

import csv
import io
import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from ollama_meter.cli import main
from ollama_meter.config import ConfigError
from ollama_meter.exchange import CLIENT_DISCONNECT, Exchange
from ollama_meter.gateway.ledger import Rollup
from ollama_meter.gateway.ledger_report import ReportError, parse_by, parse_time
from ollama_meter.gateway.ledger_store import LedgerError, SqliteStore
from ollama_meter.gateway.ledger_writer import LedgerWriter
from ollama_meter.ledger_settings import LedgerSettings, parse_ledger
from ollama_meter.ollama import Usage
from ollama_meter.settings import parse_duration

from .ledger_helpers import totals

GOLDEN = Path(__file__).parent / "golden"
NOV_3 = datetime(2026, 11, 3, 14, 25, tzinfo=UTC).timestamp()


def exchange(
    key: str | None = "alice",
    model: str = "llama3.2:latest",
    status: int = 200,
    prompt: int = 10,
    completion: int = 20,
    endpoint: str = "/api/chat",
    error: str | None = None,
    team: str | None = "ml",
) -> Exchange:
    usage = Usage(prompt, completion, 0.25, 1.5, 0.125)
    return Exchange(
        "POST", endpoint, 0.0, model=model, status=status, usage=usage, key=key, team=team,
        error=error,
    )  # fmt: skip


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_requests_of_one_hour_and_key_add_to_one_row() -> None:
    clock = Clock(NOV_3)
    rollup = Rollup(100, clock)
    rollup.add(exchange())
    rollup.add(exchange(prompt=1, completion=2))
    rollup.add(exchange(status=499, error=CLIENT_DISCONNECT, completion=0))
    clock.now += 3600
    rollup.add(exchange(key=None, team=None))
    rows = rollup.take()
    assert len(rollup) == 0
    assert [(k.hour, k.key, k.status_class) for k, _ in rows] == [
        (int(NOV_3) // 3600 * 3600, "alice", "2xx"),
        (int(NOV_3) // 3600 * 3600, "alice", "499"),
        (int(NOV_3) // 3600 * 3600 + 3600, "anonymous", "2xx"),
    ]
    assert rows[0][1][:4] == [2, 0, 11, 22]
    assert rows[1][1][1] == 1  # an error, by its reason too
    assert rows[2][0].team == ""
    assert rows[0][0].upstream == "default"


def test_the_bound_drops_the_oldest_rows_and_counts_them() -> None:
    rollup = Rollup(2, Clock(NOV_3))
    rollup.add(exchange(model="a"))
    rows = rollup.take()  # a flush that will fail
    rollup.add(exchange(model="b"))
    rollup.add(exchange(model="c"))
    rollup.give_back(rows)  # "a" is the oldest: it goes
    assert rollup.dropped == 1
    assert [k.model for k, _ in rollup.take()] == ["b", "c"]
    for model in "defg":
        rollup.add(exchange(model=model))
    assert rollup.dropped == 3
    assert [k.model for k, _ in rollup.take()] == ["f", "g"]


def test_given_back_rows_add_to_the_newer_ones() -> None:
    rollup = Rollup(10, Clock(NOV_3))
    rollup.add(exchange())
    rows = rollup.take()
    rollup.add(exchange())
    rollup.give_back(rows)
    [(_, counts)] = rollup.take()
    assert counts[:4] == [2, 0, 20, 40]


def seeded(path: Path) -> SqliteStore:
    """Two replicas, three keys, two models, two days of November."""
    store = SqliteStore(path)
    store.open()
    for replica, when in (("r1", NOV_3), ("r2", NOV_3 + 86400 + 7200)):
        rollup = Rollup(100, Clock(when))
        rollup.add(exchange())
        rollup.add(exchange(key='bob, the "builder"', team=None, model="qwen3:0.6b"))
        rollup.add(exchange(key=None, team=None, status=404, prompt=0, completion=0))
        rollup.add(exchange(endpoint="/v1/chat/completions", prompt=5, completion=7))
        store.add(rollup.take(), replica)
    return store


def test_upserts_add_to_the_stored_rows(tmp_path: Path) -> None:
    store = seeded(tmp_path / "u.sqlite")
    rollup = Rollup(100, Clock(NOV_3))
    rollup.add(exchange())
    store.add(rollup.take(), "r1")  # the same row as before: added to it
    rows = totals(store, ("key", "replica", "day"))
    assert rows[("alice", "r1", "2026-11-03")]["requests"] == 3
    assert rows[("alice", "r1", "2026-11-03")]["prompt_tokens"] == 25
    assert rows[("alice", "r2", "2026-11-04")]["requests"] == 2
    assert rows[("anonymous", "r1", "2026-11-03")]["errors"] == 1
    store.close()


def _usage(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["usage", *args])
    return result.exit_code, result.stdout_bytes.decode() + result.stderr


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_report_golden(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "u.sqlite"
    seeded(path).close()
    code, out = _usage(
        "--ledger", str(path), "--since", "2026-11-01", "--until", "2026-12-01", "--format", fmt
    )
    assert code == 0, out
    golden = GOLDEN / f"usage.{'txt' if fmt == 'table' else fmt}"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_bytes(out.encode())
    assert out == golden.read_bytes().decode()


def test_csv_is_read_back_by_a_csv_reader(tmp_path: Path) -> None:
    path = tmp_path / "u.sqlite"
    seeded(path).close()
    code, out = _usage(
        "--ledger", str(path), "--since", "2026-11-01", "--format", "csv", "--by", "key,day"
    )
    assert code == 0, out
    rows = list(csv.DictReader(io.StringIO(out, newline="")))
    assert {row["key"] for row in rows} == {"alice", "anonymous", 'bob, the "builder"'}
    assert '"bob, the ""builder"""' in out
    assert out.endswith("\r\n")
    assert sum(int(row["requests"]) for row in rows) == 8


@pytest.mark.parametrize(
    ("by", "groups"),
    [
        ("model", 2),
        ("key,team,model,endpoint,upstream,day,hour", 8),
        ("day", 2),
        ("endpoint,replica", 4),
        ("status", 2),
    ],
)
def test_every_by_combination_sums_to_the_same_totals(tmp_path: Path, by: str, groups: int) -> None:
    path = tmp_path / "u.sqlite"
    seeded(path).close()
    code, out = _usage(
        "--ledger", str(path), "--since", "2026-11-01", "--by", by, "--format", "json"
    )
    assert code == 0, out
    doc = orjson.loads(out)
    assert doc["by"] == by.split(",")
    assert len(doc["rows"]) == groups
    assert sum(r["requests"] for r in doc["rows"]) == 8
    assert sum(r["prompt_tokens"] for r in doc["rows"]) == 50
    assert list(doc["rows"][0])[-5:] == [
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "gpu_seconds",
        "errors",
    ]


def test_key_and_since_narrow_the_report(tmp_path: Path) -> None:
    path = tmp_path / "u.sqlite"
    seeded(path).close()
    code, out = _usage(
        "--ledger", str(path), "--since", "2026-11-04", "--key", "alice", "--format", "json"
    )
    assert code == 0, out
    assert [(r["key"], r["requests"]) for r in orjson.loads(out)["rows"]] == [("alice", 2)]


def test_since_parses_ages_and_utc_dates() -> None:
    now = datetime(2026, 11, 10, 12, 30, tzinfo=UTC).timestamp()
    assert parse_time("7d", "--since", now) == datetime(2026, 11, 3, 12, tzinfo=UTC).timestamp()
    assert parse_time("12h", "--since", now) == datetime(2026, 11, 10, 0, tzinfo=UTC).timestamp()
    assert parse_time("2026-11-01", "--since", now) == datetime(2026, 11, 1, tzinfo=UTC).timestamp()
    assert (
        parse_time("2026-11-01T13", "--since", now)
        == datetime(2026, 11, 1, 13, tzinfo=UTC).timestamp()
    )
    with pytest.raises(ReportError, match=r"--since: 'yesterdayish' is not a date"):
        parse_time("yesterdayish", "--since", now)
    with pytest.raises(ReportError, match="--by: 'week' is not one of"):
        parse_by("key,week")


def test_bad_since_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "u.sqlite"
    seeded(path).close()
    code, out = _usage("--ledger", str(path), "--since", "yesterdayish")
    assert code == 1
    assert out.strip().splitlines() == [
        "Error: --since: 'yesterdayish' is not a date (2026-11-01, 2026-11-01T13, UTC) or an "
        "age (7d, 12h)"
    ]


def test_a_corrupt_ledger_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite"
    junk = b"this is not a database, it is a shopping list\n" * 200
    path.write_bytes(junk)
    result = CliRunner().invoke(main, ["--ledger", str(path), "--upstream", "127.0.0.1:1"])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {path}: not a usable SQLite ledger (")
    assert len(result.output.strip().splitlines()) == 1
    assert path.read_bytes() == junk
    code, out = _usage("--ledger", str(path))
    assert (code, out.startswith(f"Error: {path}: not a usable SQLite ledger")) == (1, True)


def test_another_programs_database_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "notes.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    db.close()
    before = path.read_bytes()
    result = CliRunner().invoke(main, ["--ledger", str(path), "--upstream", "127.0.0.1:1"])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {path}: a SQLite database, but not an ollama-meter ledger (its tables: "
        "notes); it is left as it is\n"
    )
    assert path.read_bytes() == before


def test_a_ledger_in_a_missing_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "usage.sqlite"
    result = CliRunner().invoke(main, ["--ledger", str(path)])
    assert result.exit_code == 1
    assert result.output == f"Error: {path}: directory {path.parent} does not exist\n"
    assert not path.parent.exists()


def test_a_newer_schema_is_not_misread(tmp_path: Path) -> None:
    path = tmp_path / "u.sqlite"
    seeded(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = 99")
    db.close()
    code, out = _usage("--ledger", str(path))
    assert code == 1
    assert "schema is version 99, newer than this ollama-meter reads (1)" in out
    with pytest.raises(LedgerError, match="version 99"):
        SqliteStore(path).open()


def test_a_report_never_creates_a_ledger(tmp_path: Path) -> None:
    code, out = _usage("--ledger", str(tmp_path / "none.sqlite"))
    assert (code, out) == (1, f"Error: {tmp_path / 'none.sqlite'}: no such ledger file\n")
    assert not (tmp_path / "none.sqlite").exists()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({}, "s.toml: ledger: set one of path (SQLite) or url (PostgreSQL)"),
        ({"path": "a", "url": "postgresql://h/db"}, "s.toml: ledger: set one of path"),
        ({"url": "mysql://h/db"}, "s.toml: ledger.url: must be postgresql://"),
        ({"path": "a", "flush_interval": "0s"}, "s.toml: ledger.flush_interval: must be longer"),
        ({"path": "a", "keep": "10m"}, 's.toml: ledger.keep: must be at least "1h"'),
        ({"path": "a", "max_pending_rows": 0}, "s.toml: ledger.max_pending_rows: must be an"),
        ({"path": "a", "rows": 1}, "s.toml: ledger.rows: unknown key"),
        (
            {"url": "postgresql://h/db", "password_env": "NOPE"},
            "s.toml: ledger.password_env: $NOPE is not set",
        ),
    ],
)
def test_bad_ledger_settings_are_one_line(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_ledger(table, "s.toml: ledger", Path("/etc/m"), {}, parse_duration)
    assert str(refused.value).startswith(message)
    assert "\n" not in str(refused.value)


def test_the_password_comes_from_the_environment_and_is_never_shown() -> None:
    table = {"url": "postgresql://meter@db/meter", "password_env": "PW", "keep": "30d"}
    parsed = parse_ledger(table, "s.toml: ledger", Path("/etc/m"), {"PW": "s3cret"}, parse_duration)
    assert parsed == LedgerSettings(url="postgresql://meter:s3cret@db/meter", keep=30 * 86400.0)
    assert "s3cret" not in parsed.where


def test_config_show_prints_the_ledger_without_its_password(tmp_path: Path) -> None:
    config = tmp_path / "m.toml"
    config.write_text(
        '[ledger]\nurl = "postgresql://meter@db/meter"\npassword_env = "PW"\nreplica = "r1"\n'
    )
    result = CliRunner().invoke(
        main, ["config", "show", "--config", str(config)], env={"PW": "s3cret"}
    )
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output
    assert 'store = "postgresql://meter@db/meter"' in result.output
    assert 'replica = "r1"' in result.output
    # --ledger over the file's table.
    sqlite = tmp_path / "u.sqlite"
    result = CliRunner().invoke(
        main, ["--ledger", str(sqlite), "config", "show", "--config", str(config)], env={"PW": "x"}
    )
    assert f'store = "{sqlite}"' in result.output


async def test_rows_past_keep_are_pruned_at_the_first_flush_then_daily(tmp_path: Path) -> None:
    store = seeded(tmp_path / "u.sqlite")  # hours of 3 and 4 November
    clock = Clock(datetime(2026, 11, 5, 0, 30, tzinfo=UTC).timestamp())
    writer = LedgerWriter(Rollup(10, clock), store, "r1", 10.0, keep=36 * 3600.0, clock=clock)
    await writer.start()
    writer.rollup.add(exchange())
    assert await writer.flush()
    # 36 hours before 5 November 00:00: 3 November 12:00; the 14:00 rows stay until a day later.
    days = {g[0] for g in totals(store, ("day",))}
    assert days == {"2026-11-03", "2026-11-04", "2026-11-05"}
    clock.now += 3600  # an hour later: no prune yet (once a day)
    assert await writer.flush()
    assert {g[0] for g in totals(store, ("day",))} == days
    clock.now += 86400
    assert await writer.flush()
    assert {g[0] for g in totals(store, ("day",))} == {"2026-11-04", "2026-11-05"}
    await writer.close()


def test_usage_takes_the_ledger_of_the_settings_file(tmp_path: Path) -> None:
    seeded(tmp_path / "u.sqlite").close()
    config = tmp_path / "m.toml"
    config.write_text('[ledger]\npath = "u.sqlite"\n')
    for args in (["--config", str(config), "usage"], ["usage", "--config", str(config)]):
        result = CliRunner().invoke(main, [*args, "--since", "2026-11-01", "--format", "json"])
        assert result.exit_code == 0, result.output
        assert sum(r["requests"] for r in orjson.loads(result.output)["rows"]) == 8
    # OLLAMA_METER_LEDGER, as compose.yaml sets it for `docker compose exec ... usage`.
    result = CliRunner().invoke(
        main,
        ["usage", "--since", "2026-11-01", "--format", "json"],
        env={"OLLAMA_METER_LEDGER": str(tmp_path / "u.sqlite")},
    )
    assert sum(r["requests"] for r in orjson.loads(result.output)["rows"]) == 8
    result = CliRunner().invoke(main, ["usage"])
    assert result.exit_code == 1
    assert result.output == "Error: no ledger: give --ledger PATH|URL, or [ledger] in --config\n"


def test_config_check_names_the_ledger_and_refuses_a_missing_directory(tmp_path: Path) -> None:
    config = tmp_path / "m.toml"
    config.write_text('[ledger]\npath = "u.sqlite"\n')
    result = CliRunner().invoke(main, ["config", "check", "--config", str(config)])
    assert (result.exit_code, result.output) == (
        0,
        f"ok: {config}; usage ledger in {tmp_path / 'u.sqlite'}\n",
    )
    assert not (tmp_path / "u.sqlite").exists()  # checked, not created
    config.write_text('[ledger]\npath = "gone/u.sqlite"\n')
    result = CliRunner().invoke(main, ["config", "check", "--config", str(config)])
    assert (result.exit_code, result.output) == (
        1,
        f"Error: {tmp_path / 'gone/u.sqlite'}: directory {tmp_path / 'gone'} does not exist\n",
    )


# Operations on a rollup: add a request of model N, or flush (taken rows written, or given
# back by a store that failed).
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 5)),
        st.tuples(st.just("flush"), st.booleans()),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=_OPS, bound=st.integers(1, 8))
def test_rows_given_back_are_neither_lost_nor_doubled(
    ops: list[tuple[str, object]], bound: int
) -> None:
    """Whatever the order of adds and failed or good flushes: the rollup never holds more
    than its bound, nothing is counted twice, and nothing is lost unless a row was dropped
    (and counted)."""
    rollup = Rollup(bound, Clock(NOV_3))
    written = 0.0
    added = 0
    for op, arg in ops:
        if op == "add":
            added += 1
            rollup.add(exchange(model=f"m{arg}"))
        else:
            rows = rollup.take()
            if arg:
                written += sum(counts[0] for _, counts in rows)
            else:
                rollup.give_back(rows)
        assert len(rollup) <= bound
    pending = sum(counts[0] for _, counts in rollup.take())
    assert written + pending <= added
    if rollup.dropped == 0:
        assert written + pending == added
    if bound >= 6:  # as many rows as models: the bound is never reached
        assert rollup.dropped == 0

"""The ledger's durability with the real process: SIGTERM loses nothing, SIGKILL at most what
came after the last flush, and a restart adds to the same rows. The store is read straight
from its SQLite file; flushes are seen in the process's debug log, never waited for."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import aiohttp

from .fake_ollama import FakeOllama, fixture, lines_of
from .ledger_helpers import sqlite_totals
from .test_process import Process, StartProcess, stream_then_sigterm
from .test_process import start_process as start_process

GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}


def _config(tmp_path: Path, interval: str) -> str:
    path = tmp_path / "meter.toml"
    path.write_text(f'[ledger]\npath = "usage.sqlite"\nflush_interval = "{interval}"\n')
    return str(path)


async def _generate(process: Process, count: int) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            async with session.post(process.url + "/api/generate", json=GENERATE) as r:
                assert r.status == 200
                await r.read()


def _requests(path: Path) -> int:
    return int(sum(row["requests"] for row in sqlite_totals(path, ("key",)).values()))


async def test_sigterm_mid_traffic_loses_nothing_and_a_restart_adds_to_the_same_rows(
    fake: FakeOllama, start_process: StartProcess, tmp_path: Path
) -> None:
    config = _config(tmp_path, "1h")  # no timed flush: only the one at shutdown
    ledger = tmp_path / "usage.sqlite"
    for run in (1, 2):
        process = await start_process(30.0, "--config", config)
        await _generate(process, 5)
        gate = asyncio.Event()
        async with stream_then_sigterm(fake, process, gate) as response:
            await process.line_containing("shutting down")
            gate.set()
            rest = await response.read()
        assert lines_of("chat_stream.ndjson")[0] + rest == fixture("chat_stream.ndjson")
        assert await asyncio.wait_for(process.proc.wait(), timeout=30) == 0
        assert _requests(ledger) == 6 * run
    by_endpoint = sqlite_totals(ledger, ("endpoint",))
    assert by_endpoint[("/api/chat",)]["requests"] == 2
    assert by_endpoint[("/api/chat",)]["completion_tokens"] == 2 * 3
    with sqlite3.connect(ledger) as db:
        rows, hours = db.execute("SELECT count(*), count(DISTINCT hour) FROM usage").fetchone()
    db.close()
    assert rows == 2 * hours  # one row per route and hour: the second run added to them


async def test_sigkill_loses_at_most_what_came_after_the_last_flush(
    fake: FakeOllama, start_process: StartProcess, tmp_path: Path
) -> None:
    config = _config(tmp_path, "0.2s")
    ledger = tmp_path / "usage.sqlite"
    process = await start_process(30.0, "--config", config, "--log-level", "debug")
    await _generate(process, 10)
    await asyncio.wait_for(process.line_containing("ledger: 1 rows written"), timeout=30)
    await _generate(process, 5)
    process.proc.send_signal(signal.SIGKILL)
    await process.proc.wait()
    assert process.proc.stderr is not None
    rest = (await process.proc.stderr.read()).decode()
    before_kill = "".join(process.log) + rest
    flushed_after = before_kill.split("ledger: 1 rows written", 1)[1]
    # The 10 flushed are there; the 5 after are there exactly when a flush took them before
    # the kill (within one flush interval).
    expected = 15 if "rows written" in flushed_after else 10
    assert _requests(ledger) == expected

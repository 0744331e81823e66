"""The ledger in a real PostgreSQL (tests/real_postgres.py): two proxy processes write their
own rows, ``ollama-meter usage`` sums both, and a database that goes away loses nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from click.testing import CliRunner

from ollama_meter.cli import main
from ollama_meter.gateway.ledger_store import PostgresStore
from ollama_meter.ledger_app import LEDGER
from ollama_meter.ledger_settings import LedgerSettings
from ollama_meter.settings import Settings

from .conftest import MeterFactory
from .fake_ollama import FakeOllama, final_object
from .ledger_helpers import totals
from .real_postgres import Postgres
from .real_postgres import postgres as postgres
from .test_process import Process, StartProcess
from .test_process import start_process as start_process

GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}


async def _generate(url: str, count: int) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            async with session.post(url + "/api/generate", json=GENERATE) as r:
                assert r.status == 200
                await r.read()


async def test_two_replicas_write_their_own_rows_and_the_report_sums_both(
    fake: FakeOllama, start_process: StartProcess, postgres: Postgres, tmp_path: Path
) -> None:
    processes: list[Process] = []
    for replica in ("r1", "r2"):
        config = tmp_path / f"{replica}.toml"
        config.write_text(f'[ledger]\nurl = "{postgres.url}"\nreplica = "{replica}"\n')
        processes.append(await start_process(30.0, "--config", str(config)))
    await asyncio.gather(_generate(processes[0].url, 3), _generate(processes[1].url, 4))
    for process in processes:
        process.proc.terminate()
        assert await asyncio.wait_for(process.proc.wait(), timeout=30) == 0

    def report(*args: str) -> list[dict[str, Any]]:
        result = CliRunner().invoke(
            main, ["usage", "--ledger", postgres.url, "--since", "1d", "--format", "json", *args]
        )
        assert result.exit_code == 0, result.output
        rows: list[dict[str, Any]] = orjson.loads(result.output)["rows"]
        return rows

    assert [(r["replica"], r["requests"]) for r in report("--by", "replica")] == [
        ("r1", 3),
        ("r2", 4),
    ]
    [both] = report("--by", "key,model")
    assert (both["key"], both["model"], both["requests"]) == ("anonymous", "llama3.2:latest", 7)
    assert both["prompt_tokens"] == 7 * fake_prompt_tokens()


def fake_prompt_tokens() -> int:
    count = final_object("generate_stream.ndjson").get("prompt_eval_count")
    assert isinstance(count, int)
    return count


async def test_a_database_that_goes_away_loses_nothing(
    fake: FakeOllama, start_meter: MeterFactory, postgres: Postgres
) -> None:
    meter = await start_meter(Settings(ledger=LedgerSettings(url=postgres.url, replica="r")))
    writer = meter.app[LEDGER]
    await _generate(meter.url, 2)
    await asyncio.to_thread(postgres.stop)
    await _generate(meter.url, 3)  # requests go on while the ledger cannot write
    assert not await writer.flush()
    assert meter.value("ledger_flushes_total", result="error") == 1
    assert meter.value("ledger_pending_rows") == 1
    await asyncio.to_thread(postgres.start)
    assert await writer.flush()
    store = PostgresStore(postgres.url)
    rows = await asyncio.to_thread(totals, store, ("replica",))
    store.close()
    assert rows[("r",)]["requests"] == 5

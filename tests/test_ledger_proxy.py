"""The usage ledger through the proxy: every request ends in it, to the token, as the metrics
and the upstream have it; /-/usage serves it; a store that does not take writes slows and
fails nothing, keeps the rows (within the bound) and writes them once it is back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import aiohttp
import ollama
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ollama_meter.gateway.ledger_store import SqliteStore
from ollama_meter.ledger_app import LEDGER
from ollama_meter.ledger_settings import LedgerSettings
from ollama_meter.settings import AccessSettings, Settings

from .access_keys import make_keys
from .clients import openai_httpx
from .conftest import Meter, MeterFactory, unused_port
from .fake_ollama import JSON_UTF8, MISSING_MODEL, NDJSON, FakeOllama, Reply, lines_of
from .ledger_helpers import per, sqlite_totals, summed
from .test_fleet import fleet_settings

MESSAGES: Any = [{"role": "user", "content": "hi"}]


def _ledger(path: Path, **options: Any) -> LedgerSettings:
    return LedgerSettings(path=path, **options)


def _scraped(meter: Meter, name: str) -> dict[tuple[str, ...], float]:
    """Samples of one family from the registry, by their label values (in label order)."""
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for metric in meter.registry.collect():
        for sample in metric.samples:
            if sample.name == f"ollama_meter_{name}":
                out[tuple(sample.labels.values())] += sample.value
    return dict(out)


Heard = Callable[[str, int | None, int | None], None]


async def _alice(alice: ollama.AsyncClient, fake: FakeOllama, heard: Heard) -> None:
    reply = await alice.chat(model="llama3.2", messages=MESSAGES)
    heard("alice", reply.prompt_eval_count, reply.eval_count)
    async for part in await alice.chat(model="llama3.2", messages=MESSAGES, stream=True):
        if part.done:
            heard("alice", part.prompt_eval_count, part.eval_count)
    async for piece in await alice.generate(model="qwen3:0.6b", prompt="hi", stream=True):
        if piece.done:
            heard("alice", piece.prompt_eval_count, piece.eval_count)
    fake.script("POST", "/api/chat", Reply.body(b'{"error":"boom"}', JSON_UTF8, 500))
    with pytest.raises(ollama.ResponseError):
        await alice.chat(model="llama3.2", messages=MESSAGES)


async def _admin(admin: openai.AsyncOpenAI, heard: Heard) -> None:
    completion = await admin.chat.completions.create(model="llama3.2", messages=MESSAGES)
    assert completion.usage is not None
    heard("admin", completion.usage.prompt_tokens, completion.usage.completion_tokens)
    stream = await admin.chat.completions.create(
        model="llama3.2",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            heard("admin", chunk.usage.prompt_tokens, chunk.usage.completion_tokens)


async def test_the_ledger_adds_up_to_the_metrics_and_to_what_ollama_reported(
    fake: FakeOllama, start_meter: MeterFactory, tmp_path: Path
) -> None:
    keys = make_keys(tmp_path)
    path = tmp_path / "usage.sqlite"
    meter = await start_meter(
        Settings(
            access=AccessSettings(keys_file=keys.path, anonymous="inference"),
            ledger=_ledger(path),
        )
    )
    told: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # key -> prompt, completion

    def heard(key: str, prompt: int | None, completion: int | None) -> None:
        told[key][0] += prompt or 0
        told[key][1] += completion or 0

    def bearer(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async with ollama.AsyncClient(host=meter.url, headers=bearer(keys.inference)) as alice:
        await _alice(alice, fake, heard)
    async with openai.AsyncOpenAI(
        base_url=meter.url + "/v1",
        api_key=keys.admin,
        max_retries=0,
        http_client=openai_httpx().AsyncClient(),
    ) as admin:
        await _admin(admin, heard)
    async with ollama.AsyncClient(host=meter.url) as anonymous:
        answer = await anonymous.generate(model="llama3.2", prompt="hi")
        heard("anonymous", answer.prompt_eval_count, answer.eval_count)
        with pytest.raises(ollama.ResponseError):
            await anonymous.chat(model=MISSING_MODEL, messages=MESSAGES)
    async with ollama.AsyncClient(host=meter.url, headers=bearer(keys.read)) as reader:
        with pytest.raises(ollama.ResponseError):
            await reader.chat(model="llama3.2", messages=MESSAGES)  # 403: a read key
    # A client that leaves after the first line of a stream (499, client_disconnect).
    lines = lines_of("chat_stream.ndjson")
    fake.script(
        "POST", "/api/chat", Reply(content_type=NDJSON, chunks=lines, gates={1: asyncio.Event()})
    )
    async with aiohttp.ClientSession(headers=bearer(keys.inference)) as session:
        body = orjson.dumps({"model": "llama3.2", "messages": MESSAGES})
        response = await session.post(meter.url + "/api/chat", data=body)
        await response.content.readline()
        response.close()
        await asyncio.wait_for(fake.cancelled.wait(), timeout=5)

    assert await meter.app[LEDGER].flush()
    ledger = sqlite_totals(path)

    # To the token, per key and model, as the per-key counters have it...
    for field, family in (
        ("prompt_tokens", "key_prompt_tokens_total"),
        ("completion_tokens", "key_completion_tokens_total"),
    ):
        scraped = {(k, m): v for (k, _team, m), v in _scraped(meter, family).items() if v}
        assert {g: v for g, v in per(ledger, field).items() if v} == scraped
    # ... as Ollama reported them to the clients, per key ...
    keyed = sqlite_totals(path, ("key",))
    for key, (prompt, completion) in told.items():
        assert (keyed[(key,)]["prompt_tokens"], keyed[(key,)]["completion_tokens"]) == (
            prompt,
            completion,
        )
    assert min(told["alice"][0], told["admin"][1], told["anonymous"][0]) > 0
    # ... and as the core's counters have them, per model.
    models = sqlite_totals(path, ("model",))
    for field, family in (("prompt_tokens", "prompt_tokens_total"), ("requests", "requests_total")):
        core: dict[str, float] = defaultdict(float)
        for labels, value in _scraped(meter, family).items():
            core[labels[1]] += value
        assert {m: row[field] for (m,), row in models.items() if row[field]} == {
            m: v for m, v in core.items() if v
        }
    seconds = sum(_scraped(meter, "prompt_eval_seconds_total").values()) + sum(
        _scraped(meter, "eval_seconds_total").values()
    )
    seconds += sum(_scraped(meter, "load_duration_seconds_sum").values())
    assert summed(ledger, "gpu_seconds") == pytest.approx(seconds, abs=0.01)
    # Requests and errors per key as access control counted them.
    requests: dict[str, float] = defaultdict(float)
    for (key, _team, _status), value in _scraped(meter, "key_requests_total").items():
        requests[key] += value
    assert {k: row["requests"] for (k,), row in keyed.items()} == {
        k: v for k, v in requests.items() if v
    }
    errors = {k: row["errors"] for (k,), row in keyed.items()}
    assert errors == {"alice": 2, "admin": 0, "anonymous": 1, "reader": 1}
    statuses = sqlite_totals(path, ("key", "endpoint"))
    assert statuses[("admin", "/v1/chat/completions")]["requests"] == 2


async def test_usage_is_served_on_loopback_without_keys_and_to_admins_with_them(
    fake: FakeOllama, start_meter: MeterFactory, tmp_path: Path
) -> None:
    meter = await start_meter(Settings(ledger=_ledger(tmp_path / "a.sqlite")))
    async with aiohttp.ClientSession() as session:
        await (
            await session.post(
                meter.url + "/api/generate",
                json={"model": "llama3.2", "prompt": "x", "stream": False},
            )
        ).read()
        assert await meter.app[LEDGER].flush()
        async with session.get(meter.url + "/-/usage?since=1d&by=key,model,upstream") as r:
            assert r.status == 200
            doc = await r.json()
        assert doc["by"] == ["key", "model", "upstream"]
        [row] = doc["rows"]
        assert (row["key"], row["model"], row["upstream"], row["requests"]) == (
            "anonymous",
            "llama3.2:latest",
            "default",
            1,
        )
        async with session.get(meter.url + "/-/usage?by=replica") as r:
            [row] = (await r.json())["rows"]
        assert row["replica"] == socket.gethostname()  # the default replica name
        async with session.get(meter.url + "/-/usage?format=csv&by=endpoint") as r:
            assert r.headers["Content-Type"].startswith("text/csv")
            assert (await r.text()).splitlines()[0] == (
                "endpoint,requests,prompt_tokens,completion_tokens,gpu_seconds,errors"
            )
        async with session.get(meter.url + "/-/usage?since=yesterdayish") as r:
            assert r.status == 400
            assert "yesterdayish" in (await r.json())["error"]
    # Not a loopback listener, no keys: refused.
    exposed = await start_meter(Settings(ledger=_ledger(tmp_path / "b.sqlite")), listen="0.0.0.0:0")
    async with aiohttp.ClientSession() as session, session.get(exposed.url + "/-/usage") as r:
        assert r.status == 403
    # With keys: admins only.
    keys = make_keys(tmp_path)
    keyed = await start_meter(
        Settings(access=AccessSettings(keys_file=keys.path), ledger=_ledger(tmp_path / "c.sqlite"))
    )
    async with aiohttp.ClientSession() as session:
        for key, status in ((keys.inference, 403), (keys.admin, 200), (None, 401)):
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            async with session.get(keyed.url + "/-/usage", headers=headers) as r:
                assert r.status == status


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Another process's exclusive lock on the SQLite file: it takes no writes meanwhile."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


async def test_a_store_that_takes_no_writes_keeps_the_rows_and_writes_them_when_back(
    fake: FakeOllama,
    start_meter: MeterFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "usage.sqlite"
    meter = await start_meter(Settings(ledger=_ledger(path, max_pending_rows=2)))
    writer = meter.app[LEDGER]
    writer.store = SqliteStore(path, timeout=0.05)  # the same file, a short busy wait
    chat = {"messages": MESSAGES, "stream": False}

    async def ask(session: aiohttp.ClientSession, model: str) -> None:
        async with session.post(meter.url + "/api/chat", json={**chat, "model": model}) as r:
            assert r.status == 200
            await r.read()

    async with aiohttp.ClientSession() as session:
        with locked(path):
            await ask(session, "llama3.2")
            assert not await writer.flush()
            assert not await writer.flush()
            await ask(session, "llama3.2")  # the same row: nothing dropped
            assert meter.value("ledger_pending_rows") == 1
            await ask(session, "qwen3:0.6b")
            await ask(session, "gemma3:1b")  # a third row, over the bound: the oldest goes
            assert not await writer.flush()
            assert meter.value("ledger_dropped_rows_total") == 1
            assert meter.value("ledger_pending_rows") == 2
            assert meter.value("ledger_flushes_total", result="error") == 3
            assert meter.value("ledger_write_errors_total") == 3
        assert await writer.flush()
    # Said once for the outage, and once when it ended.
    said = [r.getMessage() for r in caplog.records if r.name.endswith("ledger_writer")]
    assert len([m for m in said if "ledger: cannot write to" in m]) == 1
    assert len([m for m in said if "takes writes again (2 rows written)" in m]) == 1
    assert meter.value("ledger_flushes_total", result="ok") == 1
    assert meter.value("ledger_pending_rows") == 0
    assert meter.value("ledger_last_flush_timestamp_seconds") > 0
    stored = sqlite_totals(path, ("model",))
    assert {m: row["requests"] for (m,), row in stored.items()} == {
        "qwen3:0.6b": 1,
        "gemma3:1b": 1,
    }


LEDGER_GOLDEN: Final = Path(__file__).parent / "golden" / "ledger-families.txt"


async def test_the_ledger_families_are_a_pinned_contract_and_exist_only_with_it(
    fake: FakeOllama, start_meter: MeterFactory, tmp_path: Path
) -> None:
    """Name, type, labels and help of the ledger's families (UPDATE_GOLDEN=1 rewrites the
    file); without a ledger, /metrics has none of them."""
    plain = await start_meter()
    meter = await start_meter(Settings(ledger=_ledger(tmp_path / "u.sqlite")))
    async with aiohttp.ClientSession() as session:
        async with session.get(plain.url + "/metrics") as r:
            assert "ledger" not in await r.text()
        async with session.get(meter.url + "/metrics") as r:
            scraped = {f.name for f in text_string_to_metric_families(await r.text())}
    core = {m.name for m in plain.registry.collect()}
    lines = []
    for family in meter.registry.collect():
        if family.name in core:
            continue
        assert family.name in scraped
        labels = sorted({k for sample in family.samples for k in sample.labels})
        lines.append(f"{family.name} {family.type} [{','.join(labels)}] {family.documentation}")
    text = "\n".join(sorted(lines)) + "\n"
    if os.environ.get("UPDATE_GOLDEN"):
        LEDGER_GOLDEN.write_text(text)
    assert text == LEDGER_GOLDEN.read_text()


async def test_in_a_fleet_rows_name_the_upstream_a_request_went_to(
    fake: FakeOllama, start_meter: MeterFactory, tmp_path: Path
) -> None:
    path = tmp_path / "usage.sqlite"
    fleet = fleet_settings([fake.url, f"http://127.0.0.1:{unused_port()}"])
    meter = await start_meter(dataclasses.replace(fleet, ledger=_ledger(path)))
    async with ollama.AsyncClient(host=meter.url) as client:
        await client.generate(model="llama3.2", prompt="hi")
        with pytest.raises(ollama.ResponseError):
            await client.generate(model="llama9", prompt="hi")  # listed nowhere: sent nowhere
    assert await meter.app[LEDGER].flush()
    rows = sqlite_totals(path, ("upstream", "status"))
    assert {g: row["requests"] for g, row in rows.items()} == {("gpu-1", "2xx"): 1, ("", "4xx"): 1}

"""The admit step: slots per (upstream, model) and the bounded, fair queue, through the proxy,
in front of fake upstreams whose replies are held until the test lets them go."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from ollama_meter.app import ADMISSION
from ollama_meter.gateway.admission import Admission
from ollama_meter.gateway.keys import append_key
from ollama_meter.gateway.limit_metrics import LimitMetrics, anonymous_label
from ollama_meter.limit_settings import LimitSettings
from ollama_meter.settings import AccessSettings, Settings, parse_settings

from .conftest import Meter, MeterFactory
from .fake_fleet import Call, FakeUpstream, FleetFactory
from .fake_fleet import Fleet as FakeFleet

_MODEL = "llama3.2"
_LABEL = "llama3.2:latest"  # as /api/tags names it: the model label, and the slots' key


def _body(prompt: str = "hi") -> dict[str, Any]:
    return {"model": _MODEL, "prompt": prompt, "stream": False}


def _generates(upstream: FakeUpstream) -> list[Call]:
    return [call for call in upstream.calls if call.path == "/api/generate"]


def _admission(meter: Meter) -> Admission[Any]:
    return meter.app[ADMISSION]


async def _post(
    http: aiohttp.ClientSession, meter: Meter, body: dict[str, Any], key: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    async with http.post(f"{meter.url}/api/generate", json=body, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


async def _one_upstream(
    start_fleet: FleetFactory, start_meter: MeterFactory, settings: Settings, slots: int
) -> tuple[FakeFleet, Meter]:
    fleet = await start_fleet(1, models=(_MODEL,), loaded=(_MODEL,), slots=slots, time_scale=0)
    meter = await start_meter(dataclasses.replace(settings, slots=slots), upstream=fleet[0].url)
    return fleet, meter


async def test_a_full_queue_is_503_at_once_and_ollama_never_sees_more_than_its_slots(
    start_fleet: FleetFactory, start_meter: MeterFactory
) -> None:
    settings = Settings(limits=LimitSettings(max_queue=5, max_queued_per_key=16))
    fleet, meter = await _one_upstream(start_fleet, start_meter, settings, slots=2)
    upstream = fleet[0]
    held = upstream.hold_tokens(_MODEL)
    admission = _admission(meter)
    async with aiohttp.ClientSession() as http:
        tasks = [asyncio.create_task(_post(http, meter, _body(str(i)))) for i in range(20)]
        await upstream.wait_until(lambda: upstream.in_flight(_MODEL) == 2)
        # 2 at the upstream, 5 waiting: the other 13 are answered now, while those wait.
        refused = [t for t in await _finished(tasks, 13)]
        assert admission.depth == 5
        assert upstream.in_flight(_MODEL) == 2
        held.set()
        results = [await t for t in tasks]
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 7 + [503] * 13
    for status, headers, body in refused:
        assert status == 503
        assert 1 <= int(headers["Retry-After"]) <= 60
        assert orjson.loads(body)["error"].startswith("ollama-meter: the queue is full")
    assert upstream.peak[_MODEL] == 2
    assert len(_generates(upstream)) == 7
    assert admission.depth == 0
    assert meter.value("rejected_total", reason="queue_full", key="anonymous") == 13
    assert meter.value("queue_wait_seconds_count", model=_LABEL) == 7
    assert meter.value("queue_wait_seconds_bucket", model=_LABEL, le="+Inf") == 7
    # The two that found a slot free waited no time at all; the five queued ones, some.
    assert meter.value("queue_wait_seconds_bucket", model=_LABEL, le="0.005") >= 2
    assert meter.value("queue_wait_seconds_sum", model=_LABEL) > 0
    assert meter.series("slots_in_use") == [{"upstream": "default", "model": _LABEL}]
    assert meter.value("slots_in_use", upstream="default", model=_LABEL) == 0
    assert meter.value("slots_configured", upstream="default") == 2


def test_queue_waits_are_counted_in_their_buckets() -> None:
    """queue_wait_seconds is kept without prometheus_client's Histogram (limit_metrics.py):
    each wait in the first bucket whose bound it does not pass, as Prometheus' "le" says."""
    started = time.time()
    registry = CollectorRegistry()
    metrics = LimitMetrics(registry, anonymous_label, redis=False)
    for seconds in (0.0, 0.005, 0.3, 400.0):
        metrics.waited("m", seconds)
    metrics.waited("other", 1.0)

    def bucket(le: str, model: str = "m") -> float | None:
        labels = {"model": model, "le": le}
        return registry.get_sample_value("ollama_meter_queue_wait_seconds_bucket", labels)

    assert [bucket(le) for le in ("0.005", "0.25", "0.5", "300.0", "+Inf")] == [2, 2, 3, 3, 4]
    assert registry.get_sample_value("ollama_meter_queue_wait_seconds_sum", {"model": "m"}) == (
        400.305
    )
    assert registry.get_sample_value("ollama_meter_queue_wait_seconds_count", {"model": "m"}) == 4
    assert (bucket("0.5", "other"), bucket("1.0", "other")) == (0, 1)
    created = registry.get_sample_value("ollama_meter_queue_wait_seconds_created", {"model": "m"})
    assert created is not None
    assert started <= created <= time.time()
    text = generate_latest(registry).decode()
    assert "# TYPE ollama_meter_queue_wait_seconds histogram" in text
    openmetrics = openmetrics_latest(registry).decode()  # type: ignore[no-untyped-call]
    assert 'ollama_meter_queue_wait_seconds_created{model="other"}' in openmetrics


async def _finished(
    tasks: list[asyncio.Task[tuple[int, dict[str, str], bytes]]], count: int
) -> list[tuple[int, dict[str, str], bytes]]:
    """The first ``count`` of ``tasks`` to end (the others stay pending)."""
    done: list[tuple[int, dict[str, str], bytes]] = []
    for next_done in asyncio.as_completed(tasks):
        done.append(await next_done)
        if len(done) == count:
            return done
    raise AssertionError("not enough ended")


async def test_a_client_that_leaves_the_queue_never_reaches_ollama(
    start_fleet: FleetFactory, start_meter: MeterFactory
) -> None:
    fleet, meter = await _one_upstream(start_fleet, start_meter, Settings(), slots=1)
    upstream = fleet[0]
    held = upstream.hold_tokens(_MODEL)
    admission = _admission(meter)
    async with aiohttp.ClientSession() as http:
        first = asyncio.create_task(_post(http, meter, _body("first")))
        await upstream.wait_until(lambda: upstream.in_flight(_MODEL) == 1)
        async with aiohttp.ClientSession() as leaving:
            gone = asyncio.create_task(_post(leaving, meter, _body("gone")))
            await _until(lambda: admission.depth == 1)
        gone.cancel()  # (its session is closed: the connection went)
        await _until(lambda: admission.depth == 0)
        held.set()
        assert (await first)[0] == 200
        assert (await _post(http, meter, _body("after")))[0] == 200
    prompts = [orjson.loads(call.body)["prompt"] for call in _generates(upstream)]
    assert prompts == ["first", "after"]


async def _running_one(upstream: FakeUpstream) -> None:
    await upstream.wait_until(lambda: upstream.in_flight(_MODEL) == 1)


async def _until(predicate: Any) -> None:
    """Until ``predicate()`` holds, looked at after each turn of the loop (the proxy runs in
    this loop: every change to the queue happens in one of those turns)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("never held")


async def test_a_wait_past_max_queue_wait_is_503(
    start_fleet: FleetFactory, start_meter: MeterFactory
) -> None:
    settings = Settings(limits=LimitSettings(max_queue_wait=0.2))
    fleet, meter = await _one_upstream(start_fleet, start_meter, settings, slots=1)
    upstream = fleet[0]
    held = upstream.hold_tokens(_MODEL)
    async with aiohttp.ClientSession() as http:
        first = asyncio.create_task(_post(http, meter, _body()))
        await upstream.wait_until(lambda: upstream.in_flight(_MODEL) == 1)
        status, headers, body = await _post(http, meter, _body())
        assert status == 503
        assert "no slot within 0.2 s" in orjson.loads(body)["error"]
        assert int(headers["Retry-After"]) >= 1
        held.set()
        assert (await first)[0] == 200
    assert len(_generates(upstream)) == 1
    assert meter.value("rejected_total", reason="queue_timeout", key="anonymous") == 1


async def test_a_key_with_one_request_is_not_stuck_behind_a_key_with_a_hundred(
    start_fleet: FleetFactory, start_meter: MeterFactory, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    a, _ = append_key(keys, name="a", role="inference")
    b, _ = append_key(keys, name="b", role="inference")
    settings = Settings(
        access=AccessSettings(keys),
        limits=LimitSettings(max_queue=200, max_queued_per_key=200),
    )
    fleet, meter = await _one_upstream(start_fleet, start_meter, settings, slots=1)
    upstream = fleet[0]
    held = upstream.hold_tokens(_MODEL)
    admission = _admission(meter)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        flood = [asyncio.create_task(_post(http, meter, _body(f"a{i}"), a)) for i in range(100)]
        await _until(lambda: admission.depth == 99)
        one = asyncio.create_task(_post(http, meter, _body("b"), b))
        await _until(lambda: admission.depth == 100)
        held.set()
        assert (await one)[0] == 200
        assert all(status == 200 for status, _, _ in await asyncio.gather(*flood))
    prompts = [orjson.loads(call.body)["prompt"] for call in _generates(upstream)]
    # The one running when b came, then b: one slot turnover.
    assert prompts.index("b") == 1
    assert len(prompts) == 101


async def test_a_fleet_runs_at_most_its_slots_and_uses_both(
    start_fleet: FleetFactory, start_meter: MeterFactory
) -> None:
    fleet = await start_fleet(2, models=(_MODEL,), loaded=(_MODEL,), slots=1, time_scale=0)
    settings = parse_settings(tomllib.loads(fleet.toml()), "fleet.toml", Path("."))
    meter = await start_meter(settings)
    holds = [upstream.hold_tokens(_MODEL) for upstream in fleet]
    admission = _admission(meter)
    async with aiohttp.ClientSession() as http:
        tasks = [asyncio.create_task(_post(http, meter, _body(str(i)))) for i in range(4)]
        await _until(lambda: admission.depth == 2)
        for upstream in fleet:
            await _running_one(upstream)
        holds[1].set()  # u2 frees first: both waiting requests go there, one after the other
        await _until(lambda: admission.depth == 0)
        holds[0].set()
        results = await asyncio.gather(*tasks)
    assert [status for status, _, _ in results] == [200] * 4
    assert [u.peak[_MODEL] for u in fleet] == [1, 1]
    assert [len(_generates(u)) for u in fleet] == [1, 3]


@pytest.mark.parametrize("slots", [None, 4])
async def test_without_slots_nothing_is_gated(
    start_fleet: FleetFactory, start_meter: MeterFactory, slots: int | None
) -> None:
    fleet = await start_fleet(1, models=(_MODEL,), loaded=(_MODEL,), slots=4, time_scale=0)
    upstream = fleet[0]
    meter = await start_meter(Settings(slots=slots), upstream=upstream.url)
    held = upstream.hold_tokens(_MODEL)
    async with aiohttp.ClientSession() as http:
        tasks = [asyncio.create_task(_post(http, meter, _body())) for i in range(4)]
        await upstream.wait_until(lambda: upstream.in_flight(_MODEL) == 4)
        held.set()
        assert [s for s, _, _ in await asyncio.gather(*tasks)] == [200] * 4
    assert (ADMISSION in meter.app) is (slots is not None)


async def test_ollamas_own_503_gets_a_retry_after_behind_a_gated_upstream(
    start_fleet: FleetFactory, start_meter: MeterFactory
) -> None:
    fleet, meter = await _one_upstream(start_fleet, start_meter, Settings(), slots=1)
    upstream = fleet[0]
    upstream.busy = True
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{upstream.url}/api/generate", json=_body()) as r:
            direct = r.status, await r.read()
            assert "Retry-After" not in r.headers
        status, headers, body = await _post(http, meter, _body())
    assert (status, body) == direct
    assert direct[0] == 503
    assert headers["Retry-After"] == "1"
    assert _admission(meter).depth == 0
    assert meter.value("slots_in_use", upstream="default", model=_LABEL) == 0


async def test_a_model_only_a_down_upstream_has_is_a_counted_no_upstream(
    start_fleet: FleetFactory, start_meter: MeterFactory
) -> None:
    fleet = await start_fleet(2, models=[(_MODEL,), ("qwen3:8b",)], slots=1, time_scale=0)
    settings = parse_settings(tomllib.loads(fleet.toml()), "fleet.toml", Path("."))
    meter = await start_meter(settings)
    await fleet[0].refuse()
    async with aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(5):  # 502 while refused; after 3 in a row its breaker opens: down
            status, headers, _ = await _post(http, meter, _body())
            statuses.append(status)
        assert statuses == [502, 502, 502, 503, 503]
        assert int(headers["Retry-After"]) >= 1
    assert meter.value("rejected_total", reason="no_upstream", key="anonymous") == 2
    # The three that failed at the upstream gave their slots back.
    assert {"upstream": "u1", "model": _LABEL} in meter.series("slots_in_use")
    assert meter.value("slots_in_use", upstream="u1", model=_LABEL) == 0


async def test_a_retry_never_takes_an_upstream_past_its_slots(
    start_fleet: FleetFactory, start_meter: MeterFactory
) -> None:
    fleet = await start_fleet(2, models=(_MODEL,), loaded=(_MODEL,), slots=1, time_scale=0)
    settings = parse_settings(tomllib.loads(fleet.toml()), "fleet.toml", Path("."))
    meter = await start_meter(settings)
    held = fleet[1].hold_tokens(_MODEL)
    admission = _admission(meter)
    async with aiohttp.ClientSession() as http:
        pinned = {"X-Ollama-Meter-Upstream": "u2"}
        first = asyncio.create_task(
            http.post(f"{meter.url}/api/generate", json=_body(), headers=pinned)
        )
        await _running_one(fleet[1])
        await fleet[0].refuse()
        # To u1 (free), refused there; u2's one slot is taken: not retried there.
        status, _, _ = await _post(http, meter, _body())
        assert status == 502
        held.set()
        (await first).release()
    assert fleet[1].peak[_MODEL] == 1
    assert meter.value("slots_in_use", upstream="u1", model=_LABEL) == 0
    assert admission.depth == 0


async def test_a_router_fault_for_a_waiting_request_fails_it_alone() -> None:
    """A release looks at the waiting requests again (``choose``): a router that raises there
    fails that request, and the release, a retry's ``move`` included, still gives its slot
    back exactly once (admission.py, rule 4)."""
    admission: Admission[str] = Admission(
        {"u1": 1, "u2": 1}, lambda target: (target, "m"), 4, 30.0, 4, time.monotonic
    )
    first = admission.take_now("u1")
    assert first is not None
    assert first is not False

    def broken() -> str:
        raise RuntimeError("router fault")

    waiting = asyncio.create_task(admission.admit("k", "u1", broken))
    await _until(lambda: admission.depth == 1)
    moved = admission.move(first, "u2")  # a retry elsewhere: u1's slot back, u2's taken
    with pytest.raises(RuntimeError, match="router fault"):
        await waiting
    assert admission.depth == 0
    assert sorted(admission.slots_in_use()) == [("u1", "m", 0), ("u2", "m", 1)]
    admission.release(moved if moved is not False else None)
    assert sorted(admission.slots_in_use()) == [("u1", "m", 0), ("u2", "m", 0)]

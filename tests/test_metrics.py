"""The metric contract: names, types and labels, bounded label values, scrape-time gauges."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import string
import time
from asyncio.subprocess import PIPE, STDOUT
from pathlib import Path

import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from ollama_meter import __version__
from ollama_meter.app import METRICS, METRICS_RUNNER
from ollama_meter.exchange import Exchange
from ollama_meter.metrics import REQUEST_DURATION_BUCKETS, Metrics
from ollama_meter.ollama import Usage

from .conftest import Meter, MeterFactory, unused_port
from .fake_ollama import NDJSON, PS_MODEL, TAGS, FakeOllama, Reply, lines_of

GOLDEN = Path(__file__).parent / "golden" / "families.txt"


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        assert response.status == 200
        return await response.text()


async def drive_traffic(fake: FakeOllama, meter: Meter) -> None:
    """Requests that give every labelled family at least one series."""
    fake.script(
        "POST",
        "/api/chat",
        Reply(content_type=NDJSON, chunks=lines_of("chat_stream_midstream_error.ndjson")),
    )
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as session:
        for path, body in (
            ("/api/chat", chat),
            ("/api/chat", chat),
            ("/api/generate", {"model": "llama3.2"}),
            ("/api/chat", {**chat, "model": "llama9"}),
        ):
            async with session.post(meter.url + path, data=orjson.dumps(body)) as response:
                await response.read()


def families(text: str) -> list[str]:
    """``name type help`` of every family in an exposition, sorted."""
    return sorted(
        f"{family.name} {family.type} {family.documentation}"
        for family in text_string_to_metric_families(text)
        if family.name.startswith("ollama_meter_")
    )


async def test_exposed_families_match_the_golden_list(fake: FakeOllama, meter: Meter) -> None:
    await drive_traffic(fake, meter)
    got = families(await scrape(meter.url))
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text("\n".join(got) + "\n")
    assert got == GOLDEN.read_text().splitlines()


async def test_scrape_adds_process_metrics_and_no_created_series(meter: Meter) -> None:
    text = await scrape(meter.url)
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"process_resident_memory_bytes", "python_info", "ollama_meter_build_info"} <= names
    assert "_created" not in text


async def test_fast_rendering_equals_prometheus_client_rendering(
    fake: FakeOllama, meter: Meter
) -> None:
    await drive_traffic(fake, meter)
    await scrape(meter.url)  # fills the scrape-time gauges too
    metrics = meter.app[METRICS]
    fast = text_string_to_metric_families(metrics.render())
    registry = CollectorRegistry()
    registry.register(metrics)
    reference = text_string_to_metric_families(generate_latest(registry).decode())

    def samples(families: object) -> list[tuple[str, str, tuple[tuple[str, str], ...], float]]:
        return sorted(
            (family.name, family.type, tuple(sorted(s.labels.items())), s.value)
            for family in families  # type: ignore[attr-defined]
            for s in family.samples
        )

    expected = samples(reference)
    assert len(expected) > 100
    assert samples(fast) == expected


def test_label_values_are_escaped() -> None:
    metrics = Metrics("1.0")
    x = Exchange("POST", "/api/chat", 0.0, model='we"ird\\name\nx', status=200, finished=1.0)
    metrics.request_started(x)
    metrics.request_finished(x)
    [family] = [
        f
        for f in text_string_to_metric_families(metrics.render())
        if f.name == "ollama_meter_requests"
    ]
    assert family.samples[0].labels["model"] == 'we"ird\\name\nx'


async def test_build_info_and_upstream_gauges(meter: Meter) -> None:
    text = await scrape(meter.url)
    found = {f.name: f for f in text_string_to_metric_families(text)}
    [info] = found["ollama_meter_build_info"].samples
    assert info.labels == {"version": __version__}
    assert info.value == 1
    assert meter.value("upstream_up") == 1
    assert meter.value("loaded_models") == 1
    model = str(PS_MODEL["name"])
    assert meter.value("model_size_bytes", model=model) == PS_MODEL["size"]
    assert meter.value("model_vram_bytes", model=model) == PS_MODEL["size_vram"]
    assert meter.value("model_context_length", model=model) == PS_MODEL["context_length"]
    assert meter.value("model_expiry_timestamp_seconds", model=model) == pytest.approx(
        1795323845.123456
    )


async def test_scrape_with_upstream_down(start_meter: MeterFactory) -> None:
    meter = await start_meter(upstream=f"http://127.0.0.1:{unused_port()}")
    await scrape(meter.url)
    assert meter.value("upstream_up") == 0
    assert meter.value("loaded_models") == 0
    assert meter.series("model_size_bytes") == []


async def test_a_slow_upstream_does_not_fail_the_scrape(
    fake: FakeOllama, start_meter: MeterFactory
) -> None:
    meter = await start_meter(probe_timeout=0.2)
    never = asyncio.Event()
    fake.script("GET", "/api/ps", Reply(chunks=[b"{}"], gates={0: never}))
    await scrape(meter.url)  # returns after the probe timeout, status 200
    assert meter.value("upstream_up") == 1
    assert meter.series("model_size_bytes") == []


async def test_requests_are_counted_when_they_end(fake: FakeOllama, meter: Meter) -> None:
    lines = lines_of("chat_stream.ndjson")
    gate = asyncio.Event()
    fake.script("POST", "/api/chat", Reply(content_type=NDJSON, chunks=lines, gates={1: gate}))
    labels = {"endpoint": "/api/chat", "model": "llama3.2:latest"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            meter.url + "/api/chat", json={"model": "llama3.2", "messages": []}
        ) as response,
    ):
        await response.content.readline()
        assert meter.value("requests_in_flight", **labels) == 1
        assert meter.value("requests_total", **labels, stream="true", status="200") == 0
        gate.set()
        await response.read()
    assert meter.value("requests_in_flight", **labels) == 0
    assert meter.value("requests_total", **labels, stream="true", status="200") == 1


async def test_model_labels_are_bounded(fake: FakeOllama, start_meter: MeterFactory) -> None:
    cap = 10
    meter = await start_meter(max_models=cap)
    rng = random.Random(7)
    names = ["".join(rng.choices(string.ascii_lowercase, k=12)) for _ in range(1000)]
    async with aiohttp.ClientSession() as session:
        for name in [*names, "LLAMA3.2", "registry.ollama.ai/library/qwen3:8b", "nomic-embed-text"]:
            async with session.post(meter.url + "/api/show", json={"model": name}) as response:
                await response.read()
    models = {labels["model"] for labels in meter.series("requests_total")}
    # The first `cap` unknown names, "other" for the rest, and every listed model by name.
    assert models == {*(f"{n}:latest" for n in names[:cap]), "other", *TAGS}
    series = len(meter.series("request_duration_seconds_count"))
    assert series == len(models)


async def test_metrics_on_their_own_listener(fake: FakeOllama, start_meter: MeterFactory) -> None:
    meter = await start_meter(metrics_listen="127.0.0.1:0")
    runner = meter.app[METRICS_RUNNER]
    host, port = runner.addresses[0][:2]
    text = await scrape(f"http://{host}:{port}")
    assert "ollama_meter_build_info" in text
    # The proxy port now passes /metrics to Ollama, like any other path.
    async with aiohttp.ClientSession() as session, session.get(meter.url + "/metrics") as response:
        assert response.status == 404
        assert await response.text() == "404 page not found"
    assert fake.received[-1].path == "/metrics"


async def test_promtool_accepts_a_real_scrape(fake: FakeOllama, meter: Meter) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI (.ci/run installs Debian's prometheus)")
        pytest.skip("PROMTOOL NOT INSTALLED: apt-get install prometheus to run this check")
    await drive_traffic(fake, meter)
    text = await scrape(meter.url)
    process = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=STDOUT
    )
    output, _ = await process.communicate(text.encode())
    assert process.returncode == 0, output.decode()


#: What Prometheus 3 sends when it scrapes (its default scrape_protocols).
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)


async def test_openmetrics_with_created_times_when_prometheus_asks(
    fake: FakeOllama, meter: Meter
) -> None:
    started = time.time()
    await drive_traffic(fake, meter)
    async with aiohttp.ClientSession() as session:
        async with session.get(meter.url + "/metrics", headers={"Accept": PROMETHEUS_ACCEPT}) as r:
            assert r.headers["Content-Type"].startswith(
                "application/openmetrics-text; version=1.0.0"
            )
            openmetrics = await r.text()
        text = await scrape(meter.url)
    assert openmetrics.endswith("# EOF\n")
    # The strict OpenMetrics parser reads it, and it holds the text format's samples...
    parsed = list(openmetrics_families(openmetrics))  # type: ignore[no-untyped-call]
    ours = [f for f in parsed if f.name.startswith("ollama_meter_")]
    plain = {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for f in text_string_to_metric_families(text)
        if f.name.startswith("ollama_meter_")
        for s in f.samples
    }
    samples = {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for f in ours
        for s in f.samples
        if not s.name.endswith("_created")
    }
    assert samples == plain
    # ...and a creation time for every counter and histogram series.
    for family in ours:
        if family.type not in ("counter", "histogram"):
            continue
        series = {tuple(sorted(s.labels.items())) for s in family.samples if s.name.endswith(
            ("_total", "_count"))}  # fmt: skip
        created = {
            tuple(sorted(s.labels.items())): s.value
            for s in family.samples
            if s.name.endswith("_created")
        }
        assert set(created) == series, family.name
        assert all(started - 1 <= value <= time.time() for value in created.values())
    assert any(f.name == "ollama_meter_requests" and f.samples for f in ours)
    assert any(f.name == "process_resident_memory_bytes" for f in parsed)


def finished(**fields: object) -> Metrics:
    metrics = Metrics("1.0")
    x = Exchange("POST", "/api/chat", 0.0, model="m", status=200, **fields)  # type: ignore[arg-type]
    metrics.request_started(x)
    metrics.request_finished(x)
    return metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    registry = CollectorRegistry()
    registry.register(metrics)
    return registry.get_sample_value(name, labels)


@pytest.mark.parametrize("bound", [0.005, 0.5, 600.0])
def test_an_observation_on_a_bucket_bound_lands_in_that_bucket(bound: float) -> None:
    metrics = finished(finished=bound)
    labels = {"endpoint": "/api/chat", "model": "m", "stream": "false"}
    name = "ollama_meter_request_duration_seconds_bucket"
    assert sample(metrics, name, **labels, le=str(bound)) == 1
    below = REQUEST_DURATION_BUCKETS.index(bound) - 1
    if below >= 0:
        assert sample(metrics, name, **labels, le=str(REQUEST_DURATION_BUCKETS[below])) == 0


@pytest.mark.parametrize(
    ("reason", "label"),
    [("stop", "stop"), ("length", "length"), ("tool_calls", "other"), ("x" * 1000, "other")],
)
def test_done_reasons_are_a_bounded_set(reason: str, label: str) -> None:
    metrics = finished(finished=1.0, usage=Usage(done_reason=reason))
    name = "ollama_meter_done_total"
    assert sample(metrics, name, endpoint="/api/chat", model="m", done_reason=label) == 1

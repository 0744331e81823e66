"""Hostile review of fleet mode (issue 11): each test proves one finding over real sockets.

A test here FAILS while its finding stands (no xfail: the failure is the evidence); the two
marked "(Held up.)" pass and guard what was attacked and survived. Most severe first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import shutil
import tomllib
from asyncio.subprocess import PIPE, STDOUT
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from ollama_meter.app import FLEET
from ollama_meter.config import ConfigError
from ollama_meter.settings import AccessSettings, Settings, parse_settings

from .access_keys import make_keys
from .conftest import Meter, MeterFactory
from .fake_fleet import Call, FakeUpstream, FleetFactory
from .fake_fleet import Fleet as FakeFleet
from .fake_wire import Reply
from .test_hardening import raw_request, status_of

PIN = "X-Ollama-Meter-Upstream"
GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}
BUSY = b'{"error":"server busy, please try again.  maximum pending requests exceeded"}'


def settings(
    fleet: FakeFleet,
    *,
    headers: dict[int, dict[str, str]] | None = None,
    urls: dict[int, str] | None = None,
    admin: str | None = None,
) -> Settings:
    """The fake fleet as [[upstream]] tables (``headers``, ``urls`` by index), and
    ``[routing] admin_upstream``."""
    tables = []
    for index, u in enumerate(fleet):
        table = (
            f'[[upstream]]\nname = "{u.name}"\nurl = "{(urls or {}).get(index, u.url)}"\n'
            f"slots = {u.spec.slots}\nmax_loaded = {u.spec.max_loaded}\n"
        )
        extra = (headers or {}).get(index)
        if extra:
            pairs = ", ".join(f"{k} = {json.dumps(v)}" for k, v in extra.items())
            table += f"headers = {{ {pairs} }}\n"
        tables.append(table)
    if admin is not None:
        tables.append(f'[routing]\nadmin_upstream = "{admin}"\n')
    return parse_settings(tomllib.loads("\n".join(tables)), "fleet.toml", Path("."))


async def call(
    method: str,
    url: str,
    *,
    json: Any = None,
    data: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    """One request on a fresh session: (status, headers, body)."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, json=json, data=data, headers=headers) as response,
    ):
        return response.status, response.headers, await response.read()


def generates(upstream: FakeUpstream) -> list[Call]:
    return [c for c in upstream.calls if c.path == "/api/generate"]


def retries_of(meter: Meter, upstream: str) -> float:
    return sum(
        meter.value("upstream_retries_total", upstream=upstream, reason=reason)
        for reason in ("connect", "reset", "busy")
    )


# --- High ----------------------------------------------------------------------------------


async def test_a_retry_does_not_send_one_upstreams_configured_headers_to_another(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    """_send writes u1's ``headers`` into the request head it reuses for the retry: u2
    receives u1's token."""
    fleet = await start_fleet(2, models="llama3.2", loaded=["llama3.2", ()])
    meter = await start_meter(
        settings=settings(fleet, headers={0: {"Authorization": "Bearer secret-of-u1"}})
    )
    await fleet[0].refuse()  # u1 (hot, so chosen first) is refused: retried on u2
    status, headers, _ = await call("POST", meter.url + "/api/generate", json=GENERATE)
    assert (status, headers[PIN]) == (200, "u2")
    [sent] = generates(fleet[1])
    assert "secret-of-u1" not in sent.headers.get("Authorization", "")


async def test_a_busy_answer_to_a_request_without_a_known_model_is_not_retried_forever(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    """Go's decoder matches JSON keys case-insensitively: Ollama runs {"Model": "llama3.2"},
    the proxy sees no model. On Ollama's 503 "server busy" _send retries (it holds the
    body); Dispatch._any ignores ``exclude`` and busy answers never open a breaker, so the
    proxy resends to the busy server in a loop for as long as it stays busy (here until 100
    scripted busy answers run out): an amplifier aimed at an overloaded server."""
    fleet = await start_fleet(2, models="llama3.2")
    meter = await start_meter(settings=settings(fleet))
    for upstream in fleet:
        upstream.script("POST", "/api/generate", *[Reply.body(BUSY, status=503)] * 50)
    body = {"Model": "llama3.2", "prompt": "hi", "stream": False}
    await call("POST", meter.url + "/api/generate", json=body)
    sent = sum(upstream.count("/api/generate") for upstream in fleet)
    assert sent <= 2, f"{sent} attempts for one request"


async def test_fleet_mode_keeps_requests_inside_an_upstreams_base_path(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    """Proxy._has_base_path (the dot-segment check, inbound.check_base_path) looks only at
    the core's --upstream: an [[upstream]] url with a base path is left with ``/../``."""
    fleet = await start_fleet(2, models="llama3.2")
    urls = {0: fleet[0].url + "/ollama", 1: fleet[1].url + "/ollama"}
    meter = await start_meter(settings=settings(fleet, urls=urls))
    reply = await raw_request(
        meter.url,
        b"GET /api/../../admin HTTP/1.1\r\nHost: localhost\r\n"
        b"X-Ollama-Meter-Upstream: u1\r\nConnection: close\r\n\r\n",
    )
    escaped = [r.path for r in fleet[0].received if ".." in r.path]
    assert status_of(reply) == 400, escaped
    assert not escaped


async def test_a_blob_check_goes_where_the_blob_and_its_create_go(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    """HEAD /api/blobs is classed 'read' (policy.py), not model management, so Dispatch
    sends it to the least busy upstream, not to admin_upstream. The Go CLI's ``ollama
    create`` (api.Client.CreateBlob) asks HEAD first and uploads only on 404: when that
    other upstream has the blob, nothing reaches the upstream the create goes to."""
    fleet = await start_fleet(2, models="llama3.2")
    meter = await start_meter(settings=settings(fleet, admin="u2"))
    blob = b"GGUF" + b"\0" * 1000
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    fleet[0].blobs.add(digest)  # u1 has it; u2 (admin: where create goes) does not
    status, headers, _ = await call("HEAD", f"{meter.url}/api/blobs/{digest}")
    if status == 404:  # what CreateBlob does next
        await call("POST", f"{meter.url}/api/blobs/{digest}", data=blob)
    assert (headers.get(PIN), digest in fleet[1].blobs) == ("u2", True)


async def test_a_model_in_a_body_past_the_inspect_limit_is_not_sent_where_it_is_not(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    """A body the proxy does not read whole (past --max-inspect-bytes, or Content-Encoded)
    has no known model. It was sent to the least busy upstream, which may lack the model:
    Ollama's 404 reached the client although another one lists it. Now it is refused, saying
    why (413 here), and reaches no upstream."""
    fleet = await start_fleet(2, models=["llama3.2", "qwen3:8b"])
    meter = await start_meter(settings=settings(fleet), max_inspect_bytes=1024)
    before = [len(u.received) for u in fleet]
    body = {"model": "qwen3:8b", "prompt": "hi " * 1000, "stream": False}  # 3 kB > 1 kB
    status, _, text = await call("POST", meter.url + "/api/generate", json=body)
    assert status == 413, text
    assert b"max-inspect-bytes" in text
    assert [len(u.received) for u in fleet] == before
    assert fleet.not_found() == 0


# --- Medium --------------------------------------------------------------------------------


async def test_a_request_without_a_model_tries_each_upstream_at_most_once(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    """Rule 5: 'each eligible upstream at most once'. For a request that names no model
    (GET /api/version, HEAD /, /api/status), the retry asks Dispatch.place again with
    ``exclude``, which _any ignores: the refused upstream is tried again until its breaker
    opens (4 attempts; one request opens its breaker)."""
    fleet = await start_fleet(2, models="llama3.2")
    meter = await start_meter(settings=settings(fleet))
    await fleet[0].refuse()
    status, _, _ = await call("GET", meter.url + "/api/version")
    assert status == 200
    opened = meter.app[FLEET].by_name["u1"].breaker.is_open
    assert (retries_of(meter, "u1"), opened) == (1, False)


async def test_a_held_body_over_one_mib_is_retried_like_a_small_one(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    """Rule 5: retry 'when the proxy holds the whole request body'. A body read whole but
    over 1 MiB goes out as a generator of slices (bodies.sent), which _send does not count
    as resendable: a refused connection is a 502 although u2 could answer (a chat with one
    image is several MB)."""
    fleet = await start_fleet(2, models="llama3.2", loaded=["llama3.2", ()])
    meter = await start_meter(settings=settings(fleet))
    await fleet[0].refuse()
    doc = {**GENERATE, "images": ["A" * (2 * 1024 * 1024)]}
    sent = json.dumps(doc).encode()
    _, headers, _ = await call("POST", meter.url + "/api/generate", data=io.BytesIO(sent))
    # (The fake keeps only the first MiB of a body, so it cannot read this one's model and
    # answers 404; what matters is where it went, and that it went whole.)
    assert headers.get(PIN) == "u2"
    received = fleet[1].received[-1]
    assert (received.path, received.size) == ("/api/generate", len(sent))
    assert retries_of(meter, "u1") == 1


async def test_an_upstream_whose_tags_are_unknown_does_not_make_its_models_404(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    """An upstream that answers /api/version but not /api/tags within the probe timeout (a
    long model list on slow storage) is healthy with an empty model list: its models get a
    definitive 404 where the truth is 'not known now' (503 + Retry-After)."""
    fleet = await start_fleet(2, models=["llama3.2", "qwen3:8b"])
    slow = asyncio.Event()
    fleet[0].script("GET", "/api/tags", *[Reply(chunks=[b'{"models":[]}'], gates={0: slow})] * 2)
    try:
        meter = await start_meter(settings=settings(fleet))  # first poll: u1's tags time out
        assert meter.app[FLEET].by_name["u1"].answered
        status, _, text = await call("POST", meter.url + "/api/generate", json=GENERATE)
    finally:
        slow.set()
    assert status != 404, text


async def test_a_model_deleted_through_the_proxy_is_not_routed_there_next(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    """After a DELETE passed to u1, Dispatch.ended only starts a tags refresh in the
    background and keeps routing by the old list until it is answered: the next request
    goes to u1 (hot there by the last /api/ps) and gets u1's 404 although u2 lists the
    model. (u1's /api/tags is slow here, a gate: a long list on a busy disk.)"""
    fleet = await start_fleet(2, models="llama3.2", loaded=["llama3.2", ()])
    meter = await start_meter(settings=settings(fleet))
    slow = asyncio.Event()
    fleet[0].script("GET", "/api/tags", Reply(chunks=[b'{"models":[]}'], gates={0: slow}))
    try:
        status, _, _ = await call(
            "DELETE", meter.url + "/api/delete", json={"model": "llama3.2"}, headers={PIN: "u1"}
        )
        assert status == 200
        del fleet[0].sched.models["llama3.2:latest"]  # what the delete did on u1
        status, headers, _ = await call("POST", meter.url + "/api/generate", json=GENERATE)
    finally:
        slow.set()
    assert (status, headers.get(PIN)) == (200, "u2")


async def test_api_show_is_not_a_cold_load_and_does_not_make_a_model_hot(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    """/api/show (and GET /v1/models/{model}) route by their model, and fleet.sent/ended
    treat them as requests that load it: a 2xx counts in cold_loads_total and marks the
    model hot there (evicting the expected victim from the proxy's view), though Ollama
    loaded nothing. The Go CLI sends /api/show before every ``ollama run``."""
    fleet = await start_fleet(2, models="llama3.2")
    meter = await start_meter(settings=settings(fleet))
    status, headers, _ = await call("POST", meter.url + "/api/show", json={"model": "llama3.2"})
    assert status == 200
    state = meter.app[FLEET]
    hot = state.is_hot(state.by_name[headers[PIN]], "llama3.2:latest")
    cold = sum(s["model"] == "llama3.2:latest" for s in meter.series("cold_loads_total"))
    assert (fleet.loads(), cold, hot) == (0, 0, False)


async def test_an_upstream_header_with_a_control_character_is_refused_at_load() -> None:
    """fleet_settings refuses only CR and LF in a header value; aiohttp refuses every
    control character when sending (ValueError, not in fleet._PROBE_ERRORS): ``config
    check`` says ok, then the server dies in its first poll with a traceback."""
    doc = tomllib.loads(
        '[[upstream]]\nname = "u1"\nurl = "http://127.0.0.1:1"\n'
        'headers = { Authorization = "Bearer ${TOKEN}" }\n'
    )
    with pytest.raises(ConfigError):
        parse_settings(doc, "fleet.toml", Path("."), {"TOKEN": "abc\x7f"})


async def test_pinned_inference_does_not_poll_the_whole_fleet_each_time(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    """Dispatch.ended refreshes every upstream (version, ps, tags) after any 2xx whose
    decision is 'pinned', inference included: a client that pins its generates has the
    whole fleet polled once per request (the issue: 'after every model-management call')."""
    fleet = await start_fleet(3, models="llama3.2")
    meter = await start_meter(settings=settings(fleet))
    before = fleet[2].count("/api/tags")
    for _ in range(10):
        status, _, _ = await call(
            "POST", meter.url + "/api/generate", json=GENERATE, headers={PIN: "u1"}
        )
        assert status == 200
        await meter.app[FLEET].settle()  # any refresh it started has asked by now
    assert fleet[2].count("/api/tags") - before <= 1


async def test_unknown_model_names_do_not_each_poll_the_whole_fleet(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    """Each miss refreshes every upstream (3 requests each); misses share a refresh only
    while one is under way, with no floor between rounds: a client looping over made-up
    names has the fleet list its models as fast as it asks."""
    fleet = await start_fleet(3, models="llama3.2")
    meter = await start_meter(settings=settings(fleet))
    before = fleet[2].count("/api/tags")
    for number in range(10):
        body = {**GENERATE, "model": f"made-up-{number}"}
        status, _, _ = await call("POST", meter.url + "/api/generate", json=body)
        assert status == 404
    assert fleet[2].count("/api/tags") - before <= 2


# --- Low -----------------------------------------------------------------------------------


async def test_a_missing_model_on_legacy_embeddings_gets_ollamas_404_text(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    """/api/embeddings goes through Ollama's scheduler (handleScheduleError): 'model "x" not
    found, try pulling it first', as the fake fleet itself answers. The proxy: "model 'x'
    not found" (dispatch._PULL_FIRST lacks the route)."""
    fleet = await start_fleet(2, models="llama3.2")
    meter = await start_meter(settings=settings(fleet))
    body = {"model": "llama9", "prompt": "hi"}
    direct = await call("POST", fleet[0].url + "/api/embeddings", json=body)
    proxied = await call("POST", meter.url + "/api/embeddings", json=body)
    assert (proxied[0], json.loads(proxied[2])) == (direct[0], json.loads(direct[2]))


async def test_a_model_spelt_with_its_namespace_is_found(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    """Ollama reads ``library/llama3.2`` as ``llama3.2``: it was a 404 from the proxy. Now it
    goes to the upstream that holds llama3.2 (the fake itself does not read namespaces)."""
    fleet = await start_fleet(2, models=["qwen3:8b", "llama3.2"])
    meter = await start_meter(settings=settings(fleet))
    body = {**GENERATE, "model": "library/llama3.2"}
    _, headers, _ = await call("POST", meter.url + "/api/generate", json=body)
    assert headers.get(PIN) == "u2"


async def test_a_dead_upstreams_models_leave_the_model_gauges(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    """fleet_metrics zeroes loaded_models for an upstream that stopped answering but keeps
    exporting its last /api/ps as model_size_bytes, model_vram_bytes, ...: a dashboard sums
    the memory of a server that is gone."""
    fleet = await start_fleet(2, models="llama3.2", loaded="llama3.2")
    meter = await start_meter(settings=settings(fleet))
    await fleet[0].refuse()
    await meter.app[FLEET].poll_all(tags=False)
    assert meter.value("upstream_up", upstream="u1") == 0
    assert meter.value("loaded_models", upstream="u1") == 0
    assert not [s for s in meter.series("model_vram_bytes") if s["upstream"] == "u1"]


async def test_cold_loads_use_the_model_label_the_other_families_use(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    """cold_loads_total labels the model by model_key (case-folded), every other family by
    the name /api/tags gives: a mixed-case name (hf.co/Org/Repo:TAG) becomes two label values
    that no PromQL join matches."""
    name = "hf.co/Org/Repo-GGUF:Q4_K_M"
    fleet = await start_fleet(1, models=name)
    meter = await start_meter(settings=settings(fleet))
    await call("POST", meter.url + "/api/generate", json={**GENERATE, "model": name})
    cold = {s["model"] for s in meter.series("cold_loads_total")}
    requested = {s["model"] for s in meter.series("requests_total")}
    assert cold, "no cold load counted"
    assert cold <= requested, (cold, requested)


async def test_a_failure_is_logged_with_the_upstream_it_happened_on(
    start_meter: MeterFactory, start_fleet: FleetFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Proxy._fail and _broken log ``self._base``, the core's --upstream, which in fleet mode
    is none of the fleet (the default http://127.0.0.1:11434; here the fixture's unrelated
    fake): the operator is sent to the wrong machine. The start-up lines do the same
    ('forwarding to http://127.0.0.1:11434', 'Ollama at ... does not answer')."""
    fleet = await start_fleet(1, models="llama3.2")
    meter = await start_meter(settings=settings(fleet))
    await fleet[0].refuse()
    status, _, _ = await call("POST", meter.url + "/api/generate", json=GENERATE)
    assert status == 502
    [line] = [r.getMessage() for r in caplog.records if "connection refused" in r.getMessage()]
    assert fleet[0].url in line or "u1" in line, line


async def test_the_fleet_status_refusal_speaks_of_the_fleet_status(
    start_meter: MeterFactory, start_fleet: FleetFactory, tmp_path: Path
) -> None:
    """GET /-/fleet without a key (access control on) answers '/metrics needs an API key
    (or use --metrics-listen)': the wrong endpoint, and advice that does not apply (and a
    read key gets 'needs a admin key')."""
    fleet = await start_fleet(1, models="llama3.2")
    keys = make_keys(tmp_path)
    access = AccessSettings(keys_file=keys.path)
    meter = await start_meter(settings=dataclasses.replace(settings(fleet), access=access))
    status, _, text = await call("GET", meter.url + "/-/fleet")
    assert status == 401
    message = json.loads(text)["error"]
    assert "/metrics" not in message, message


# --- Held up -------------------------------------------------------------------------------


async def test_in_flight_counts_return_to_zero_after_mixed_failures(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    """(Held up.) Clients leaving while queued and mid-stream, busy answers everywhere, a
    retried refusal and a fleet refusing everything leave nothing counted in flight."""
    fleet = await start_fleet(2, models=("llama3.2", "qwen3:8b"), loaded=["llama3.2", ()])
    meter = await start_meter(settings=settings(fleet))
    streaming = {**GENERATE, "stream": True}
    async with aiohttp.ClientSession() as session:
        # A client leaves while its request waits for its first token (no head yet).
        gate = fleet[0].hold_tokens("llama3.2", after=0)
        task = asyncio.ensure_future(session.post(meter.url + "/api/generate", json=streaming))
        await fleet[0].wait_for("/api/generate", 1)
        task.cancel()
        await fleet[0].wait_until(lambda: fleet[0].calls[-1].cancelled)
        gate.set()
        # A client leaves mid-stream.
        gate = fleet[0].hold_tokens("llama3.2", after=1)
        response = await session.post(meter.url + "/api/generate", json=streaming)
        await response.content.readline()
        response.close()
        await fleet[0].wait_until(lambda: fleet[0].calls[-1].cancelled)
        gate.set()
    fleet[0].busy = fleet[1].busy = True  # busy everywhere: Ollama's 503 stands
    assert (await call("POST", meter.url + "/api/generate", json=GENERATE))[0] == 503
    fleet[0].busy = fleet[1].busy = False
    await fleet[0].refuse()  # refused on u1, retried on u2
    assert (await call("POST", meter.url + "/api/generate", json=GENERATE))[0] == 200
    await fleet[1].refuse()  # refused everywhere
    assert (await call("POST", meter.url + "/api/generate", json=GENERATE))[0] == 502
    # (Recorded before the client saw the end of its answer: nothing to wait for.)
    left = {
        node.name: (node.in_flight, node.in_flight_by, node.cold_by, node.loading)
        for node in meter.app[FLEET].nodes
    }
    assert all(state == (0, {}, {}, {}) for state in left.values()), left


async def test_promtool_accepts_a_fleet_scrape(
    start_meter: MeterFactory, start_fleet: FleetFactory
) -> None:
    """(Held up.) No duplicate or malformed family with fleet mode on."""
    promtool = shutil.which("promtool")
    assert promtool is not None
    fleet = await start_fleet(2, models=("llama3.2", "qwen3:8b"), loaded="llama3.2")
    meter = await start_meter(settings=settings(fleet))
    for model in ("llama3.2", "qwen3:8b"):
        await call("POST", meter.url + "/api/generate", json={**GENERATE, "model": model})
    _, _, text = await call("GET", meter.url + "/metrics")
    assert b"ollama_meter_routing_decisions_total{" in text
    process = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=STDOUT
    )
    out, _ = await process.communicate(text)
    assert process.returncode == 0, out.decode()

"""GET /-/status.json and the page's files: what the record step remembers, over real sockets.

The structure is pinned by tests/golden/status-paths.txt (every field path of a full object:
a fleet with keys, limits and the ledger on), which docs/status.md's example must match too.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from ollama_meter.app import FLEET, METRICS_RUNNER, STATUS_PAGE
from ollama_meter.ledger_app import LEDGER
from ollama_meter.ledger_settings import LedgerSettings
from ollama_meter.limit_settings import LimitSettings
from ollama_meter.settings import AccessSettings, Settings, parse_settings

from .access_keys import access_settings, make_keys
from .conftest import MeterFactory, unused_port
from .fake_fleet import FleetFactory
from .fake_ollama import MISSING_MODEL, PS_MODEL, FakeOllama
from .status_fixture import busy

GOLDEN = Path(__file__).parent / "golden"
_STREAM = {"model": "llama3.2", "prompt": "hi"}
# tests/fixtures/generate_stream.ndjson's final record.
_PROMPT, _COMPLETION, _EVAL = 32, 3, 0.042876


def paths(value: Any, prefix: str = "") -> set[str]:
    """Every field path of a JSON value: ``a.b``, ``a.list[].c`` (lists by all their items)."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, child in value.items():
            name = f"{prefix}.{key}" if prefix else key
            # config's names are the settings', not the format's.
            found |= {name} | (set() if name == "config" else paths(child, name))
    elif isinstance(value, list):
        for child in value:
            found |= paths(child, f"{prefix}[]")
    return found


async def _status(http: aiohttp.ClientSession, url: str, key: str | None = None) -> Any:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    async with http.get(f"{url}/-/status.json", headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == "application/json"
        return orjson.loads(await response.read())


async def _generate(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], key: str | None = None
) -> int:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    async with http.post(f"{url}/api/generate", json=body, headers=headers) as response:
        await response.read()
        return response.status


async def test_the_core_remembers_what_it_served(
    start_meter: MeterFactory, fake: FakeOllama
) -> None:
    meter = await start_meter()
    async with aiohttp.ClientSession() as http:
        for _ in range(4):
            assert await _generate(http, meter.url, _STREAM) == 200
        assert await _generate(http, meter.url, {"model": MISSING_MODEL, "prompt": "x"}) == 404
        doc = await _status(http, meter.url)
    assert doc["version"] == 1
    assert doc["meter"]["mode"] == "core"
    assert doc["meter"]["links"]["metrics"] == "/metrics"
    assert not doc["meter"]["access_control"]
    (upstream,) = doc["fleet"]["upstreams"]
    assert upstream["name"] == "default"
    assert upstream["url"] == fake.url
    assert upstream["up"] is True
    assert upstream["breaker"] is None
    assert upstream["slots"] is None
    assert upstream["version"] == "0.33.0"  # what the fake's /api/version says
    assert [m["name"] for m in upstream["models"]] == [PS_MODEL["name"]]
    assert upstream["models"][0]["size_bytes"] == PS_MODEL["size"]
    models = {item["name"]: item for item in doc["models"]["items"]}
    model = models["llama3.2:latest"]  # the model label, as the metrics spell it
    assert model["requests"] == 4
    # (Rates and times are rounded to 4 decimals; the window is 55-60 s, what it covers.)
    seconds = doc["models"]["window_seconds"]
    assert 55 <= seconds <= 60
    assert model["completion_tokens_per_second"] == pytest.approx(
        4 * _COMPLETION / seconds, abs=1e-4
    )
    assert model["prompt_tokens_per_second"] == pytest.approx(4 * _PROMPT / seconds, abs=1e-4)
    assert model["requests_per_second"] == pytest.approx(4 / seconds, abs=1e-4)
    assert model["generation_tokens_per_second"] == round(_COMPLETION / _EVAL, 4)
    assert model["ttft_p50_seconds"] is not None
    assert model["ttft_p50_seconds"] <= model["ttft_p95_seconds"]
    history = model["history"]
    assert len(history["requests_per_second"]) == doc["models"]["points"] == 180
    assert sum(history["requests_per_second"]) * doc["models"]["step_seconds"] == pytest.approx(4)
    total = doc["models"]["total"]
    assert total["name"] is None
    assert total["requests"] == 5
    (key,) = doc["keys"]["items"]
    assert key == {
        "key": "anonymous",
        "requests": 5,
        "prompt_tokens": 4 * _PROMPT,
        "completion_tokens": 4 * _COMPLETION,
        "refusals": 0,  # Ollama's 404 is Ollama's answer, not a refusal of the proxy
    }
    assert doc["keys"]["today"] is None
    (problem,) = doc["problems"]
    assert problem["status"] == 404
    assert problem["route"] == "/api/generate"
    assert problem["reason"] == "http_404"
    assert problem["key"] is None
    assert problem["upstream"] is None


async def test_the_full_object_has_the_documented_fields(
    start_fleet: FleetFactory, start_meter: MeterFactory, tmp_path: Path
) -> None:
    fleet = await start_fleet(3, models=("llama3.2",), loaded=("llama3.2",), slots=2, time_scale=0)
    keys = make_keys(tmp_path)
    settings = parse_settings(tomllib.loads(fleet.toml()), "fleet.toml", Path("."))
    settings = Settings(
        access=AccessSettings(keys.path),
        upstreams=settings.upstreams,
        limits=LimitSettings(),
        ledger=LedgerSettings(path=tmp_path / "ledger.db"),
    )
    meter = await start_meter(settings)
    async with aiohttp.ClientSession() as http:
        assert await _generate(http, meter.url, _STREAM, keys.inference) == 200
        assert await _generate(http, meter.url, _STREAM, keys.bad_secret()) == 401
        first = await _status(http, meter.url, keys.admin)
        assert first["keys"]["today"]["as_of"] is None  # read in the background, not yet
        assert await meter.app[LEDGER].flush()
        await meter.app[STATUS_PAGE].read_today()
        doc = await _status(http, meter.url, keys.admin)
    assert doc["keys"]["today"]["as_of"] is not None
    golden = (GOLDEN / "status-paths.txt").read_text().split()
    assert sorted(paths(doc)) == golden
    example = json.loads((GOLDEN / "status-example.json").read_text())
    assert sorted(paths(example)) == golden


async def test_with_keys_on_only_an_admin_reads_it(
    start_meter: MeterFactory, fake: FakeOllama, tmp_path: Path
) -> None:
    keys = make_keys(tmp_path)
    meter = await start_meter(access_settings(keys))
    async with aiohttp.ClientSession() as http:
        assert await _generate(http, meter.url, _STREAM, keys.inference) == 200
        assert await _generate(http, meter.url, _STREAM) == 401  # a refusal, and a problem
        for key, status in ((None, 401), (keys.bad_secret(), 401), (keys.inference, 403)):
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            async with http.get(f"{meter.url}/-/status.json", headers=headers) as response:
                assert response.status == status
                assert "error" in await response.json()
        # The page itself holds no data: no key needed to load it (it asks for one).
        async with http.get(f"{meter.url}/-/status") as response:
            assert response.status in (200, 404)  # 404 until the page's files are installed
        doc = await _status(http, meter.url, keys.admin)
    assert doc["meter"]["access_control"] is True
    by_key = {item["key"]: item for item in doc["keys"]["items"]}
    assert by_key["alice"]["requests"] == 1
    assert by_key["alice"]["refusals"] == 0
    assert by_key["anonymous"] == {
        "key": "anonymous",
        "requests": 1,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "refusals": 1,
    }
    (problem,) = doc["problems"]
    assert problem["status"] == 401
    assert problem["key"] == "anonymous"
    assert problem["reason"] == "missing"
    assert not any(k.startswith("om_") for k in json.dumps(doc).split('"'))  # no secret
    assert fake.count("/api/generate") == 1  # the refused one never reached Ollama


async def test_its_paths_never_reach_ollama_and_refuse_other_methods(
    start_meter: MeterFactory, fake: FakeOllama
) -> None:
    meter = await start_meter()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{meter.url}/-/status/no-such-file.js") as response:
            assert response.status == 404
        async with http.get(f"{meter.url}/-/status/..%2Fpage.py") as response:
            assert response.status in (400, 404)
        async with http.post(f"{meter.url}/-/status.json", data=b"{}") as response:
            assert response.status == 405
            assert response.headers["Allow"] == "GET, HEAD"
        async with http.get(
            f"{meter.url}/-/status.json", headers={"Host": "evil.example"}
        ) as response:
            assert response.status == 403  # the Host rule (DNS rebinding) applies here too
    assert [r.path for r in fake.received] == ["/api/tags"]  # (the start's, only)


async def test_it_can_be_turned_off(start_meter: MeterFactory, fake: FakeOllama) -> None:
    meter = await start_meter(status_page=False)
    async with aiohttp.ClientSession() as http, http.get(f"{meter.url}/-/status.json") as response:
        assert response.status == 404
        assert await response.text() == "404 page not found"  # Ollama's answer
    assert fake.received[-1].path == "/-/status.json"


async def test_it_is_on_the_metrics_listener_too(start_meter: MeterFactory) -> None:
    port = unused_port()
    meter = await start_meter(metrics_listen=f"127.0.0.1:{port}")
    host, bound = meter.app[METRICS_RUNNER].addresses[0][:2]
    assert bound == port
    async with aiohttp.ClientSession() as http:
        doc = await _status(http, f"http://{host}:{port}")
    assert doc["meter"]["links"]["metrics"] == f"http://127.0.0.1:{port}/metrics"


async def test_a_fleet_upstream_that_goes_away_is_down(
    start_fleet: FleetFactory, start_meter: MeterFactory
) -> None:
    fleet = await start_fleet(3, models=("llama3.2",), loaded=("llama3.2",), time_scale=0)
    meter = await start_meter(parse_settings(tomllib.loads(fleet.toml()), "fleet.toml", Path(".")))
    async with aiohttp.ClientSession() as http:
        before = await _status(http, meter.url)
        await fleet[1].refuse()
        await meter.app[FLEET].poll_all(tags=False)  # what the poller does next
        after = await _status(http, meter.url)
    assert [u["up"] for u in before["fleet"]["upstreams"]] == [True, True, True]
    assert [u["name"] for u in after["fleet"]["upstreams"]] == ["u1", "u2", "u3"]
    assert [u["up"] for u in after["fleet"]["upstreams"]] == [True, False, True]
    assert after["fleet"]["upstreams"][1]["last_error"].endswith(": connection refused")
    assert after["fleet"]["upstreams"][1]["models"] == []  # not known while it is down
    assert [u["slots"] for u in after["fleet"]["upstreams"]] == [u.spec.slots for u in fleet]


async def test_hostile_traffic_keeps_it_bounded(start_meter: MeterFactory) -> None:
    """Many model names, many errors: the rings and the problem list stay their size, and a
    raw path never shows (only route templates)."""
    meter = await start_meter(max_models=3)
    async with aiohttp.ClientSession() as http:
        for n in range(30):
            body = {"model": f"m{n}<script>" + "x" * 200, "prompt": "x"}
            assert await _generate(http, meter.url, body) == 200
            async with http.get(f"{meter.url}/api/nothing/secret-{n}-in-path") as response:
                assert response.status == 404
        doc = await _status(http, meter.url)
    assert len(doc["problems"]) == 20
    assert len(doc["models"]["items"]) <= 3 + 2  # max_models, "other" and "unknown"
    assert [p["route"] for p in doc["problems"]] == ["other"] * 20
    assert "-in-path" not in json.dumps(doc)
    recorder = meter.app[STATUS_PAGE].recorder
    assert len(recorder.models) <= 5


def test_a_busy_fleet_is_all_there() -> None:
    """20 upstreams, 100 models, 100 keys (bench/status_json.py times this one)."""
    page = busy()
    doc = orjson.loads(orjson.dumps(page.build()))
    assert sorted(paths(doc)) == (GOLDEN / "status-paths.txt").read_text().split()
    assert len(doc["fleet"]["upstreams"]) == 20
    assert [len(u["models"]) for u in doc["fleet"]["upstreams"]] == [5] * 3 + [0] + [5] * 16
    assert [u["up"] for u in doc["fleet"]["upstreams"]].count(False) == 1
    items = doc["models"]["items"]
    assert len(items) == 100
    assert [i["history"] is not None for i in items] == [True] * 10 + [False] * 90
    assert [i["completion_tokens_per_second"] for i in items] == sorted(
        (i["completion_tokens_per_second"] for i in items), reverse=True
    )
    assert sum(i["requests"] for i in items) == doc["models"]["total"]["requests"]
    assert len(doc["keys"]["items"]) == 20
    assert len(doc["keys"]["today"]["items"]) == 100
    assert len(doc["problems"]) == 20
    assert {p["reason"] for p in doc["problems"]} == {"rate"}
    # The window's numbers are the window's: the last 12 of the 5 s steps.
    ring = page.recorder.total
    last_minute = ring.last(ring.newest)[0]
    seconds = doc["models"]["window_seconds"]
    total = doc["models"]["total"]["requests_per_second"] * seconds
    assert total == pytest.approx(last_minute, abs=0.01)  # (4 decimals a second)
    each = sum(i["requests_per_second"] for i in items) * seconds
    assert each == pytest.approx(last_minute, abs=0.3)  # (100 models, each rounded)

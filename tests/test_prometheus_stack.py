"""A real Prometheus scrapes ollama-meter, then every dashboard query and rule is evaluated.

Prometheus (Debian's ``prometheus`` package, which .ci/run installs) runs with the shipped
prometheus/prometheus.yml and rules, changed only in the target address and, to keep the test
short, the scrape and evaluation intervals (1 s), without its alerting section (the stack's
Alertmanager is not there), and with the feature flags compose.yaml gives it, those this
Prometheus knows. ollama-meter runs with API keys on, clients without a key being anonymous
with the inference role, so the core's traffic is the same as without keys and the Keys row has
data, and with the usage ledger on, so that the Ledger row has data too. Traffic comes from
the official ``ollama`` client: streamed and not, several models, an error and a cancelled
stream, requests with keys and refused ones. Progress is followed by
events, not sleeps: every scrape makes ollama-meter ask the fake Ollama for /api/ps, so the
test waits for those arrivals.

The fleet variant runs the same checks on an ollama-meter with three upstreams ([[upstream]]
tables): two fakes and a port that refuses every connection. The core's traffic goes to the
first fake, pinned with X-Ollama-Meter-Upstream; the router places the rest, so the Fleet row
has hot and cold decisions, cold loads, retries (both fakes busy) and an upstream down with its
breaker open. There a scrape asks no upstream anything (it shows the poller's snapshot), so
Prometheus scrapes the meter through a counting forwarder, whose answers are the events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp
import ollama
import pytest
import yaml
from aiohttp import web
from pytest_aiohttp import AiohttpServer
from tomlkit.items import Table

from ollama_meter.app import KEYS_FILE
from ollama_meter.gateway.dispatch import PIN_HEADER
from ollama_meter.gateway.keys import append_key, edit_key
from ollama_meter.ledger_settings import LedgerSettings
from ollama_meter.limit_settings import LimitSettings
from ollama_meter.settings import Settings

from .access_keys import Keys, access_settings, make_keys
from .conftest import Meter, MeterFactory, unused_port
from .fake_ollama import NDJSON, FakeOllama, Reply, lines_of
from .test_fleet import fleet_settings
from .test_operator_kit import dashboard, fleet_names, limits_names, load_yaml

ROOT = Path(__file__).parent.parent
MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]
SCRAPE = "/api/ps"  # without a fleet, the fake sees one of these per scrape of ollama-meter
#: Ollama's answer when its queue is full (OLLAMA_MAX_QUEUE): retried on another upstream.
BUSY: Final = b'{"error":"server busy, please try again.  maximum pending requests exceeded"}'


class Scrapes(Protocol):
    async def wait(self, count: int = 1) -> None:
        """Until ``count`` more scrapes of ollama-meter have happened."""


@dataclass
class PsScrapes:
    """Without a fleet, each scrape makes ollama-meter ask the fake for /api/ps."""

    fake: FakeOllama

    async def wait(self, count: int = 1) -> None:
        arrived = self.fake.wait_for(SCRAPE, self.fake.count(SCRAPE) + count)
        await asyncio.wait_for(arrived, timeout=30)


class ScrapeCounter:
    """Between Prometheus and an ollama-meter in fleet mode: forwards each scrape (its Accept
    and Authorization headers) and counts the answers."""

    def __init__(self, target: str) -> None:
        self._target = target
        self._session: aiohttp.ClientSession | None = None
        self._answered = 0
        self._scraped = asyncio.Condition()
        self.app = web.Application()
        self.app.router.add_get("/metrics", self._metrics)
        self.app.cleanup_ctx.append(self._client)

    async def _client(self, _: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as self._session:
            yield

    async def _metrics(self, request: web.Request) -> web.Response:
        assert self._session is not None
        forwarded = {k: v for k, v in request.headers.items() if k in ("Accept", "Authorization")}
        async with self._session.get(self._target + "/metrics", headers=forwarded) as answer:
            body = await answer.read()
            kind = {"Content-Type": answer.headers["Content-Type"]}
            response = web.Response(status=answer.status, body=body, headers=kind)
        async with self._scraped:
            self._answered += 1
            self._scraped.notify_all()
        return response

    async def wait(self, count: int = 1) -> None:
        async with self._scraped:
            target = self._answered + count
            await asyncio.wait_for(
                self._scraped.wait_for(lambda: self._answered >= target), timeout=30
            )


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path)


def with_ledger(settings: Settings, directory: Path) -> Settings:
    """The usage ledger on too (flushed 5 times a second), so the Ledger row has data."""
    ledger = LedgerSettings(path=directory / "usage.sqlite", flush_interval=0.2)
    return dataclasses.replace(settings, ledger=ledger)


@pytest.fixture
async def meter(start_meter: MeterFactory, keys: Keys, tmp_path: Path) -> Meter:
    """ollama-meter with API keys on; a client without a key may run models (as anonymous);
    the usage ledger on."""
    settings = access_settings(keys, anonymous="inference")
    return await start_meter(settings=with_ledger(settings, tmp_path))


def with_key(meter: Meter, key: str) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=meter.url, headers={"Authorization": f"Bearer {key}"})


@pytest.fixture
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is required in CI (.ci/run installs Debian's prometheus)")
        pytest.skip("PROMETHEUS NOT INSTALLED: apt-get install prometheus to run this test")
    return found


@pytest.fixture
def prometheus_features(prometheus_binary: str) -> list[str]:
    """The --enable-feature values of compose.yaml's Prometheus that this one knows. Debian
    12's 2.42 predates created-timestamp-zero-ingestion (read from OpenMetrics since 2.55)."""
    command = load_yaml("compose.yaml")["services"]["prometheus"]["command"]
    wanted = [
        name
        for arg in command
        if arg.startswith("--enable-feature=")
        for name in arg.partition("=")[2].split(",")
    ]
    result = subprocess.run(
        [prometheus_binary, "--help"], capture_output=True, text=True, check=True
    )
    text = " ".join((result.stdout + result.stderr).split())
    known = {
        name.strip() for name in text.partition("Valid options:")[2].split(". See")[0].split(",")
    }
    assert "exemplar-storage" in known, "the feature list of prometheus --help was not found"
    return [name for name in wanted if name in known]


def prometheus_config(meter_address: str, credentials_file: Path | None = None) -> dict[str, Any]:
    """prometheus/prometheus.yml with the target and intervals changed, and without the
    compose stack's Alertmanager (no alert fires in this test), nothing else."""
    config: dict[str, Any] = load_yaml("prometheus/prometheus.yml")
    del config["alerting"]
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "ollama-meter"]
    job["static_configs"][0]["targets"] = [meter_address]
    job["scrape_timeout"] = "1s"
    if credentials_file is not None:  # with keys on, /metrics needs one (any role)
        job["authorization"] = {"type": "Bearer", "credentials_file": str(credentials_file)}
    return config


@asynccontextmanager
async def run_prometheus(
    binary: str, features: list[str], target: str, keys: Keys, tmp_path: Path
) -> AsyncIterator[str]:
    """Prometheus scraping ``target`` (host:port, with the read key) with the shipped rules,
    until the block ends; its base URL."""
    secret = tmp_path / "scrape.key"
    secret.write_text(keys.read)
    config = prometheus_config(target, secret)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copytree(ROOT / "prometheus" / "rules", tmp_path / "rules")
    port = unused_port()
    flags = [f"--enable-feature={','.join(features)}"] if features else []
    proc = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        *flags,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    log: list[str] = []
    drain: asyncio.Task[bytes] | None = None
    try:
        while True:
            line = (await asyncio.wait_for(proc.stderr.readline(), timeout=60)).decode()
            if not line:
                raise AssertionError("prometheus exited:\n" + "".join(log))
            log.append(line)
            if "Server is ready to receive web requests" in line:
                break
        # Keep draining its log so that it never blocks on a full pipe.
        drain = asyncio.create_task(proc.stderr.read())
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        if drain is not None:
            await drain


@pytest.fixture
async def prometheus(
    prometheus_binary: str,
    prometheus_features: list[str],
    meter: Meter,
    keys: Keys,
    tmp_path: Path,
) -> AsyncIterator[str]:
    address = meter.url.removeprefix("http://")
    async with run_prometheus(
        prometheus_binary, prometheus_features, address, keys, tmp_path
    ) as url:
        yield url


async def drive(fake: FakeOllama, meter: Meter, keys: Keys) -> None:
    """Traffic of every kind the dashboard shows."""
    async with (
        ollama.AsyncClient(host=meter.url) as client,
        with_key(meter, keys.admin) as admin,
    ):
        await _drive(fake, client, admin)
    await _drive_keys(meter, keys)


async def _drive(fake: FakeOllama, client: ollama.AsyncClient, admin: ollama.AsyncClient) -> None:
    never = asyncio.Event()
    fake.script(
        "POST",
        "/api/chat",
        Reply(content_type=NDJSON, chunks=lines_of("chat_stream.ndjson"), gates={1: never}),
    )
    # A stream the client abandons after its first chunk (counted as 499, client_disconnect).
    stream: Any = await client.chat(model="llama3.2", messages=MESSAGES, stream=True)
    async for _ in stream:
        break
    await stream.aclose()
    async for _ in await client.chat(model="llama3.2", messages=MESSAGES, stream=True):
        pass
    await client.chat(model="llama3.2", messages=MESSAGES)
    async for _ in await client.generate(model="llama3.2", prompt="Hi", stream=True):
        pass
    await client.generate(model="llama3.2", prompt="Hi")
    await client.chat(model="qwen3:8b", messages=MESSAGES, tools=[])
    await client.embed(model="nomic-embed-text", input=["a", "b"])
    await client.generate(model="llama3.2")  # a load call
    with pytest.raises(ollama.ResponseError):
        await client.chat(model="llama9", messages=MESSAGES)
    # Ollama's 500 for a model that does not fit, and a runner that dies mid-stream.
    fake.script(
        "POST",
        "/api/generate",
        Reply.body(b'{"error":"model requires more system memory than is available"}', status=500),
    )
    with pytest.raises(ollama.ResponseError):
        await client.generate(model="qwen3:8b", prompt="Hi")
    fake.script(
        "POST",
        "/api/chat",
        Reply(content_type=NDJSON, chunks=lines_of("chat_stream_midstream_error.ndjson")),
    )
    with pytest.raises(ollama.ResponseError):
        async for _ in await client.chat(model="llama3.2", messages=MESSAGES, stream=True):
            pass
    # `ollama pull` of a mistyped name: model management failing with an in-band error (an
    # admin's: anonymous clients may only run models).
    with pytest.raises(ollama.ResponseError):
        async for _ in await admin.pull("no-such-model", stream=True):
            pass


async def _drive_keys(meter: Meter, keys: Keys) -> None:
    """Requests with keys, and requests that access control refuses."""
    async with with_key(meter, keys.inference) as alice:
        async for _ in await alice.chat(model="llama3.2", messages=MESSAGES, stream=True):
            pass
        await alice.generate(model="qwen3:8b", prompt="Hi")
    async with with_key(meter, keys.limited) as limited:  # may use qwen* only
        await limited.chat(model="qwen3:8b", messages=MESSAGES)
        with pytest.raises(ollama.ResponseError) as refused:
            await limited.chat(model="llama3.2", messages=MESSAGES)
        assert refused.value.status_code == 403  # forbidden_model
    async with with_key(meter, keys.read) as reader:
        with pytest.raises(ollama.ResponseError) as refused:
            await reader.chat(model="llama3.2", messages=MESSAGES)
        assert refused.value.status_code == 403  # forbidden_route
    async with with_key(meter, keys.bad_secret()) as bad:
        with pytest.raises(ollama.ResponseError) as refused:
            await bad.chat(model="llama3.2", messages=MESSAGES)
        assert refused.value.status_code == 401  # invalid, never anonymous


async def drive_and_scrape(fake: FakeOllama, meter: Meter, keys: Keys) -> None:
    """Two rounds of traffic with scrapes between them, so every counter and histogram has
    increased between two samples and rates are not zero."""
    for _ in range(2):
        await drive(fake, meter, keys)
        await PsScrapes(fake).wait(2)


async def query(session: aiohttp.ClientSession, base: str, expr: str) -> list[dict[str, Any]]:
    async with session.get(base + "/api/v1/query", params={"query": expr}) as response:
        body = await response.json()
    assert body["status"] == "success", f"{expr}: {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def has_number(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


async def without_data(
    session: aiohttp.ClientSession, base: str, scrapes: Scrapes, records: list[str]
) -> list[str]:
    """Recording rules run on their own clock: give them scrapes until each has a number.
    Returns those that still have none."""
    for _ in range(20):
        missing = [r for r in records if not has_number(await query(session, base, r))]
        if not missing:
            break
        await scrapes.wait()
    return missing


async def labels_above_zero(
    session: aiohttp.ClientSession, base: str, expr: str, *names: str
) -> set[tuple[str, ...]]:
    """The values of ``names`` of each series of a panel query that is above 0."""
    result = await query(session, base, substitute(expr))
    return {tuple(s["metric"][n] for n in names) for s in result if float(s["value"][1]) > 0}


def substitute(expr: str, model: str = ".*") -> str:
    """Grafana's variables as Grafana would fill them with "All" (or one model)."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$instance", ".*")
        .replace("$model", model)
        .replace("$endpoint", ".*")
    )


def fleet_row(panels: list[dict[str, Any]]) -> set[str]:
    """Titles of the panels of the Fleet and Capacity rows (the fleet stack has limits and
    slots on; the core's has neither)."""
    titles, row = set(), ""
    rows = set()
    for panel in panels:
        if panel["type"] == "row":
            row = panel["title"]
        elif row.startswith(("Fleet:", "Capacity:")):
            titles.add(panel["title"])
            rows.add(row.partition(":")[0])
    assert rows == {"Fleet", "Capacity"}, "the dashboard has no Fleet or no Capacity row"
    return titles


def fleet_only(selector: str) -> bool:
    """A selector of a family that only fleet mode (or limits) exposes, or of the label the
    fleet adds."""
    name = selector.partition("{")[0]
    return name in fleet_names() | limits_names() or 'upstream!=""' in selector


async def check_every_panel_and_rule(
    session: aiohttp.ClientSession, base: str, scrapes: Scrapes, *, fleet: bool
) -> None:
    """Every rule is healthy and every panel has data; without a fleet, the Fleet row and the
    fleet's series are empty instead."""
    panels = [p for p in dashboard()["panels"] if p["type"] != "row"]
    fleet_panels = fleet_row(dashboard()["panels"])
    rules = load_yaml("prometheus/rules/ollama-meter.yml")
    records = [r for g in rules["groups"] for r in g["rules"] if "record" in r]
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]

    missing = await without_data(session, base, scrapes, [r["record"] for r in records])
    assert missing == [], f"recording rules without data: {missing}"

    async with session.get(base + "/api/v1/rules") as response:
        groups = (await response.json())["data"]["groups"]
    unhealthy = [
        (r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"
    ]
    assert unhealthy == []
    assert sum(len(g["rules"]) for g in groups) == len(records) + len(alerts)

    for alert in alerts:
        # The alert's expression is valid; the series it watches exist. (Whether it fires
        # on the right data is what promtool's rule unit tests check.)
        await query(session, base, alert["expr"])
        for selector in re.findall(
            r"\b(?:ollama_meter[a-z0-9_:]*|up)(?:\{[^}]*\})?", alert["expr"]
        ):
            result = await query(session, base, selector)
            if fleet or not fleet_only(selector):
                assert has_number(result), (alert["alert"], selector)
            else:
                assert result == [], (alert["alert"], selector)

    for panel in panels:
        for target in panel["targets"]:
            result = await query(session, base, substitute(target["expr"]))
            if fleet or panel["title"] not in fleet_panels:
                assert has_number(result), f"panel {panel['title']!r}: no data for {target['expr']}"
            else:  # as its description says
                assert result == [], f"panel {panel['title']!r} has data without a fleet"
    # One model selected instead of All: the filters are real regexes on real labels.
    chat = next(p for p in panels if p["title"] == "Requests by model")
    one = await query(session, base, substitute(chat["targets"][0]["expr"], "qwen3:8b"))
    assert [s["metric"]["model"] for s in one] == ["qwen3:8b"]

    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        selector, label = match.groups()
        async with session.get(
            f"{base}/api/v1/label/{label}/values", params={"match[]": substitute(selector)}
        ) as response:
            values = (await response.json())["data"]
        assert values, variable["name"]
        if label == "model":
            assert {"llama3.2:latest", "qwen3:8b", "nomic-embed-text:latest"} <= set(values)


async def test_dashboard_and_rules_work_on_real_data(
    fake: FakeOllama, meter: Meter, keys: Keys, prometheus: str
) -> None:
    await drive_and_scrape(fake, meter, keys)
    async with aiohttp.ClientSession() as session:
        await check_every_panel_and_rule(session, prometheus, PsScrapes(fake), fleet=False)

    # What the test drove shows up where an operator looks for it.
    assert (
        meter.value(
            "request_errors_total",
            endpoint="/api/chat",
            model="llama3.2:latest",
            reason="client_disconnect",
        )
        == 2
    )


@dataclass
class FleetStack:
    meter: Meter
    #: gpu-1 (the ``fake`` fixture) and gpu-2; gpu-3 is a port that refuses every connection.
    fakes: list[FakeOllama]
    scrapes: ScrapeCounter
    prometheus: str
    #: A key of one request a minute.
    capped: str


@pytest.fixture
async def fleet_stack(
    prometheus_binary: str,
    prometheus_features: list[str],
    start_meter: MeterFactory,
    fake: FakeOllama,
    aiohttp_server: AiohttpServer,
    keys: Keys,
    tmp_path: Path,
) -> AsyncIterator[FleetStack]:
    """ollama-meter in fleet mode, with API keys on as in the core's stack, and Prometheus
    scraping it through a ScrapeCounter."""
    second = FakeOllama()
    second.url = str((await aiohttp_server(second.app)).make_url("")).rstrip("/")
    refused = f"http://127.0.0.1:{unused_port()}"
    fleet = fleet_settings([fake.url, second.url, refused])
    # Limits and slots on (the Capacity row): one slot a model, no queue (the traffic is one
    # request at a time, but for _fill_the_queue's), and one key capped at 1 rpm.
    upstreams = tuple(dataclasses.replace(u, slots=1) for u in fleet.upstreams)
    capped, _ = append_key(keys.path, name="capped", role="inference")
    edit_key(keys.path, "capped", _one_rpm)
    access = access_settings(keys, anonymous="inference").access
    meter = await start_meter(
        settings=with_ledger(
            dataclasses.replace(
                fleet, access=access, upstreams=upstreams, limits=LimitSettings(max_queue=0)
            ),
            tmp_path,
        )
    )
    counter = ScrapeCounter(meter.url)
    forwarder = await aiohttp_server(counter.app)
    address = f"{forwarder.host}:{forwarder.port}"
    async with run_prometheus(
        prometheus_binary, prometheus_features, address, keys, tmp_path
    ) as url:
        yield FleetStack(meter, [fake, second], counter, url, capped)


def _one_rpm(table: Table) -> None:
    table["rpm"] = 1


async def drive_fleet(stack: FleetStack, keys: Keys) -> None:
    """Traffic the router places, then the core's traffic, pinned to gpu-1 (whose fake its
    scripts are for)."""
    url = stack.meter.url
    async with ollama.AsyncClient(host=url) as client:
        # The fakes' /api/ps lists llama3.2 only (with an expires_at the router may find
        # past: then it is cold too). So qwen3:8b is cold everywhere (certainly so in the
        # first round: nothing has asked for it yet), and its first request is a cold load;
        # the next one finds it hot there (a 2xx loaded it), unless a poll came in between.
        await client.chat(model="qwen3:8b", messages=MESSAGES)
        await client.chat(model="qwen3:8b", messages=MESSAGES)
        # Both busy: sent to one, retried on the other, whose 503 stands.
        for fake in stack.fakes:
            fake.script("POST", "/api/chat", Reply.body(BUSY, status=503))
        with pytest.raises(ollama.ResponseError) as busy:
            await client.chat(model="llama3.2", messages=MESSAGES)
        assert busy.value.status_code == 503
    pin = {PIN_HEADER: "gpu-1"}
    admin_key = {"Authorization": f"Bearer {keys.admin}"}
    async with (
        ollama.AsyncClient(host=url, headers=pin) as client,
        ollama.AsyncClient(host=url, headers={**pin, **admin_key}) as admin,
    ):
        await _drive(stack.fakes[0], client, admin)
    await _drive_keys(stack.meter, keys)
    async with with_key(stack.meter, stack.capped) as client:
        refusals = []
        for _ in range(2):  # one a minute: the second (and, a round later, the first) is 429
            try:
                await client.chat(model="llama3.2", messages=MESSAGES)
            except ollama.ResponseError as refused:
                refusals.append(refused.status_code)
        assert 429 in refusals
    await _fill_the_queue(stack)


async def _fill_the_queue(stack: FleetStack) -> None:
    """gpu-1's one slot taken by a held reply: the next request for it finds no room in a
    queue of 0, and gets 503 at once."""
    release = asyncio.Event()
    stack.fakes[0].script(
        "POST", "/api/chat", Reply(chunks=[lines_of("chat_stream.ndjson")[0]], gates={0: release})
    )
    url, pin = stack.meter.url, {PIN_HEADER: "gpu-1"}
    async with aiohttp.ClientSession(headers=pin) as http:
        body = {"model": "llama3.2", "messages": MESSAGES}
        held = asyncio.create_task(http.post(f"{url}/api/chat", json=body))
        await stack.fakes[0].wait_for("/api/chat", stack.fakes[0].count("/api/chat") + 1)
        async with http.post(f"{url}/api/chat", json=body) as full:
            assert full.status == 503
        release.set()
        (await held).release()


async def test_in_a_fleet_every_panel_and_rule_works_on_real_data(
    fleet_stack: FleetStack, keys: Keys
) -> None:
    stack, base = fleet_stack, fleet_stack.prometheus
    for _ in range(2):
        await drive_fleet(stack, keys)
        await stack.scrapes.wait(2)
    exprs = {
        p["title"]: p["targets"][0]["expr"] for p in dashboard()["panels"] if p["type"] != "row"
    }

    async with aiohttp.ClientSession() as session:

        async def shown(title: str, *names: str) -> set[tuple[str, ...]]:
            return await labels_above_zero(session, base, exprs[title], *names)

        async def counted(metric: str, *names: str) -> set[tuple[str, ...]]:
            return await labels_above_zero(session, base, metric, *names)

        async def by(title: str, name: str) -> dict[str, float]:
            result = await query(session, base, substitute(exprs[title]))
            return {s["metric"].get(name, ""): float(s["value"][1]) for s in result}

        # gpu-3 never answers: down at once, its breaker open after three polls.
        breaker = 'ollama_meter_upstream_breaker_open{upstream="gpu-3"} == 1'
        pending = 'ALERTS{alertname="OllamaMeterFleetUpstreamDown", alertstate="pending"}'
        assert await without_data(session, base, stack.scrapes, [breaker, pending]) == []
        await check_every_panel_and_rule(session, base, stack.scrapes, fleet=True)

        assert await by("Upstream up", "upstream") == {"gpu-1": 1, "gpu-2": 1, "gpu-3": 0}
        assert await by("Breaker open", "upstream") == {"gpu-1": 0, "gpu-2": 0, "gpu-3": 1}
        assert await by("Loaded models by upstream", "upstream") == {
            "gpu-1": 1,
            "gpu-2": 1,
            "gpu-3": 0,
        }
        # The rows without an upstream label read the fleet as a whole: it still serves, and
        # holds two models.
        assert await by("Upstream", "upstream") == {"": 1}
        assert await by("Loaded models", "upstream") == {"": 2}
        assert {"gpu-1", "gpu-2"} == {
            s["metric"]["upstream"]
            for s in await query(session, base, substitute(exprs["VRAM vs size"]))
        }

        # The fleet's counters have a series per combination that happened, from when it first
        # did: a rate shows a combination that recurred (pinned, on gpu-1, in both rounds),
        # the counters themselves every one.
        assert ("gpu-1", "pinned") in await shown("Routing decisions", "upstream", "decision")
        decisions = await counted("ollama_meter_routing_decisions_total", "upstream", "decision")
        assert {d for _, d in decisions} >= {"pinned", "hot", "cold", "retry"}
        assert {u for u, d in decisions if d == "pinned"} == {"gpu-1"}
        assert {u for u, _ in decisions} == {"gpu-1", "gpu-2"}  # the busy pair: one each
        retries = await counted("ollama_meter_upstream_retries_total", "upstream", "reason")
        assert {r for _, r in retries} == {"busy"}
        # Only gpu-1 was asked for nomic-embed-text (pinned), where it was not loaded.
        loads = await counted("ollama_meter_cold_loads_total", "upstream", "model")
        assert ("gpu-1", "nomic-embed-text:latest") in loads
        assert "qwen3:8b" in {m for _, m in loads}
        assert {u for u, _ in loads} <= {"gpu-1", "gpu-2"}

        # One upstream down while the others answer: the fleet's warning for it (pending, for
        # its 2 minutes), and not the critical alert of a meter without a working upstream.
        [alert] = await query(session, base, pending)
        assert alert["metric"]["upstream"] == "gpu-3"
        assert await query(session, base, 'ALERTS{alertname="OllamaMeterUpstreamDown"}') == []

    assert (
        stack.meter.value(
            "request_errors_total",
            endpoint="/api/chat",
            model="llama3.2:latest",
            reason="client_disconnect",
        )
        == 2
    )


async def test_the_keys_row_says_who_used_ollama_and_who_was_refused(
    fake: FakeOllama, meter: Meter, keys: Keys, prometheus: str
) -> None:
    await drive_and_scrape(fake, meter, keys)
    exprs = {
        p["title"]: p["targets"][0]["expr"] for p in dashboard()["panels"] if p["type"] != "row"
    }

    async with aiohttp.ClientSession() as session:

        async def shown(title: str, *names: str) -> set[tuple[str, ...]]:
            return await labels_above_zero(session, prometheus, exprs[title], *names)

        # Clients without a key are anonymous; the admin only pulled, which reports no tokens.
        assert await shown("Top keys by tokens", "key") == {
            ("anonymous",),
            ("alice",),
            ("limited",),
        }
        assert await shown("Requests by key and status class", "key", "status_class") == {
            ("anonymous", "2xx"),
            ("anonymous", "4xx"),  # Ollama's 404 for llama9, and the key that did not work
            ("anonymous", "5xx"),
            ("anonymous", "499"),
            ("admin", "2xx"),  # the pull: its error came in-band, after a 200
            ("alice", "2xx"),
            ("limited", "2xx"),
            ("limited", "4xx"),
            ("reader", "4xx"),
        }
        assert await shown("Refused (4xx) by key", "key") == {
            ("anonymous",),
            ("limited",),
            ("reader",),
        }
        assert await shown("Auth failures by reason", "reason") == {
            ("invalid",),
            ("forbidden_route",),
            ("forbidden_model",),
        }
        [configured] = await query(session, prometheus, substitute(exprs["Keys configured"]))
        assert float(configured["value"][1]) == meter.value("keys_configured") == 6
        errors = substitute(exprs["Keys file reload errors"])
        assert await labels_above_zero(session, prometheus, errors) == set()

        # The keys file stops loading: the keys in force stay, and the alert says so (pending:
        # its one minute has not passed).
        reloaded = meter.app[KEYS_FILE].next_reload()
        keys.path.write_text(keys.path.read_text() + "\n[[key]]\nname = 'x'\n")
        await asyncio.wait_for(reloaded.wait(), timeout=10)
        assert meter.value("config_reloads_total", result="error") == 1
        alert = 'ALERTS{alertname="OllamaMeterKeysReloadFailed", alertstate="pending"}'
        assert await without_data(session, prometheus, PsScrapes(fake), [alert]) == []
        [pending] = await query(session, prometheus, alert)
        assert pending["metric"]["instance"] == meter.url.removeprefix("http://")
        assert await labels_above_zero(session, prometheus, errors) == {()}


async def test_cancellations_and_model_management_are_not_inference_errors(
    fake: FakeOllama, meter: Meter, keys: Keys, prometheus: str
) -> None:
    await drive_and_scrape(fake, meter, keys)
    panels = {p["title"]: p for p in dashboard()["panels"] if p["type"] != "row"}

    async def panel_labels(session: aiohttp.ClientSession, title: str, *names: str) -> set[Any]:
        [target] = panels[title]["targets"]
        return await labels_above_zero(session, prometheus, target["expr"], *names)

    async with aiohttp.ClientSession() as session:
        # The abandoned chat stream is a cancellation, on its own panel, in no error ratio.
        assert await panel_labels(session, "Error ratio by reason", "reason") == {("stream_error",)}
        assert await panel_labels(session, "Cancellations", "endpoint", "model") == {
            ("/api/chat", "llama3.2:latest")
        }
        # The failed pull is a model-management failure...
        assert await panel_labels(session, "Model-management failures", "endpoint", "reason") == {
            ("/api/pull", "stream_error")
        }
        # ...and no inference stream breaking off: only the chat that died mid-stream is.
        ratio = "ollama_meter:stream_error_ratio:rate10m"
        assert await without_data(session, prometheus, PsScrapes(fake), [ratio]) == []
        result = await query(session, prometheus, ratio)
        assert {s["metric"]["model"] for s in result} == {"llama3.2:latest"}

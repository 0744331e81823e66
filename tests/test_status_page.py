"""The status page (/-/status) in a real browser: headless Chromium driven by Playwright.

Most tests serve the page's static files and a status.json the test controls from a stub of
the backend's three routes (docs/status.md), so that each behaviour of the page (hostile text,
a newer version, a lost proxy, the key prompt, a large fleet) is shown on exact data. The last
test runs the real ollama-meter process in front of a fake fleet of three upstreams with
traffic flowing. Waits are Playwright's (expect, wait_for_function), never sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import re
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from playwright.async_api import Browser, BrowserContext, Locator, Page, expect
from pytest_aiohttp import AiohttpServer

import ollama_meter

from .access_keys import Keys, make_keys
from .conftest import unused_port
from .fake_fleet import Fleet, FleetFactory
from .real_browser import SCREENSHOT_README, BrowserThread, Console, artifacts_dir, in_loop

STATIC = Path(ollama_meter.__file__).parent / "status" / "static"
EXAMPLE = Path(__file__).parent / "golden" / "status-example.json"
README_PNG = Path(__file__).parent.parent / "docs" / "status.png"

POLL_MS = 2000  # status.js's
WAIT_MS = 15_000  # a generous ceiling for each wait on a loaded 2-core machine, never a pace
expect.set_options(timeout=WAIT_MS)

HOSTILE = '<img src=x onerror="window.__pwned=1"><b>bold</b>'

Json = dict[str, Any]


def example(now: float | None = None) -> Json:
    """The documented example, its times moved so that it was generated ``now``."""
    data: Json = orjson.loads(EXAMPLE.read_bytes())
    now = time.time() if now is None else now
    shift = now - data["generated_at"]

    def moved(value: float | None) -> float | None:
        return None if value is None else value + shift

    data["generated_at"] = now
    data["meter"]["started_at"] = moved(data["meter"]["started_at"])
    for upstream in data["fleet"]["upstreams"]:
        upstream["last_poll"] = moved(upstream["last_poll"])
        for model in upstream["models"]:
            model["expires_at"] = moved(model["expires_at"])
    data["models"]["history_end"] = now
    today = data["keys"]["today"]
    today["since"] = now - now % 86400
    today["as_of"] = moved(today["as_of"])
    for problem in data["problems"]:
        problem["time"] = moved(problem["time"])
    return data


class StubProxy:
    """GET /-/status, /-/status/{name} and /-/status.json as docs/status.md gives them."""

    def __init__(self, data: Json, prefix: str = "") -> None:
        self.data = data
        self.key: str | None = None  # set: access control on, with this admin key
        self.failing: int | None = None  # set: status.json answers this status
        self.hold: asyncio.Event | None = None  # set: status.json waits for it
        self.authorizations: list[str | None] = []
        self.paths: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.url = ""
        self.app = web.Application()
        # prefix: as a reverse proxy in front would mount it, at a sub path.
        self.app.router.add_get(f"{prefix}/-/status", self._file)
        self.app.router.add_get(f"{prefix}/-/status.json", self._json)
        self.app.router.add_get(f"{prefix}/-/status/{{name}}", self._file)
        self.app.router.add_route("*", "/{tail:.*}", self._other)

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.path_qs)
        name = request.match_info.get("name", "index.html")
        path = STATIC / name
        if name.startswith(".") or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def _other(self, request: web.Request) -> web.StreamResponse:
        # What a real proxy would pass to Ollama: the page must never ask for it.
        self.paths.append(request.path_qs)
        raise web.HTTPNotFound()

    async def _json(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.path_qs)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.hold is not None:
                await self.hold.wait()
            authorization = request.headers.get("Authorization")
            self.authorizations.append(authorization)
            if self.key is not None:
                if authorization is None:
                    return web.json_response(
                        {"error": "ollama-meter: this needs an admin key"},
                        status=401,
                        headers={"WWW-Authenticate": 'Bearer realm="ollama-meter"'},
                    )
                if authorization != f"Bearer {self.key}":
                    return web.json_response(
                        {"error": "ollama-meter: not an admin key"}, status=403
                    )
            if self.failing is not None:
                return web.json_response({"error": "broken"}, status=self.failing)
            return web.Response(body=orjson.dumps(self.data), content_type="application/json")
        finally:
            self.in_flight -= 1


@pytest.fixture
async def stub(aiohttp_server: AiohttpServer) -> StubProxy:
    proxy = StubProxy(example())
    server = await aiohttp_server(proxy.app)
    proxy.url = str(server.make_url("/-/status"))
    return proxy


@pytest.fixture(scope="module")
def browser() -> Iterator[BrowserThread]:
    thread = BrowserThread()
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return artifacts_dir(tmp_path_factory)


async def open_page(
    browser: Browser, url: str, *, width: int = 1280, dark: bool = False, clock: bool = True
) -> tuple[BrowserContext, Page, Console]:
    """A page in a fresh context (its own session storage). With ``clock``, the page's timers
    run only when the test moves its clock (``next_poll``): no test waits for 2 s to pass."""
    context = await browser.new_context(
        viewport={"width": width, "height": 900}, color_scheme="dark" if dark else "light"
    )
    page = await context.new_page()
    console = Console(page)
    if clock:
        await page.clock.install()
    await page.goto(url)
    return context, page, console


async def idle(page: Page) -> int:
    """Wait until no fetch is under way; the number of fetches done."""
    root = page.locator("html")
    await expect(root).to_have_attribute("data-fetching", "no")
    return int(await root.get_attribute("data-polls") or "0")


async def next_poll(page: Page) -> None:
    """Move the page's clock to its next poll, and wait for that poll to end."""
    done = await idle(page)
    await page.clock.run_for(POLL_MS)
    await expect(page.locator("html")).to_have_attribute("data-polls", str(done + 1))
    await idle(page)


async def live(page: Page) -> None:
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")


def upstream_state(page: Page, name: str) -> Locator:
    return page.locator(f'#upstreams [data-upstream="{name}"] [data-role="state"]')


async def no_page_scroll(page: Page) -> None:
    """The page itself never scrolls sideways (tables scroll in their own box)."""
    overflow = await page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"the page scrolls sideways by {overflow} px"


async def check_example(page: Page, stub: StubProxy) -> None:
    """What the documented example must show."""
    fleet = page.locator("#upstreams")
    await expect(fleet.locator("[data-upstream]")).to_have_count(3)
    await expect(upstream_state(page, "gpu-a")).to_have_text("up")
    await expect(upstream_state(page, "gpu-b")).to_have_text("up")
    await expect(upstream_state(page, "gpu-c")).to_have_text("down")
    gpu_a = fleet.locator('[data-upstream="gpu-a"]')
    await expect(gpu_a).to_contain_text("breaker closed")
    await expect(gpu_a).to_contain_text("slots 4 in use (4 per model)")
    await expect(gpu_a.locator("[data-model]")).to_have_count(2)
    qwen = gpu_a.locator('[data-model="qwen2.5:7b"]')
    await expect(qwen).to_contain_text("5.3 GiB · 1/4 slots · unloads in 35 s")
    await expect(qwen.locator(".vram")).to_have_attribute("aria-label", "53% in VRAM")
    await expect(gpu_a.locator('[data-model="llama3.2:1b"]')).to_contain_text("unloads in 4 min")
    await expect(fleet.locator('[data-upstream="gpu-c"]')).to_contain_text("connection refused")
    await expect(fleet.locator('[data-upstream="gpu-c"]')).to_contain_text("breaker open")
    await expect(page.locator("#queue")).to_have_text(
        "2 of 3 upstreams up · queue 3 of 64, waits up to 30.0 s"
    )

    models = page.locator("#models-body tr")
    await expect(models).to_have_count(3)
    await expect(models.first).to_contain_text("llama3.2:1b")
    await expect(page.locator("#models-total")).to_contain_text("all models")
    await expect(page.locator("#models-total")).to_contain_text("310 ms")
    # The total and the two models with history get charts; nomic-embed-text has none.
    charts = page.locator("#charts .chart-card")
    await expect(charts).to_have_count(3)
    titles = [await chart.get_attribute("data-chart") for chart in await charts.all()]
    assert titles == ["all models", "llama3.2:1b", "qwen2.5:7b"]
    # 180 steps, the first 20 empty: 160 values a series.
    await expect(page.locator('#charts .chart[data-kind="load"]').first).to_have_attribute(
        "data-points", "320"
    )
    await expect(page.locator("#charts canvas")).to_have_count(6)

    await expect(page.locator("#keys-note")).to_have_text("the 3 busiest keys of the last hour")
    await expect(page.locator("#keys-body tr")).to_have_count(3)
    await expect(page.locator("#keys-body tr").first).to_contain_text("alice")
    await expect(page.locator("#today")).to_be_visible()
    await expect(page.locator("#today-body tr")).to_have_count(2)
    await expect(page.locator("#problems-body tr")).to_have_count(3)
    await expect(page.locator("#problems-body tr").first).to_contain_text("429")
    await expect(page.locator("#config-list .setting")).to_have_count(len(stub.data["config"]))
    await expect(page.locator("#summary")).to_contain_text("v0.1.0 · up 2 h 2 min · fleet")
    # /metrics is the proxy's own path: reached relative to the page (a sub path works).
    await expect(page.locator("#metrics-link")).to_have_attribute("href", "../metrics")
    href = await page.eval_on_selector("#metrics-link", "a => a.href")
    assert href == stub.url.removesuffix("/-/status") + "/metrics"


async def test_page_shows_the_example(
    browser: BrowserThread, stub: StubProxy, artifacts: Path
) -> None:
    async def scenario(browser: Browser) -> None:
        context, page, console = await open_page(browser, stub.url)
        await live(page)
        await check_example(page, stub)
        await page.screenshot(path=artifacts / "status-light.png", full_page=True)
        if SCREENSHOT_README:
            await page.screenshot(path=README_PNG)

        # Sorting the models table, by name then the other way.
        models = page.locator("#models-body tr")
        await page.locator('button[data-sort="name"]').click()
        await expect(models.first).to_contain_text("llama3.2:1b")
        await expect(models.last).to_contain_text("qwen2.5:7b")
        await page.locator('button[data-sort="name"]').click()
        await expect(models.first).to_contain_text("qwen2.5:7b")
        await page.locator('button[data-sort="ttft_p95_seconds"]').click()
        await expect(models.first).to_contain_text("qwen2.5:7b")
        await expect(models.last).to_contain_text("nomic-embed-text")  # null: last

        # It polls: a change of the data shows at the next poll.
        stub.data = example()
        stub.data["fleet"]["upstreams"][2]["up"] = True
        await next_poll(page)
        await expect(upstream_state(page, "gpu-c")).to_have_text("up")
        # Relative URLs only, and nothing but the page's own files and its data.
        assert all(path.startswith("/-/status") for path in stub.paths), stub.paths
        assert set(stub.authorizations) == {None}

        # The system turns dark: the page follows, charts redrawn in the dark colours.
        stub.data = example()
        await next_poll(page)
        await page.emulate_media(color_scheme="dark")
        await expect(page.locator("#charts")).to_have_attribute("data-theme", "dark")
        await expect(page.locator("#charts canvas")).to_have_count(6)
        background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(21, 23, 28)"
        await page.screenshot(path=artifacts / "status-dark.png", full_page=True)
        assert console.take() == []
        await context.close()

        context, page, console = await open_page(browser, stub.url, width=390)
        await live(page)
        await expect(page.locator("#upstreams [data-upstream]")).to_have_count(3)
        await expect(page.locator("#charts canvas")).to_have_count(6)
        await no_page_scroll(page)
        await page.screenshot(path=artifacts / "status-phone.png", full_page=True)
        assert console.take() == []
        await context.close()

    await browser.run(scenario)


async def test_text_from_the_data_is_never_markup(browser: BrowserThread, stub: StubProxy) -> None:
    data = stub.data
    data["fleet"]["upstreams"][0]["models"][0]["name"] = HOSTILE
    data["fleet"]["upstreams"][2]["last_error"] = f"<script>window.__pwned=2</script>{HOSTILE}"
    data["models"]["items"][0]["name"] = HOSTILE
    data["keys"]["items"][0]["key"] = HOSTILE
    data["problems"][0]["model"] = HOSTILE
    data["config"]["listen"] = HOSTILE
    data["meter"]["links"]["metrics"] = "javascript:window.__pwned=3"

    async def scenario(browser: Browser) -> None:
        context, page, console = await open_page(browser, stub.url)
        await live(page)
        await expect(page.locator("#models-body tr").first).to_contain_text(HOSTILE)
        await expect(page.locator("#charts .chart-card").nth(1)).to_have_attribute(
            "data-chart", HOSTILE
        )
        await expect(page.locator("#keys-body")).to_contain_text(HOSTILE)
        await expect(page.locator("#upstreams")).to_contain_text("<script>window.__pwned=2")
        await expect(page.locator("#config-list")).to_contain_text(HOSTILE)
        await expect(page.locator("#links")).to_contain_text("Prometheus metrics: not served")
        for tag in ("img", "b", "script", "a"):
            assert await page.locator(f"#content {tag}").count() == 0, tag
        assert await page.evaluate("window.__pwned") is None
        assert console.take() == []
        await context.close()

    await browser.run(scenario)


def core(data: Json) -> Json:
    """The example as one upstream without a config file, keys or ledger would give it."""
    upstream = data["fleet"]["upstreams"][0]
    upstream.update(name="default", breaker=None, slots=None, max_loaded=None)
    data["fleet"] = {
        "queue": {"depth": 0, "max": None, "max_wait_seconds": None},
        "upstreams": [upstream],
    }
    data["meter"].update(mode="core", access_control=False, limits=False, ledger=False)
    data["keys"]["items"] = [dict(data["keys"]["items"][0], key="anonymous")]
    data["keys"]["today"] = None
    data["problems"] = []
    return data


async def test_one_upstream(browser: BrowserThread, stub: StubProxy) -> None:
    stub.data = core(stub.data)

    async def scenario(browser: Browser) -> None:
        context, page, console = await open_page(browser, stub.url)
        await live(page)
        card = page.locator('#upstreams [data-upstream="default"]')
        await expect(card).to_contain_text("slots not gated")
        await expect(card.locator(".pill")).to_have_count(1)  # up; no breaker
        await expect(card.locator('[data-model="qwen2.5:7b"]')).to_contain_text("1 in flight")
        await expect(page.locator("#queue")).to_have_text(
            "1 of 1 upstreams up · no queue (no upstream is gated)"
        )
        await expect(page.locator("#summary")).to_have_text("v0.1.0 · up 2 h 2 min · one upstream")
        await expect(page.locator("#today")).to_be_hidden()
        await expect(page.locator("#problems-body")).to_have_text("no errors or refusals")
        await expect(page.locator("#forget-key")).to_be_hidden()
        assert console.take() == []
        await context.close()

    await browser.run(scenario)


async def test_behind_a_sub_path(browser: BrowserThread, aiohttp_server: AiohttpServer) -> None:
    stub = StubProxy(example(), prefix="/ollama")
    server = await aiohttp_server(stub.app)
    url = str(server.make_url("/ollama/-/status"))

    async def scenario(browser: Browser) -> None:
        context, page, console = await open_page(browser, url)
        await live(page)
        await expect(page.locator("#charts canvas")).to_have_count(6)
        href = await page.eval_on_selector("#metrics-link", "a => a.href")
        assert href == str(server.make_url("/ollama/metrics"))
        assert all(path.startswith("/ollama/-/status") for path in stub.paths), stub.paths
        assert console.take() == []
        await context.close()

    await browser.run(scenario)


async def test_a_newer_version_is_not_shown(browser: BrowserThread, stub: StubProxy) -> None:
    stub.data["version"] = 2

    async def scenario(browser: Browser) -> None:
        context, page, console = await open_page(browser, stub.url)
        banner = page.locator("#banner")
        await expect(banner).to_have_text(
            "This page knows version 1 of status.json; the proxy sent version 2. Reload the "
            "page (an old copy may be cached), or use the page of the same ollama-meter release."
        )
        await expect(page.locator("#connection")).to_have_attribute("data-state", "version")
        await expect(page.locator("#content")).to_be_hidden()
        assert await page.locator("#upstreams > *").count() == 0
        # Back to version 1 (the proxy was downgraded): it shows again.
        stub.data["version"] = 1
        await next_poll(page)
        await live(page)
        await expect(banner).to_be_hidden()
        await expect(page.locator("#upstreams > *")).to_have_count(3)
        # Not a version at all: nothing shown either.
        stub.data["version"] = "1"
        await next_poll(page)
        await expect(banner).to_contain_text("a version this page does not know")
        await expect(page.locator("#content")).to_be_hidden()
        assert console.take() == []
        await context.close()

    await browser.run(scenario)


async def test_a_lost_proxy_keeps_the_last_data(browser: BrowserThread, stub: StubProxy) -> None:
    loop = asyncio.get_running_loop()
    hold = asyncio.Event()

    async def scenario(browser: Browser) -> None:
        context, page, console = await open_page(browser, stub.url)
        await live(page)
        connection = page.locator("#connection")
        content = page.locator("#content")

        stub.failing = 500
        await next_poll(page)
        await expect(connection).to_have_attribute("data-state", "unreachable")
        await expect(connection).to_contain_text("the proxy answered HTTP 500: broken")
        await expect(page.locator("#upstreams > *")).to_have_count(3)
        await expect(content).to_have_class("stale")
        stub.failing = None
        await next_poll(page)
        await live(page)
        await expect(content).not_to_have_class("stale")
        # The failed fetch is the one console error (Chromium logs every failed load).
        assert [error for error in console.take() if "500" not in error] == []

        # A fetch that hangs: "stale" once the data is 7 s old, no second fetch meanwhile.
        stub.hold = hold
        await idle(page)
        await page.clock.run_for(POLL_MS)
        await expect(page.locator("html")).to_have_attribute("data-fetching", "yes")
        await page.clock.run_for(5500)
        await expect(connection).to_have_attribute("data-state", "stale")
        await expect(connection).to_contain_text("stale: no new data for")
        # After 8 s the page gives up on that fetch, and says so.
        await page.clock.run_for(2500)
        await expect(connection).to_contain_text("the proxy did not answer within 8 s")
        assert stub.most_in_flight == 1
        stub.hold = None
        loop.call_soon_threadsafe(hold.set)
        await next_poll(page)
        await live(page)

        # The proxy gone altogether: "cannot reach the proxy", the data kept.
        await page.route("**/status.json", lambda route: route.abort("connectionrefused"))
        await next_poll(page)
        await expect(connection).to_have_text("cannot reach the proxy; showing data from 2 s ago")
        await expect(page.locator("#upstreams > *")).to_have_count(3)
        await context.close()

    await browser.run(scenario)


async def test_the_admin_key_prompt(browser: BrowserThread, stub: StubProxy) -> None:
    stub.key = "om_right_key"

    async def scenario(browser: Browser) -> None:
        context, page, console = await open_page(browser, stub.url)
        form = page.locator("#key-form")
        message = page.locator("#key-message")
        await expect(form).to_be_visible()
        await expect(message).to_have_text("Access control is on: the status needs an admin key.")
        await expect(page.locator("#content")).to_be_hidden()

        await page.locator("#key-input").fill("om_wrong_key")
        await page.locator("#key-form button").click()
        await expect(message).to_have_text(
            "Key refused: ollama-meter: not an admin key. Enter an admin key."
        )
        await expect(message).to_have_class("key-message refused")
        await expect(form).to_be_visible()
        assert await page.evaluate("sessionStorage.length") == 0

        await page.locator("#key-input").fill("om_right_key")
        await page.locator("#key-input").press("Enter")
        await live(page)
        await expect(form).to_be_hidden()
        await expect(page.locator("#upstreams > *")).to_have_count(3)
        stored = await page.evaluate("sessionStorage.getItem('ollama-meter.status.key')")
        assert stored == "om_right_key"
        # A reload keeps the key (the same tab); it is sent as a header, never in a URL.
        await page.reload()
        await live(page)
        assert stub.authorizations == [
            None,
            "Bearer om_wrong_key",
            "Bearer om_right_key",
            "Bearer om_right_key",
        ]
        assert not any("om_" in path for path in stub.paths)
        assert page.url == stub.url

        await page.locator("#forget-key").click()
        await expect(form).to_be_visible()
        await expect(message).to_have_text("Access control is on: the status needs an admin key.")
        await expect(page.locator("#content")).to_be_hidden()
        assert await page.evaluate("sessionStorage.length") == 0
        # Chromium logs each 401 and 403 it got as a failed load; nothing else.
        assert [e for e in console.take() if "401" not in e and "403" not in e] == []
        await context.close()

    await browser.run(scenario)


def large(data: Json) -> Json:
    """20 upstreams of 5 loaded models, 100 models (10 with history), 20 keys, 20 problems."""
    upstream = data["fleet"]["upstreams"][0]
    loaded = upstream["models"][0]
    data["fleet"]["upstreams"] = [
        dict(
            upstream,
            name=f"gpu-{i:02d}",
            url=f"http://10.0.1.{i}:11434",
            up=i % 7 != 3,
            models=[dict(loaded, name=f"model-{i * 5 + j:03d}:latest") for j in range(5)],
        )
        for i in range(20)
    ]
    item = data["models"]["items"][0]
    data["models"]["items"] = [
        dict(item, name=f"model-{i:03d}:latest", history=item["history"] if i < 10 else None)
        for i in range(100)
    ]
    key = data["keys"]["items"][0]
    data["keys"]["items"] = [dict(key, key=f"key-{i:02d}") for i in range(20)]
    data["problems"] = [copy.deepcopy(data["problems"][0]) for _ in range(20)]
    return data


async def test_a_large_fleet_stays_readable(
    browser: BrowserThread, stub: StubProxy, artifacts: Path
) -> None:
    stub.data = large(stub.data)

    async def scenario(browser: Browser) -> None:
        context, page, console = await open_page(browser, stub.url, width=390)
        await live(page)
        await expect(page.locator("#upstreams > *")).to_have_count(20)
        await expect(page.locator("#upstreams [data-model]")).to_have_count(100)
        await expect(page.locator("#models-body tr")).to_have_count(100)
        await expect(page.locator("#charts .chart-card")).to_have_count(11)
        await expect(page.locator("#problems-body tr")).to_have_count(20)
        await no_page_scroll(page)
        await page.screenshot(path=artifacts / "status-large-phone.png")
        await page.set_viewport_size({"width": 1280, "height": 900})
        await expect(page.locator("#upstreams > *")).to_have_count(20)
        await page.screenshot(path=artifacts / "status-large.png")
        assert console.take() == []
        await context.close()

    await browser.run(scenario)


# ---- The real proxy ------------------------------------------------------------------------


class RealProxy:
    """``python -m ollama_meter`` in front of the fake fleet, with access control on."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str) -> None:
        self.proc = proc
        self.url = url
        self.log: list[str] = []

    async def started(self) -> None:
        assert self.proc.stderr is not None
        async with asyncio.timeout(30):
            while True:
                line = (await self.proc.stderr.readline()).decode()
                if not line:
                    raise AssertionError(f"ollama-meter ended: {''.join(self.log)}")
                self.log.append(line)
                if "listening on" in line:
                    return

    async def drain(self) -> None:
        """Keep reading its log, so that a full pipe never stops it."""
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log.append(line.decode())


@pytest.fixture
async def real_proxy(
    start_fleet: FleetFactory, tmp_path: Path
) -> AsyncIterator[tuple[RealProxy, Fleet, Keys]]:
    models: list[str | tuple[str, ...]] = [("llama3.2", "qwen3:8b"), ("llama3.2",), ("qwen3:8b",)]
    fleet = await start_fleet(3, models=models, loaded=models, slots=2, tokens=4, token_delay=0.02)
    keys = make_keys(tmp_path)
    config = tmp_path / "fleet.toml"
    config.write_text(fleet.toml())
    port = unused_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ollama_meter",
        "--listen",
        f"127.0.0.1:{port}",
        "--config",
        str(config),
        "--keys-file",
        str(keys.path),
        stderr=asyncio.subprocess.PIPE,
    )
    proxy = RealProxy(proc, f"http://127.0.0.1:{port}")
    drain: asyncio.Task[None] | None = None
    try:
        await proxy.started()
        drain = asyncio.create_task(proxy.drain())
        yield proxy, fleet, keys
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        if drain is not None:
            await drain


async def traffic(url: str, key: str, stop: asyncio.Event) -> int:
    """Streamed generations, two at a time, until ``stop`` (at most 2000: it always ends)."""
    sent = 0

    async def worker(http: aiohttp.ClientSession, model: str) -> None:
        nonlocal sent
        while not stop.is_set() and sent < 2000:
            sent += 1
            body = {"model": model, "prompt": "hello"}
            with contextlib.suppress(aiohttp.ClientError):
                async with http.post(f"{url}/api/generate", json=body) as response:
                    await response.read()

    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        await asyncio.gather(worker(http, "llama3.2"), worker(http, "qwen3:8b"))
    return sent


async def test_the_page_against_the_real_proxy(
    browser: BrowserThread, real_proxy: tuple[RealProxy, Fleet, Keys], artifacts: Path
) -> None:
    proxy, fleet, keys = real_proxy
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    running = asyncio.create_task(traffic(proxy.url, keys.inference, stop))

    async def scenario(browser: Browser) -> None:
        context, page, console = await open_page(browser, f"{proxy.url}/-/status", clock=False)
        form = page.locator("#key-form")
        await expect(form).to_be_visible()
        await expect(page.locator("#content")).to_be_hidden()
        # An inference key is not an admin's: refused.
        await page.locator("#key-input").fill(keys.inference)
        await page.locator("#key-input").press("Enter")
        await expect(page.locator("#key-message")).to_contain_text("Key refused")
        await expect(form).to_be_visible()
        # An unknown key: refused too.
        await page.locator("#key-input").fill(keys.bad_secret())
        await page.locator("#key-input").press("Enter")
        await expect(page.locator("#key-message")).to_contain_text("Key refused")

        await page.locator("#key-input").fill(keys.admin)
        await page.locator("#key-input").press("Enter")
        await live(page)
        # Chromium logs each 401 and 403 as a failed load: the only errors allowed.
        refusals = console.take()
        assert refusals
        assert all("401" in e or "403" in e for e in refusals), refusals
        for upstream in fleet:
            await expect(upstream_state(page, upstream.name)).to_have_text("up")
            card = page.locator(f'#upstreams [data-upstream="{upstream.name}"]')
            for model in upstream.loaded():
                await expect(card.locator(f'[data-model="{model}"]')).to_have_count(1)
        # Traffic flows: the models' rows and the charts fill.
        await expect(page.locator("#models-body tr[data-model]")).not_to_have_count(0)
        total = page.locator('#charts [data-chart="all models"] .chart[data-kind="load"]')
        await expect(total).to_have_attribute("data-points", re.compile(r"^[1-9]"))
        await expect(page.locator("#keys-body")).to_contain_text("alice")
        await expect(page.locator("#today")).to_be_hidden()  # no ledger
        await page.screenshot(path=artifacts / "status-real.png", full_page=True)

        # An upstream dies: down within a few polls (the proxy's 2 s, the page's 2 s).
        await in_loop(loop, fleet[2].refuse())
        await expect(upstream_state(page, "u3")).to_have_text("down")
        await expect(upstream_state(page, "u1")).to_have_text("up")
        await page.screenshot(path=artifacts / "status-real-down.png")
        assert console.take() == []
        await context.close()

    try:
        await browser.run(scenario)
    finally:
        stop.set()
        assert await running > 0

"""Per-key limits (rpm, tpm, concurrency): the window arithmetic on a shifted clock, and the
429s the official clients see through the proxy."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import types
from collections.abc import Callable
from pathlib import Path

import aiohttp
import ollama
import openai
import orjson
import pytest
from limits.aio.storage import MemoryStorage, memory
from openai.types.chat import ChatCompletionMessageParam

from ollama_meter.app import LIMITER
from ollama_meter.exchange import Exchange
from ollama_meter.gateway.identity import Identity
from ollama_meter.gateway.keys import append_key
from ollama_meter.gateway.limits import (
    _KEYS_KEPT,
    Held,
    KeyLimits,
    Limiter,
    openai_headers,
    reset_text,
    retry_after,
)
from ollama_meter.gateway.windows import (
    SWEEP_EVERY,
    WINDOW,
    LimitsMemory,
    MemoryWindows,
    Window,
    Windows,
    storage_time,
)
from ollama_meter.inbound import Refusal
from ollama_meter.limit_settings import LimitSettings
from ollama_meter.settings import AccessSettings, Settings, load_settings, with_keys_file

from .conftest import Meter, MeterFactory
from .fake_ollama import FakeOllama, Reply


class Clock:
    """The limits library's clock (and so ours), ahead of the real one by ``offset``."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def shift(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    shifted = Clock()
    monkeypatch.setattr(memory, "time", types.SimpleNamespace(time=shifted.time))
    return shifted


def windows() -> Windows:
    return Windows(LimitsMemory())


@pytest.fixture(params=["awaited", "at once"])
def make_limiter(request: pytest.FixtureRequest) -> Callable[[KeyLimits], Limiter]:
    """A limiter over windows in memory, asked through the library's awaited interface (as
    over Redis) or by plain calls (as the proxy asks them in one process): the same rules."""
    if request.param == "awaited":
        return lambda defaults: Limiter(windows(), defaults)
    return lambda defaults: Limiter(MemoryWindows(), defaults)


async def admit(limiter: Limiter, key: str, limits: KeyLimits, openai: bool) -> Held:
    held = limiter.held_for(key, limits)
    if limiter.memory is not None:
        return limiter.admit_now(held, openai)
    return await limiter.admit(held, openai)


# --- the arithmetic -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wait", "seconds"), [(0.0, 1), (0.2, 1), (1.0, 1), (1.01, 2), (59.5, 60), (120, 120)]
)
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(
    wait: float, seconds: int
) -> None:
    assert retry_after(wait) == seconds


@pytest.mark.parametrize(
    ("wait", "text"),
    [(0.02, "20ms"), (0.9991, "1000ms"), (1.0, "1s"), (59.2, "1m0s"), (360, "6m0s")],
)
def test_reset_headers_are_in_openais_form(wait: float, text: str) -> None:
    assert reset_text(wait) == text


def test_openai_headers_name_each_window_the_key_has() -> None:
    assert openai_headers(Window(60, 0, 12.5), None) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "13s",
    }
    assert set(openai_headers(Window(60, 5, 0), Window(1000, 0, 3))) == {
        f"x-ratelimit-{what}-{kind}"
        for what in ("limit", "remaining", "reset")
        for kind in ("requests", "tokens")
    }


async def test_the_request_window_says_when_the_oldest_request_ages_out(clock: Clock) -> None:
    w = windows()
    start = clock.time()
    for i in range(5):
        assert (await w.requests("k", 5)).remaining == 5 - i
        assert await w.count_request("k", 5)
        clock.shift(10)
    # Requests at start, +10, ..., +40; now +50: the first ages out at +60.
    full = await w.requests("k", 5)
    assert full.remaining == 0
    assert abs(full.wait - (start + 60 - clock.time())) < 0.05
    assert not await w.count_request("k", 5)
    clock.shift(full.wait + 0.01)
    assert (await w.requests("k", 5)).remaining == 1
    assert await w.count_request("k", 5)
    # Full again: now the one at +10 is next to go.
    again = await w.requests("k", 5)
    assert abs(again.wait - (start + 70 - clock.time())) < 0.05


async def test_the_token_window_overshoots_and_recovers_as_it_moves(clock: Clock) -> None:
    w = windows()
    start = clock.time()
    assert (await w.tokens("k", 50)).wait == 0
    assert await w.debit("k", 47)
    below = await w.tokens("k", 50)
    assert (below.remaining, below.wait) == (3, 0)  # 47 < 50: the next one is admitted
    clock.shift(30)
    assert await w.debit("k", 47)  # it ends: 94 in the window, over by 44
    over = await w.tokens("k", 50)
    assert over.remaining == 0
    # Below 50 again once the first request's 47 age out (at start + 60), not before.
    assert abs(over.wait - (start + 60 - clock.time())) < 0.05
    clock.shift(over.wait - 1)
    assert (await w.tokens("k", 50)).wait > 0.9
    clock.shift(1.05)
    assert (await w.tokens("k", 50)).remaining == 3
    clock.shift(30)
    assert (await w.tokens("k", 50)).remaining == 50


async def test_a_large_request_keeps_the_key_out_for_a_whole_window(clock: Clock) -> None:
    w = windows()
    start = clock.time()
    assert await w.debit("k", 500)  # ten times the limit, in one request
    over = await w.tokens("k", 50)
    assert abs(over.wait - (start + 60 - clock.time())) < 0.05
    clock.shift(over.wait + 0.01)
    assert (await w.tokens("k", 50)).remaining == 50


async def test_a_refused_request_takes_nothing(
    clock: Clock, make_limiter: Callable[[KeyLimits], Limiter]
) -> None:
    limiter = make_limiter(KeyLimits())
    limits = KeyLimits(rpm=2, tpm=50)
    held = await admit(limiter, "k", limits, openai=False)
    assert held is not None
    await limiter.debit(held, 60)
    limiter.release(held)
    with pytest.raises(Refusal) as refused:
        await admit(limiter, "k", limits, openai=True)
    assert refused.value.status == 429
    assert refused.value.reason == "tokens"
    assert limiter.in_flight == {}
    # The refusal took no place in the request window: one left of two.
    assert (await limiter.windows.requests("k", 2)).remaining == 1


async def test_concurrency_counts_requests_until_their_record_step(
    make_limiter: Callable[[KeyLimits], Limiter],
) -> None:
    limiter = make_limiter(KeyLimits())
    limits = KeyLimits(concurrency=2)
    first = await admit(limiter, "k", limits, openai=False)
    second = await admit(limiter, "k", limits, openai=False)
    assert first is not None
    assert second is not None
    with pytest.raises(Refusal) as refused:
        await admit(limiter, "k", limits, openai=False)
    assert refused.value.reason == "key_concurrency"
    assert refused.value.headers == {"Retry-After": "1"}
    assert await admit(limiter, "other", limits, openai=False) is not None
    assert limiter.in_flight == {"k": 2, "other": 1}
    x = Exchange("POST", "/api/generate", 0.0)
    x.held = first
    limiter.ended(x)
    limiter.ended(x)  # twice is once: the request lets go of its place the first time
    assert limiter.in_flight == {"k": 1, "other": 1}
    assert await admit(limiter, "k", limits, openai=False) is not None


@pytest.mark.parametrize("tokens_over", [False, True])
async def test_a_key_over_both_windows_is_told_of_its_rpm_first(
    clock: Clock, make_limiter: Callable[[KeyLimits], Limiter], tokens_over: bool
) -> None:
    limiter = make_limiter(KeyLimits())
    limits = KeyLimits(rpm=1, tpm=50)
    held = await admit(limiter, "k", limits, openai=False)
    assert held is not None
    limiter.release(held)
    if tokens_over:
        await limiter.debit(held, 50)
    with pytest.raises(Refusal) as refused:
        await admit(limiter, "k", limits, openai=True)
    assert refused.value.reason == "rate"
    headers = refused.value.headers
    assert headers is not None
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-remaining-tokens"] == ("0" if tokens_over else "50")
    clock.shift(60.01)
    assert await admit(limiter, "k", limits, openai=False) is not None


def test_a_keys_own_limits_win_over_the_defaults_one_by_one() -> None:
    limiter = Limiter(windows(), KeyLimits(rpm=10, tpm=1000, concurrency=2))
    assert limiter.limits_of(None, None, None) == KeyLimits(10, 1000, 2)
    assert limiter.limits_of(0, None, 5) == KeyLimits(0, 1000, 5)


def _ended(limiter: Limiter, held: Held) -> None:
    x = Exchange("POST", "/api/generate", 0.0)
    x.held = held
    limiter.ended(x)


def test_a_keys_place_outlives_a_reload_of_its_limits(clock: Clock) -> None:
    """A key's requests share one place (limits.py, rule 2): a reload of the keys file
    (a new Identity) gives it the new limits, and its requests in flight still count."""
    limiter = Limiter(MemoryWindows(), KeyLimits())
    before = Identity("k", None, None, keyed=True, rpm=1, concurrency=2)
    first = limiter.check_now(before, openai=False)
    assert first is not None
    with pytest.raises(Refusal) as refused:
        limiter.check_now(before, openai=False)
    assert refused.value.reason == "rate"
    after = dataclasses.replace(before, rpm=5, concurrency=1)
    with pytest.raises(Refusal) as refused:
        limiter.check_now(after, openai=False)
    assert refused.value.reason == "key_concurrency"  # the first one is still in flight
    _ended(limiter, first)
    second = limiter.check_now(after, openai=False)  # room in the window of 5 a minute
    assert second is not None
    assert second.limits == KeyLimits(rpm=5, concurrency=1)
    assert limiter.in_flight == {"k": 1}


def test_a_role_listeners_copy_of_a_key_shares_its_place() -> None:
    """A role listener gives each request a copy of the key's Identity with another role:
    the same key, the same limits, the same place (one count)."""
    limiter = Limiter(MemoryWindows(), KeyLimits())
    key = Identity("k", None, "inference", keyed=True, rpm=100, concurrency=2)
    first = limiter.check_now(key, openai=False)
    copy = limiter.check_now(key.with_role("admin"), openai=False)
    assert first is not None
    assert copy is first
    assert first.limits == KeyLimits(rpm=100, concurrency=2)
    with pytest.raises(Refusal) as refused:
        limiter.check_now(key.with_role("admin"), openai=False)
    assert refused.value.reason == "key_concurrency"


def test_the_places_of_idle_keys_are_let_go_and_busy_ones_kept() -> None:
    limiter = Limiter(MemoryWindows(), KeyLimits(concurrency=1))
    busy = limiter.check_now(None, openai=False)
    assert busy is not None
    for i in range(_KEYS_KEPT + 10):
        _ended(limiter, limiter.admit_now(limiter.held_for(f"k{i}", KeyLimits(1)), False))
    assert limiter.in_flight == {"anonymous": 1}
    with pytest.raises(Refusal) as refused:
        limiter.check_now(None, openai=False)
    assert refused.value.reason == "key_concurrency"


# --- through the proxy ------------------------------------------------------------------------

_GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}


def _limited(tmp_path: Path, **key_limits: int) -> tuple[Settings, str]:
    keys = tmp_path / "keys.toml"
    key, _ = append_key(keys, name="bob", role="inference")
    text = keys.read_text()
    extra = "".join(f"{name} = {value}\n" for name, value in key_limits.items())
    keys.write_text(text.rstrip("\n") + "\n" + extra)
    return Settings(access=AccessSettings(keys), limits=LimitSettings()), key


async def _settled(meter: Meter) -> None:
    await meter.app[LIMITER].settle()


async def test_the_61st_request_in_a_minute_is_429_until_retry_after(
    start_meter: MeterFactory, fake: FakeOllama, clock: Clock, tmp_path: Path
) -> None:
    settings, key = _limited(tmp_path, rpm=60)
    meter = await start_meter(settings)
    auth = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as http:
        for _ in range(60):
            async with http.post(f"{meter.url}/api/generate", json=_GENERATE, headers=auth) as r:
                assert r.status == 200
        clock.shift(59.0)
        async with http.post(f"{meter.url}/api/generate", json=_GENERATE, headers=auth) as r:
            assert r.status == 429
            body = await r.json()
            wait = int(r.headers["Retry-After"])
            assert "x-ratelimit-limit-requests" not in r.headers  # native: Ollama's shape only
        assert body["error"].startswith("ollama-meter: key 'bob' is over its limit of 60")
        assert "rpm" in body["error"]
        assert wait == 1
        async with http.post(
            f"{meter.url}/v1/chat/completions",
            json={"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]},
            headers=auth,
        ) as r:
            assert r.status == 429
            assert r.headers["x-ratelimit-limit-requests"] == "60"
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
            assert r.headers["x-ratelimit-reset-requests"].endswith("ms")
            error = (await r.json())["error"]
            assert error["type"] == "rate_limit_error"
        clock.shift(wait)
        async with http.post(f"{meter.url}/api/generate", json=_GENERATE, headers=auth) as r:
            assert r.status == 200
    assert fake.count("/api/generate") == 61
    assert fake.count("/v1/chat/completions") == 0
    assert meter.value("rejected_total", reason="rate", key="bob") == 2


async def test_the_official_clients_see_the_429(
    start_meter: MeterFactory, fake: FakeOllama, clock: Clock, tmp_path: Path
) -> None:
    settings, key = _limited(tmp_path, rpm=2)
    meter = await start_meter(settings)
    async with (
        ollama.AsyncClient(host=meter.url, headers={"Authorization": f"Bearer {key}"}) as client,
        openai.AsyncOpenAI(base_url=f"{meter.url}/v1", api_key=key, max_retries=1) as sdk,
    ):
        await client.generate(model="llama3.2", prompt="hi")
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
        await sdk.chat.completions.create(model="llama3.2", messages=messages)
        with pytest.raises(ollama.ResponseError) as refused:
            await client.generate(model="llama3.2", prompt="hi")
        assert refused.value.status_code == 429
        assert "over its limit of 2 requests per minute" in refused.value.error
        # Both went in at about the same time: 59.2 s on, the oldest is under a second from
        # leaving. The SDK waits the Retry-After it is given, then succeeds on its own.
        clock.shift(59.2)
        began = time.monotonic()
        answer = await sdk.chat.completions.create(model="llama3.2", messages=messages)
        assert answer.choices
        assert time.monotonic() - began >= 0.5  # it did wait (Retry-After: 1), once
    assert meter.value("rejected_total", reason="rate", key="bob") == 2


def answer(prompt: int, completion: int) -> Reply:
    """A whole generate answer reporting these token counts."""
    doc = {
        "model": "llama3.2",
        "created_at": "2026-12-02T10:00:00Z",
        "response": "ok",
        "done": True,
        "done_reason": "stop",
        "total_duration": 1000,
        "load_duration": 10,
        "prompt_eval_count": prompt,
        "prompt_eval_duration": 100,
        "eval_count": completion,
        "eval_duration": 100,
    }
    return Reply.body(orjson.dumps(doc))


async def test_tpm_counts_what_ollama_reported_and_waits_for_it_to_age_out(
    start_meter: MeterFactory, fake: FakeOllama, clock: Clock, tmp_path: Path
) -> None:
    settings, key = _limited(tmp_path, tpm=50)
    meter = await start_meter(settings)
    fake.script("POST", "/api/generate", *[answer(40, 7) for _ in range(4)])
    auth = {"Authorization": f"Bearer {key}"}

    async def generate() -> aiohttp.ClientResponse:
        async with http.post(f"{meter.url}/api/generate", json=_GENERATE, headers=auth) as r:
            await r.read()
        await _settled(meter)
        return r

    async with aiohttp.ClientSession() as http:
        start = clock.time()
        assert (await generate()).status == 200  # 47 in the window: below 50
        clock.shift(30)
        assert (await generate()).status == 200  # 94: over
        third = await generate()
        assert third.status == 429
        # Until the first one's 47 age out, 30 s from now.
        wait = int(third.headers["Retry-After"])
        assert wait == math.ceil(start + 60 - clock.time())
        clock.shift(wait - 1.5)
        assert (await generate()).status == 429
        clock.shift(1.6)
        assert (await generate()).status == 200  # 47 + 47 again
        assert (await generate()).status == 429
    assert fake.count("/api/generate") == 3
    assert meter.value("rejected_total", reason="tokens", key="bob") == 3
    # The window holds exactly what the fake reported for the two requests still in it.
    window = await meter.app[LIMITER].windows.tokens("bob", 1000)
    assert window.remaining == 1000 - 94


async def test_without_access_control_everyone_shares_the_anonymous_limits(
    start_meter: MeterFactory, fake: FakeOllama, clock: Clock
) -> None:
    settings = Settings(limits=LimitSettings(defaults=KeyLimits(rpm=3)))
    meter = await start_meter(settings)
    async with aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(4):
            async with http.post(f"{meter.url}/api/generate", json=_GENERATE) as r:
                statuses.append(r.status)
        # Not limited: what runs no model.
        for _ in range(5):
            async with http.get(f"{meter.url}/api/tags") as r:
                assert r.status == 200
    assert statuses == [200, 200, 200, 429]
    assert meter.value("rejected_total", reason="rate", key="anonymous") == 1


async def test_a_key_at_its_concurrency_is_refused_and_a_stream_holds_its_place(
    start_meter: MeterFactory, fake: FakeOllama, tmp_path: Path
) -> None:
    settings, key = _limited(tmp_path, concurrency=1)
    meter = await start_meter(settings)
    release = asyncio.Event()
    first, rest = (
        b'{"model":"llama3.2","response":"a","done":false}\n',
        (b'{"model":"llama3.2","response":"","done":true,"eval_count":1,"prompt_eval_count":1}\n'),
    )
    fake.script(
        "POST",
        "/api/generate",
        Reply(content_type="application/x-ndjson", chunks=[first, rest], gates={1: release}),
    )
    auth = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as http:
        stream = await http.post(
            f"{meter.url}/api/generate", json={**_GENERATE, "stream": True}, headers=auth
        )
        assert await stream.content.readline() == first
        async with http.post(f"{meter.url}/api/generate", json=_GENERATE, headers=auth) as r:
            assert r.status == 429
            assert "concurrency" in (await r.json())["error"]
        release.set()
        assert (await stream.read()) == rest
        stream.release()
        await fake.wait_for("/api/generate", 1)
        async with http.post(f"{meter.url}/api/generate", json=_GENERATE, headers=auth) as r:
            assert r.status == 200
    assert meter.value("rejected_total", reason="key_concurrency", key="bob") == 1


def test_keys_file_on_the_command_line_keeps_the_limits(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        "[limits]\ndefault_rpm = 7\n[access]\nkeys_file = 'k.toml'\nanonymous = 'read'\n"
    )
    settings = with_keys_file(load_settings(str(path)), str(tmp_path / "other.toml"))
    assert settings.limits is not None
    assert settings.limits.defaults.rpm == 7
    assert settings.access is not None
    assert settings.access.keys_file == tmp_path / "other.toml"
    assert settings.access.anonymous == "read"


# --- the memory storage's windows (against the library's: tests/test_windows_equivalence.py) ----


async def test_the_windows_answer_as_the_librarys_storage_over_minutes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Windows (rpm, tpm, debit) over LimitsMemory and over the library's own storage with
    rule 3's question, on one clock: the same answers, waits included, for 148 s of
    windows filling, refusing and draining twice."""
    now = [1e9]  # a clock that moves only when told: both storages see the same times
    monkeypatch.setattr(memory, "time", types.SimpleNamespace(time=lambda: now[0]))
    ours, stock = Windows(LimitsMemory()), Windows(ByRule3())
    at_once = MemoryWindows()
    answers: list[list[Window | bool]] = [[], [], []]
    for step in range(400):
        for w, seen in zip((ours, stock), answers, strict=False):
            seen.append(await w.requests("k", 50))
            seen.append(await w.count_request("k", 50))
            seen.append(await w.tokens("k", 400))
            if step % 3 == 0:
                seen.append(await w.debit("k", 7))
        # The same questions asked without awaiting (what the proxy does in one process).
        answers[2].append(at_once.requests_now("k", 50))
        answers[2].append(at_once.count_request_now("k", 50))
        answers[2].append(at_once.tokens_now("k", 400))
        if step % 3 == 0:
            at_once.debit_now("k", 7)
            answers[2].append(True)
        now[0] += 0.37
    assert answers[0] == answers[1] == answers[2]
    # Some refused, and the waits moved with the clock: not a flat comparison.
    assert False in answers[0]
    assert len({a.wait for a in answers[0] if isinstance(a, Window) and a.wait > 0}) > 10


class ByRule3(MemoryStorage):
    """The library's memory storage, its moving window read by windows.py's rule 3."""

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = storage_time()
        events = self.events.get(key, [])
        live = 0
        while live < min(limit, len(events)) and events[live].atime > now - expiry:
            live += 1
        return (events[live - 1].atime, live) if live else (now, 0)


async def test_a_debit_of_many_tokens_is_one_entry(clock: Clock) -> None:
    storage = LimitsMemory()
    w = Windows(storage)
    assert await w.debit("k", 50_000)
    assert storage.entries() == 1
    assert (await w.tokens("k", 100_000)).remaining == 50_000
    clock.shift(WINDOW + SWEEP_EVERY)
    assert (await w.tokens("k", 100_000)).remaining == 100_000
    assert storage.entries() == 0  # aged out: dropped at the key's next call

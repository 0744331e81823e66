"""The limits and the queue (issue 12) reviewed as a hostile client would use them: each test
here proves one problem found in review, through the proxy on loopback sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from ollama_meter.app import ADMISSION, FLEET, LIMITER
from ollama_meter.config import ConfigError
from ollama_meter.gateway.admission import Admission
from ollama_meter.gateway.keys import KeysFileError, append_key, parse_keys
from ollama_meter.gateway.limits import KeyLimits
from ollama_meter.limit_settings import LimitSettings
from ollama_meter.settings import AccessSettings, Settings, load_settings, parse_settings

from .conftest import Meter, MeterFactory
from .fake_fleet import FleetFactory
from .fake_ollama import FakeOllama, Reply
from .test_limits import answer

_A = "llama3.2"
_B = "qwen3:8b"


def _admission(meter: Meter) -> Admission[Any]:
    return meter.app[ADMISSION]


async def _until(predicate: Any) -> None:
    """Until ``predicate()`` holds, looked at after each turn of the loop (the proxy runs in
    this loop, so every change to its queue happens in one of those turns)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("never held")


async def _post(
    http: aiohttp.ClientSession, meter: Meter, body: dict[str, Any], key: str | None = None
) -> tuple[int, bytes]:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    async with http.post(f"{meter.url}/api/generate", json=body, headers=headers) as r:
        return r.status, await r.read()


def _body(model: str, prompt: str = "hi") -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "stream": False}


# --- a waiter whose slot is free is never woken -------------------------------------------------


async def test_a_waiter_for_a_free_model_is_not_stuck_behind_its_keys_head_for_another(
    start_fleet: FleetFactory, start_meter: MeterFactory
) -> None:
    """Without keys everyone is ``anonymous``: one queue. Its head waits for model A; a request
    behind it waits for model B. When B's slot frees, ``pump`` only looks at the head (A:
    still full) and the B request waits on, with B's slot idle, until ``max_queue_wait``."""
    fleet = await start_fleet(1, models=(_A, _B), loaded=(_A, _B), slots=1, time_scale=0)
    upstream = fleet[0]
    settings = Settings(slots=1, limits=LimitSettings(max_queue_wait=3.0))
    meter = await start_meter(settings, upstream=upstream.url)
    hold_a, hold_b = upstream.hold_tokens(_A), upstream.hold_tokens(_B)
    admission = _admission(meter)
    async with aiohttp.ClientSession() as http:
        running_a = asyncio.create_task(_post(http, meter, _body(_A, "a1")))
        await upstream.wait_until(lambda: upstream.in_flight(_A) == 1)
        running_b = asyncio.create_task(_post(http, meter, _body(_B, "b1")))
        await upstream.wait_until(lambda: upstream.in_flight(_B) == 1)
        waiting_a = asyncio.create_task(_post(http, meter, _body(_A, "a2")))
        await _until(lambda: admission.depth == 1)
        waiting_b = asyncio.create_task(_post(http, meter, _body(_B, "b2")))
        await _until(lambda: admission.depth == 2)
        hold_b.set()  # B's slot frees (twice over): b2 must take it, A is still busy
        assert (await running_b)[0] == 200
        status, body = await waiting_b
        assert status == 200, body
        assert not running_a.done()
        hold_a.set()
        assert [(await t)[0] for t in (running_a, waiting_a)] == [200, 200]
    assert admission.depth == 0


# --- a tpm debit of a huge token count ---------------------------------------------------------


def _tpm_key(tmp_path: Path, tpm: int) -> tuple[Settings, str]:
    keys = tmp_path / "keys.toml"
    key, _ = append_key(keys, name="bob", role="inference")
    keys.write_text(keys.read_text().rstrip("\n") + f"\ntpm = {tpm}\n")
    return Settings(access=AccessSettings(keys), limits=LimitSettings()), key


async def test_a_huge_reported_token_count_still_closes_the_tpm_window(
    start_meter: MeterFactory, fake: FakeOllama, tmp_path: Path
) -> None:
    """The debit adds one window entry per token (``[entry] * tokens``): a count past what a
    list can index makes the debit task die (OverflowError), so nothing is debited and the
    key keeps its whole budget."""
    settings, key = _tpm_key(tmp_path, tpm=50)
    meter = await start_meter(settings)
    fake.script("POST", "/api/generate", answer(2**62, 2**62), answer(1, 1))
    async with aiohttp.ClientSession() as http:
        assert (await _post(http, meter, _body(_A), key))[0] == 200
        await meter.app[LIMITER].settle()
        status, body = await _post(http, meter, _body(_A), key)
    assert status == 429, body
    assert fake.count("/api/generate") == 1


async def test_a_tpm_debit_keeps_no_more_entries_than_the_window_can_count(
    start_meter: MeterFactory, fake: FakeOllama, tmp_path: Path
) -> None:
    """Memory: a request reporting millions of tokens must not cost millions of list entries
    for a minute (the window only ever counts the newest ``tpm``)."""
    settings, key = _tpm_key(tmp_path, tpm=50)
    meter = await start_meter(settings)
    fake.script("POST", "/api/generate", answer(1, 2_000_000))
    async with aiohttp.ClientSession() as http:
        assert (await _post(http, meter, _body(_A), key))[0] == 200
        await meter.app[LIMITER].settle()
        assert (await _post(http, meter, _body(_A), key))[0] == 429
    storage = meter.app[LIMITER].windows.storage  # type: ignore[attr-defined]
    assert storage.entries() == 1  # one debit, one entry, whatever its weight


# --- a max_queue_wait that is no duration -----------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-nan"])
def test_a_max_queue_wait_that_is_not_a_finite_duration_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """TOML has ``nan`` and ``inf`` floats: ``nan < 0`` is false, so ``nan`` was taken, and
    every request that had to wait for a slot was a 503 at once ("no slot within nan s");
    ``inf`` made the bounded wait unbounded."""
    monkeypatch.chdir(tmp_path)
    Path("s.toml").write_text(f"[limits]\nmax_queue_wait = {value}\n")
    with pytest.raises(ConfigError) as error:
        load_settings("s.toml")
    assert str(error.value).startswith("s.toml: limits.max_queue_wait: must be")
    assert "\n" not in str(error.value)


# --- rpm counts requests the queue refused ----------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="rpm is counted at the limit step, before admission: a request the queue then "
    "refuses (503, never sent to Ollama) keeps its place in the request window",
)
async def test_a_request_the_queue_refused_takes_no_place_in_the_rpm_window(
    start_fleet: FleetFactory, start_meter: MeterFactory
) -> None:
    """A client that honours the 503's Retry-After comes back to a 429: its refused attempts
    used up its requests per minute, though none reached Ollama."""
    fleet = await start_fleet(1, models=(_A,), loaded=(_A,), slots=1, time_scale=0)
    upstream = fleet[0]
    limits = LimitSettings(defaults=KeyLimits(rpm=2), max_queue=0)
    meter = await start_meter(Settings(slots=1, limits=limits), upstream=upstream.url)
    held = upstream.hold_tokens(_A)
    async with aiohttp.ClientSession() as http:
        running = asyncio.create_task(_post(http, meter, _body(_A, "first")))
        await upstream.wait_until(lambda: upstream.in_flight(_A) == 1)
        assert (await _post(http, meter, _body(_A, "refused")))[0] == 503  # queue_full
        held.set()
        assert (await running)[0] == 200
        status, body = await _post(http, meter, _body(_A, "second"))
    assert status == 200, body  # the second request Ollama would see this minute


# --- a key named "anonymous" shares the anonymous clients' limits -----------------------------


def test_a_key_may_not_be_named_anonymous_or_other(tmp_path: Path) -> None:
    """Anonymous clients, and keys past max_key_labels, go by these names in the limits, the
    queue, the metrics and the ledger: a key of that name would share their counts."""
    path = tmp_path / "keys.toml"
    for name in ("anonymous", "other"):
        with pytest.raises(KeysFileError, match="reserved"):
            append_key(path, name=name, role="inference")
    append_key(path, name="fine", role="inference")
    text = path.read_text().replace('name = "fine"', 'name = "anonymous"')
    with pytest.raises(KeysFileError) as error:
        parse_keys(text, "keys.toml")
    assert str(error.value).startswith("keys.toml: key[1].name: 'anonymous' is reserved")


# --- a body the proxy does not read is not gated -----------------------------------------------


async def test_a_padded_body_does_not_jump_past_the_slots(
    start_fleet: FleetFactory, start_meter: MeterFactory
) -> None:
    """JSON allows any amount of whitespace: padding a generate past --max-inspect-bytes
    makes it ``unknown`` to the proxy but not to Ollama, which runs it on top of the slots
    the others wait for (in a fleet the same request is a 413)."""
    fleet = await start_fleet(1, models=(_A,), loaded=(_A,), slots=2, time_scale=0)
    upstream = fleet[0]
    meter = await start_meter(
        Settings(slots=1, limits=LimitSettings()), upstream=upstream.url, max_inspect_bytes=4096
    )
    held = upstream.hold_tokens(_A)
    padded = orjson.dumps(_body(_A, "padded"))[:-1] + b" " * 8192 + b"}"
    async with aiohttp.ClientSession() as http:
        first = asyncio.create_task(_post(http, meter, _body(_A, "first")))
        await upstream.wait_until(lambda: upstream.in_flight(_A) == 1)

        async def send_padded() -> int:
            async with http.post(f"{meter.url}/api/generate", data=padded) as r:
                await r.read()
                return r.status

        jumper = asyncio.create_task(send_padded())
        two = asyncio.create_task(upstream.wait_until(lambda: upstream.in_flight(_A) == 2))
        await asyncio.wait({jumper, two}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        at_once = two.done()
        two.cancel()
        held.set()
        await first
        jumper.cancel()
    assert not at_once, "Ollama ran two requests of a model gated at one slot"


# --- a request that never left the queue is counted as ended at its upstream ------------------


async def test_requests_the_queue_refused_or_lost_do_not_end_at_the_upstream(
    start_fleet: FleetFactory, start_meter: MeterFactory
) -> None:
    """The route step names the upstream before the admit step: a request refused there
    (queue full, wait too long) or whose client left while queued was never sent, yet the
    record step told the fleet it ended there. Each one took a request of the model off the
    upstream's count while that request still ran, and the count went negative: the router's
    costs and ``upstream_requests_in_flight`` drift from the truth."""
    fleet = await start_fleet(1, models=(_A,), loaded=(_A,), slots=1, time_scale=0)
    upstream = fleet[0]
    settings = parse_settings(tomllib.loads(fleet.toml()), "fleet.toml", Path("."))
    settings = dataclasses.replace(settings, limits=LimitSettings(max_queue=1))
    meter = await start_meter(settings)
    admission = _admission(meter)
    node = meter.app[FLEET].nodes[0]
    held = upstream.hold_tokens(_A)
    async with aiohttp.ClientSession() as http:
        running = asyncio.create_task(_post(http, meter, _body(_A, "running")))
        await upstream.wait_until(lambda: upstream.in_flight(_A) == 1)
        async with aiohttp.ClientSession() as leaving:
            gone = asyncio.create_task(_post(leaving, meter, _body(_A, "gone")))
            await _until(lambda: admission.depth == 1)
            assert (await _post(http, meter, _body(_A, "refused")))[0] == 503  # full
        gone.cancel()
        await _until(lambda: admission.depth == 0)
        while_running = node.in_flight, sum(node.in_flight_by.values())
        held.set()
        assert (await running)[0] == 200
    assert while_running == (1, 1)
    assert node.in_flight == 0
    assert meter.value("upstream_requests_in_flight", upstream="u1") == 0


# --- a key that keeps one request waiting takes every turn ------------------------------------


def _prompts(upstream: Any) -> list[str]:
    return [
        orjson.loads(call.body)["prompt"] for call in upstream.calls if call.path == "/api/generate"
    ]


async def test_a_key_that_keeps_one_request_waiting_does_not_take_every_turn(
    start_fleet: FleetFactory, start_meter: MeterFactory, tmp_path: Path
) -> None:
    """A key whose queue runs empty is forgotten, and a key that starts waiting goes first:
    a client that sends its next request as soon as the last one has its slot is "new"
    every time, and is served at every turnover while a key with requests waiting all along
    gets none (round-robin would alternate)."""
    keys = tmp_path / "keys.toml"
    patient, _ = append_key(keys, name="patient", role="inference")
    eager, _ = append_key(keys, name="eager", role="inference")
    settings = Settings(access=AccessSettings(keys), limits=LimitSettings(), slots=1)
    fleet = await start_fleet(1, models=(_A,), loaded=(_A,), slots=1, time_scale=0)
    upstream = fleet[0]
    meter = await start_meter(settings, upstream=upstream.url)
    admission = _admission(meter)
    hold = upstream.hold_tokens(_A)
    tasks = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        def send(prompt: str, key: str) -> None:
            tasks.append(asyncio.create_task(_post(http, meter, _body(_A, prompt), key)))

        send("e0", eager)
        await upstream.wait_until(lambda: len(_prompts(upstream)) == 1)
        for i in range(4):
            send(f"p{i}", patient)
        await _until(lambda: admission.depth == 4)
        eager_sent = 1
        for turn in range(1, 7):
            if not any(p.startswith("e") for p in _waiting(eager_sent, _prompts(upstream))):
                before = admission.depth
                send(f"e{eager_sent}", eager)  # its next one, as soon as the last has a slot
                eager_sent += 1
                await _until(_depth_is(admission, before + 1))
            following = upstream.hold_tokens(_A)
            hold.set()  # one turnover: the running request ends, the next one gets the slot
            hold = following
            await upstream.wait_until(_arrived(upstream, turn + 1))
        hold.set()
        await asyncio.gather(*tasks)
    served = _prompts(upstream)[1:7]
    assert sum(p.startswith("p") for p in served) >= 3, served


def _depth_is(admission: Admission[Any], depth: int) -> Callable[[], bool]:
    return lambda: admission.depth == depth


def _arrived(upstream: Any, count: int) -> Callable[[], bool]:
    return lambda: len(_prompts(upstream)) == count


def _waiting(eager_sent: int, served: list[str]) -> list[str]:
    """The eager key's requests sent and not yet at the upstream."""
    return [f"e{i}" for i in range(eager_sent) if f"e{i}" not in served]


# --- a bad Redis URL's password in the error line ---------------------------------------------


@pytest.mark.parametrize(
    "url", ["http://:s3cret@redis:6379/0", "redis://:s3cret@", "redis://me:s3cret@:6379"]
)
def test_a_redis_url_that_cannot_work_is_one_line_without_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """The error echoed the URL whole, password and all, to stderr and the logs."""
    monkeypatch.chdir(tmp_path)
    Path("s.toml").write_text(f'[limits]\nredis = "{url}"\n')
    with pytest.raises(ConfigError) as error:
        load_settings("s.toml")
    message = str(error.value)
    assert message.startswith("s.toml: limits.redis: must be redis://")
    assert "s3cret" not in message
    assert "\n" not in message


# --- a waiter whose model is deleted is counted as a 503 it was not ---------------------------


async def test_a_waiter_whose_model_is_gone_gets_a_404_not_counted_as_no_upstream(
    start_fleet: FleetFactory, start_meter: MeterFactory
) -> None:
    """The admit step counted every refusal the router gave a waiting request as
    ``rejected_total{reason="no_upstream"}`` (a 503), the 404 of a model nobody lists any
    more too."""
    fleet = await start_fleet(1, models=(_A, _B), loaded=(_A,), slots=1, time_scale=0)
    upstream = fleet[0]
    settings = parse_settings(tomllib.loads(fleet.toml()), "fleet.toml", Path("."))
    meter = await start_meter(settings)
    admission = _admission(meter)
    held = upstream.hold_tokens(_A)
    async with aiohttp.ClientSession() as http:
        running = asyncio.create_task(_post(http, meter, _body(_A, "running")))
        await upstream.wait_until(lambda: upstream.in_flight(_A) == 1)
        waiting = asyncio.create_task(_post(http, meter, _body(_A, "waiting")))
        await _until(lambda: admission.depth == 1)
        for name in [k for k, v in upstream.sched.models.items() if v.startswith(_A)]:
            del upstream.sched.models[name]  # gone from the upstream's /api/tags
        async with http.delete(f"{meter.url}/api/delete", json={"model": _A}) as r:
            assert r.status == 200
        held.set()
        assert (await running)[0] == 200
        status, body = await waiting
    assert status == 404, body
    assert meter.value("rejected_total", reason="no_upstream", key="anonymous") == 0


# --- another spelling of the model takes a slot of its own ------------------------------------


async def test_library_spelling_of_a_model_waits_for_the_same_slot(
    start_meter: MeterFactory, fake: FakeOllama
) -> None:
    """With one upstream the slots are keyed by the model label, and ``library/llama3.2``
    is its own label (canonical_model keeps the default namespace unless the default host
    comes first), though Ollama reads it as ``llama3.2``: spelling the name that way ran a
    second request of a model gated at one slot."""
    meter = await start_meter(Settings(slots=1, limits=LimitSettings()))
    admission = _admission(meter)
    release = asyncio.Event()
    first = orjson.dumps({"model": _A, "response": "a", "done": False}) + b"\n"
    fake.script(
        "POST", "/api/generate", Reply(content_type="application/x-ndjson", chunks=[first, b""],
                                       gates={1: release}),
    )  # fmt: skip
    async with aiohttp.ClientSession() as http:
        running = asyncio.create_task(_post(http, meter, {"model": _A, "prompt": "a"}))
        await fake.wait_for("/api/generate", 1)
        other = asyncio.create_task(_post(http, meter, _body("library/llama3.2", "b")))
        queued = asyncio.create_task(_until(lambda: admission.depth == 1))
        sent = asyncio.create_task(fake.wait_for("/api/generate", 2))
        await asyncio.wait({queued, sent}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        went_up = sent.done() and not queued.done()
        sent.cancel()
        release.set()
        await running
        await other
    assert not went_up, "both spellings were at Ollama at once"

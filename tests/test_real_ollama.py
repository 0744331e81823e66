"""The official clients through ollama-meter against a real Ollama (see tests/real_ollama.py).

Each exchange runs straight to the server and through the proxy. The model is tiny and random,
but with a fixed seed and temperature 0 its text is the same on every run; the inference tests
check that premise with a second direct run before they rely on it. Timestamps, durations and
/v1 ids differ from run to run, so those bodies are compared by shape: the same keys in the
same order with the same values, apart from those fields, and the same framing. Everything else
is compared byte for byte. The proxy's token counters must equal what the client parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import ollama
import openai
import orjson
import pytest

from . import real_ollama
from .access_keys import access_settings, make_keys
from .clients import VOLATILE, Captured, collect, make_ollama, make_openai, recording_transport_for
from .conftest import Meter, MeterFactory
from .fake_ollama import FakeOllama
from .real_ollama import TINY, RealOllama

PROMPT: Final = "hi"
MESSAGES: Any = [{"role": "user", "content": PROMPT}]
OPTIONS: Final = {"seed": 1, "temperature": 0, "num_predict": 8}

#: Values that change from run to run: timestamps, durations, /v1 ids.
VOLATILE_FIELDS: Final = frozenset(
    {
        "created_at",
        "total_duration",
        "load_duration",
        "prompt_eval_duration",
        "eval_duration",
        "id",
        "created",
    }
)
#: Response headers that may differ between two runs (a duration's digits change the length).
VOLATILE_HEADERS: Final = frozenset(
    {"date", "connection", "keep-alive", "transfer-encoding", "content-length"}
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealOllama]:
    """One real Ollama for this module, on a free port, its state under a temporary folder."""
    try:
        folder = real_ollama.find()
    except FileNotFoundError as error:
        pytest.fail(str(error))
    if folder is None:
        pytest.skip(real_ollama.not_found_reason())
    try:
        running = real_ollama.start(folder, tmp_path_factory.mktemp("real-ollama"))
    except real_ollama.StartFailed as error:
        message = f"real Ollama in {folder} did not start: {error}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    yield running
    running.stop()


@pytest.fixture
async def meter(server: RealOllama, start_meter: MeterFactory) -> Meter:
    return await start_meter(upstream=server.url)


# --- Running a client twice, or three times, and comparing -----------------------------------


@dataclass
class Run:
    captured: list[Captured]
    result: Any

    @property
    def body(self) -> bytes:
        [exchange] = self.captured
        return bytes(exchange.body)


async def run(
    url: str, make: Callable[[str, Any], Any], act: Callable[[Any], Awaitable[Any]]
) -> Run:
    transport = recording_transport_for(make)
    client = make(url, transport)
    try:
        result = await act(client)
    finally:
        await client.close()
    return Run(transport.captured, result)


async def three_runs(
    server: RealOllama,
    meter: Meter,
    make: Callable[[str, Any], Any],
    act: Callable[[Any], Awaitable[Any]],
) -> tuple[Run, Run, Run]:
    """Direct, proxied, direct again (to see what two direct runs share)."""
    return (
        await run(server.url, make, act),
        await run(meter.url, make, act),
        await run(server.url, make, act),
    )


def skeleton(value: Any) -> Any:
    """A JSON value with its key order kept and volatile values replaced by their type."""
    if isinstance(value, dict):
        return [
            (key, type(item).__name__ if key in VOLATILE_FIELDS else skeleton(item))
            for key, item in value.items()
        ]
    if isinstance(value, list):
        return [skeleton(item) for item in value]
    return value


def documents(body: bytes) -> list[Any]:
    """The JSON documents of a body: one object, NDJSON lines, or SSE ``data:`` events."""
    if body.startswith(b"data: "):
        events = [event.removeprefix(b"data: ") for event in body.split(b"\n\n") if event]
        return [event.decode() if event == b"[DONE]" else orjson.loads(event) for event in events]
    return [orjson.loads(line) for line in body.splitlines()]


def shape(exchange: Captured) -> tuple[int, list[tuple[str, str]], tuple[int, bool], Any]:
    """Status, stable headers, framing (newlines, a trailing one) and the documents' skeleton."""
    body = bytes(exchange.body)
    length = [v for k, v in exchange.headers if k.lower() == "content-length"]
    assert length in ([], [str(len(body))])
    headers = sorted(
        (k.lower(), v) for k, v in exchange.headers if k.lower() not in VOLATILE_HEADERS
    )
    return (
        exchange.status,
        headers,
        (body.count(b"\n"), body.endswith(b"\n")),
        skeleton(documents(body)),
    )


def requests_counted(meter: Meter) -> list[dict[str, str]]:
    """Label sets of the requests_total series that counted something."""
    return [
        dict(sample.labels)
        for family in meter.registry.collect()
        for sample in family.samples
        if sample.name == "ollama_meter_requests_total" and sample.value
    ]


# --- Native inference --------------------------------------------------------------------


async def native(client: ollama.AsyncClient, endpoint: str, stream: bool) -> list[Any]:
    """The parts of one generate or chat call (one part when not streamed)."""
    kwargs: Any = {"model": "tiny", "options": OPTIONS, "stream": stream}
    call: Any
    if endpoint == "/api/generate":
        call = client.generate(prompt=PROMPT, **kwargs)
    else:
        call = client.chat(messages=MESSAGES, **kwargs)
    return await collect(call) if stream else [await call]


def native_text(parts: list[Any]) -> str:
    return "".join(p.response if hasattr(p, "response") else p.message.content for p in parts)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("endpoint", ["/api/generate", "/api/chat"])
async def test_native_inference_matches_direct_and_is_metered(
    server: RealOllama, meter: Meter, endpoint: str, stream: bool
) -> None:
    direct, proxied, again = await three_runs(
        server, meter, make_ollama, lambda c: native(c, endpoint, stream)
    )
    assert native_text(again.result) == native_text(direct.result), "seeded text should repeat"
    assert native_text(proxied.result) == native_text(direct.result)
    assert shape(proxied.captured[0]) == shape(direct.captured[0]) == shape(again.captured[0])

    final = proxied.result[-1]
    assert (final.done, final.done_reason) == (True, "length")
    assert final.eval_count == OPTIONS["num_predict"]
    labels = {"endpoint": endpoint, "model": TINY}
    flag = str(stream).lower()
    assert meter.value("requests_total", **labels, stream=flag, status="200") == 1
    assert meter.value("prompt_tokens_total", **labels, stream=flag) == final.prompt_eval_count
    assert meter.value("completion_tokens_total", **labels, stream=flag) == final.eval_count
    assert meter.value("eval_seconds_total", **labels) == pytest.approx(final.eval_duration / 1e9)
    assert meter.value("prompt_eval_seconds_total", **labels) == pytest.approx(
        final.prompt_eval_duration / 1e9
    )
    assert meter.value("load_duration_seconds_sum", model=TINY) == pytest.approx(
        final.load_duration / 1e9
    )
    assert meter.value("time_per_output_token_seconds_sum", model=TINY) == pytest.approx(
        final.eval_duration / 1e9 / final.eval_count
    )
    assert meter.value("done_total", **labels, done_reason="length") == 1
    assert meter.value("response_bytes_total", **labels, stream=flag) == len(proxied.body)
    assert meter.value("time_to_first_token_seconds_count", **labels) == int(stream)


# --- The OpenAI-compatible layer ---------------------------------------------------------

V1_CHAT: Final = {"endpoint": "/v1/chat/completions", "model": TINY}


async def openai_chat(client: openai.AsyncOpenAI, mode: str) -> Any:
    kwargs: Any = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": OPTIONS["num_predict"],
        "seed": OPTIONS["seed"],
        "temperature": OPTIONS["temperature"],
    }
    if mode == "whole":
        return await client.chat.completions.create(**kwargs)
    usage: Any = {"include_usage": True} if mode == "stream-usage" else openai.NOT_GIVEN
    stream: Any = await client.chat.completions.create(**kwargs, stream=True, stream_options=usage)
    return [chunk async for chunk in stream]


def openai_text(result: Any) -> str:
    if isinstance(result, list):
        return "".join(c.choices[0].delta.content or "" for c in result if c.choices)
    content: str = result.choices[0].message.content
    return content


@pytest.mark.parametrize("mode", ["stream-usage", "stream", "whole"])
async def test_openai_chat_matches_direct_and_is_metered(
    server: RealOllama, meter: Meter, mode: str
) -> None:
    direct, proxied, again = await three_runs(
        server, meter, make_openai, lambda c: openai_chat(c, mode)
    )
    assert openai_text(again.result) == openai_text(direct.result), "seeded text should repeat"
    assert openai_text(proxied.result) == openai_text(direct.result)
    assert shape(proxied.captured[0]) == shape(direct.captured[0]) == shape(again.captured[0])

    flag = "false" if mode == "whole" else "true"
    assert meter.value("requests_total", **V1_CHAT, stream=flag, status="200") == 1
    assert meter.value("done_total", **V1_CHAT, done_reason="length") == 1
    assert meter.value("time_to_first_token_seconds_count", **V1_CHAT) == int(flag == "true")
    assert meter.value("response_bytes_total", **V1_CHAT, stream=flag) == len(proxied.body)
    if mode == "stream":
        # Without include_usage the stream carries no counts, and none are invented.
        assert all(chunk.usage is None for chunk in proxied.result)
        assert meter.value("completion_tokens_total", **V1_CHAT, stream=flag) == 0
        assert meter.value("prompt_tokens_total", **V1_CHAT, stream=flag) == 0
        return
    if mode == "stream-usage":
        last = proxied.result[-1]
        assert last.choices == []
        usage = last.usage
    else:
        usage = proxied.result.usage
    assert usage.completion_tokens == OPTIONS["num_predict"]
    assert meter.value("prompt_tokens_total", **V1_CHAT, stream=flag) == usage.prompt_tokens
    assert meter.value("completion_tokens_total", **V1_CHAT, stream=flag) == usage.completion_tokens


# --- Model management --------------------------------------------------------------------


async def test_list_show_ps_copy_delete(server: RealOllama, meter: Meter) -> None:
    async with ollama.AsyncClient(host=meter.url) as client:
        load = await client.generate(model="tiny")  # so that /api/ps has a model to report
    assert load.done_reason == "load"
    assert meter.value("done_total", endpoint="/api/generate", model=TINY, done_reason="load") == 1

    async def inspect(c: ollama.AsyncClient) -> Any:
        return await c.list(), await c.show("tiny"), await c.ps()

    direct = await run(server.url, make_ollama, inspect)
    proxied = await run(meter.url, make_ollama, inspect)
    assert [c.comparable() for c in proxied.captured] == [c.comparable() for c in direct.captured]
    assert repr(proxied.result) == repr(direct.result)
    tags, show, ps = proxied.result
    assert [m.model for m in tags.models] == [TINY]
    assert show.details.family == "llama"
    [loaded] = ps.models
    assert loaded.model == TINY

    # The scrape reads /api/ps in the shape the real server gives it.
    async with aiohttp.ClientSession() as session, session.get(meter.url + "/metrics") as response:
        assert response.status == 200
    assert meter.value("upstream_up") == 1
    assert meter.value("loaded_models") == 1
    assert meter.value("model_size_bytes", model=TINY) == loaded.size
    assert meter.value("model_vram_bytes", model=TINY) == loaded.size_vram
    assert meter.value("model_context_length", model=TINY) == loaded.context_length
    assert meter.value("model_expiry_timestamp_seconds", model=TINY) == pytest.approx(
        loaded.expires_at.timestamp()
    )

    def copy_list_delete(name: str) -> Callable[[ollama.AsyncClient], Awaitable[Any]]:
        async def act(c: ollama.AsyncClient) -> Any:
            copied = await c.copy("tiny", name)
            listed = sorted(str(m.model) for m in (await c.list()).models)
            deleted = await c.delete(name)
            return copied.status, listed, deleted.status

        return act

    direct = await run(server.url, make_ollama, copy_list_delete("tiny-direct"))
    proxied = await run(meter.url, make_ollama, copy_list_delete("tiny-proxied"))
    assert direct.result == ("success", ["tiny-direct:latest", TINY], "success")
    assert proxied.result == ("success", ["tiny-proxied:latest", TINY], "success")
    for copy_or_delete in (0, 2):  # empty 200 answers, byte for byte
        assert (
            proxied.captured[copy_or_delete].comparable()
            == direct.captured[copy_or_delete].comparable()
        )
    async with ollama.AsyncClient(host=server.url) as client:
        assert [m.model for m in (await client.list()).models] == [TINY]

    plain = {"stream": "false", "status": "200"}
    assert meter.value("requests_total", endpoint="/api/copy", model=TINY, **plain) == 1
    assert (
        meter.value("requests_total", endpoint="/api/delete", model="tiny-proxied:latest", **plain)
        == 1
    )
    assert meter.value("requests_total", endpoint="/api/tags", model="unknown", **plain) == 2
    assert meter.value("requests_total", endpoint="/api/show", model=TINY, **plain) == 1
    assert meter.value("requests_total", endpoint="/api/ps", model="unknown", **plain) == 1


# --- Errors ------------------------------------------------------------------------------


async def test_missing_model_raises_what_it_raises_direct(server: RealOllama, meter: Meter) -> None:
    calls: dict[str, Callable[[ollama.AsyncClient], Awaitable[Any]]] = {
        "/api/chat": lambda c: c.chat(model="nope", messages=MESSAGES),
        "/api/generate": lambda c: collect(c.generate(model="nope", prompt=PROMPT, stream=True)),
        "/api/embed": lambda c: c.embed(model="nope", input=PROMPT),
        "/api/show": lambda c: c.show("nope"),
        "/api/copy": lambda c: c.copy("nope", "nope-copy"),
        "/api/delete": lambda c: c.delete("nope"),
    }

    async def errors(c: ollama.AsyncClient) -> dict[str, tuple[int, str]]:
        raised = {}
        for endpoint, call in calls.items():
            with pytest.raises(ollama.ResponseError) as caught:
                await call(c)
            raised[endpoint] = (caught.value.status_code, caught.value.error)
        return raised

    direct = await run(server.url, make_ollama, errors)
    proxied = await run(meter.url, make_ollama, errors)
    assert proxied.result == direct.result
    assert [c.comparable() for c in proxied.captured] == [c.comparable() for c in direct.captured]
    assert proxied.result["/api/chat"] == (404, "model 'nope' not found")
    for endpoint, (status, _) in proxied.result.items():
        stream = "true" if endpoint == "/api/generate" else "false"
        assert (
            meter.value(
                "requests_total",
                endpoint=endpoint,
                model="nope:latest",
                stream=stream,
                status=str(status),
            )
            == 1
        ), endpoint

    async def openai_error(c: openai.AsyncOpenAI) -> Any:
        with pytest.raises(openai.NotFoundError) as caught:
            await c.chat.completions.create(model="nope", messages=MESSAGES)
        return caught.value.status_code, caught.value.body

    direct = await run(server.url, make_openai, openai_error)
    proxied = await run(meter.url, make_openai, openai_error)
    assert proxied.result == direct.result
    assert proxied.captured[0].comparable() == direct.captured[0].comparable()
    assert proxied.result[1]["message"] == "model 'nope' not found"


# Requests whose answers do not change from run to run: compared byte for byte.
EXCHANGES: Final[list[tuple[str, str, bytes | None, dict[str, str]]]] = [
    ("GET", "/", None, {}),
    ("HEAD", "/", None, {}),
    ("GET", "/api/version", None, {}),
    ("HEAD", "/api/version", None, {}),
    ("GET", "/api/tags", None, {}),
    ("POST", "/api/show", b'{"model":"tiny"}', {}),
    ("POST", "/api/show", b"{}", {}),
    ("POST", "/api/chat", b"", {}),
    ("POST", "/api/generate", b'{"model": "tiny", oops', {}),
    ("POST", "/api/generate", b"[1]", {}),
    ("POST", "/api/embed", b'{"model":"tiny","input":"hi"}', {}),
    ("HEAD", "/api/blobs/sha256:" + "0" * 64, None, {}),
    ("GET", "/v1/models", None, {}),
    ("GET", "/v1/models/tiny", None, {}),
    ("GET", "/v1/models/nope", None, {}),
    ("POST", "/v1/chat/completions", b'{"model":"tiny","messages":[]}', {}),
    ("POST", "/v1/embeddings", b'{"model":"nope","input":"hi"}', {}),
    ("GET", "/no/such/path", None, {}),
    ("GET", "/api/chat", None, {}),
    ("POST", "/api/tags", None, {}),
    ("GET", "/api/version", None, {"Origin": "http://evil.example"}),
    ("OPTIONS", "/api/chat", None, {"Origin": "http://localhost:3000"}),
]


@dataclass
class Got:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def comparable(self) -> tuple[int, list[tuple[str, str]], bytes]:
        """Status, headers that must pass unchanged, and body."""
        kept = [(k.lower(), v) for k, v in self.headers if k.lower() not in VOLATILE]
        return self.status, sorted(kept), self.body


async def fetch(
    session: aiohttp.ClientSession, method: str, url: str, data: bytes | None, headers: Any
) -> Got:
    """One exchange as it went on the wire (redirects are answers too, not followed)."""
    async with session.request(
        method, url, data=data, headers=headers, allow_redirects=False
    ) as response:
        return Got(response.status, list(response.headers.items()), await response.read())


@pytest.mark.parametrize(("method", "path", "body", "headers"), EXCHANGES)
async def test_deterministic_answers_pass_byte_for_byte(
    server: RealOllama,
    meter: Meter,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
) -> None:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        direct = await fetch(session, method, server.url + path, body, headers)
        proxied = await fetch(session, method, meter.url + path, body, headers)
    assert proxied.comparable() == direct.comparable()
    assert [labels["status"] for labels in requests_counted(meter)] == [str(direct.status)]


async def test_foreign_host_is_refused_by_the_proxy(server: RealOllama, meter: Meter) -> None:
    """A page on evil.example whose name resolves to 127.0.0.1 (DNS rebinding) must not reach
    Ollama through the proxy, which would otherwise rewrite Host to one Ollama accepts."""
    foreign = {"Host": "evil.example"}
    async with aiohttp.ClientSession() as session:
        direct = await fetch(session, "GET", server.url + "/api/version", None, foreign)
        proxied = await fetch(session, "GET", meter.url + "/api/version", None, foreign)
    assert direct.status == 403  # Ollama's own defence on its loopback listener
    assert proxied.status == 403


# --- The fake Ollama against the real one ------------------------------------------------

ZEROS: Final = "sha256:" + "0" * 64
CHAT_HI: Final = b'{"model":"llama9","messages":[{"role":"user","content":"hi"}]}'
V1_HI: Final = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'

# Answers that do not depend on which models a server has (llama9 and gpt-4o are missing on
# both), so the fake's must equal the real server's, byte for byte.
FAKE_EXCHANGES: Final[list[tuple[str, str, bytes | None, dict[str, str]]]] = [
    ("GET", "/", None, {}),
    ("HEAD", "/", None, {}),
    ("GET", "/no/such/path", None, {}),
    ("GET", "/api/chat", None, {}),
    ("POST", "/api/tags", None, {}),
    ("HEAD", "/api/ps", None, {}),
    ("OPTIONS", "/api/tags", None, {}),
    ("GET", "/api/version/?a=1&b=2", None, {}),
    ("HEAD", "/api/tags/", None, {}),
    ("POST", "/api/chat/", b"{}", {}),
    ("GET", "/v1/models/", None, {}),
    ("GET", "/api/blobs/", None, {}),
    ("GET", "/api/version", None, {"Host": "evil.example"}),
    ("POST", "/api/version", None, {"Host": "evil.example:80"}),
    ("GET", "/no/such/path", None, {"Host": "8.8.8.8"}),
    ("POST", "/api/chat", b"", {}),
    ("POST", "/api/generate", b"  ", {}),
    ("POST", "/api/generate", b'{"model": "llama9", oops', {}),
    ("POST", "/api/generate", b'{"model":"llama9" "x"}', {}),
    ("POST", "/api/generate", b'{"model":"llama9",}', {}),
    ("POST", "/api/generate", b"[1 2]", {}),
    ("POST", "/api/generate", b"trux", {}),
    ("POST", "/api/generate", b'{"a": 1.}', {}),
    ("POST", "/api/generate", b'{"a": "\x01"}', {}),
    ("POST", "/api/generate", b'{"a": "\\q"}', {}),
    ("POST", "/api/generate", b'{"a": "\\u12"}', {}),
    ("POST", "/api/generate", b'{"model": "llama9"', {}),
    ("POST", "/api/generate", "\u00e9".encode(), {}),
    ("POST", "/api/generate", b"\xff", {}),
    ("POST", "/api/generate", b'"text"', {}),
    ("POST", "/api/generate", b'{"model":5}', {}),
    ("POST", "/api/generate", b'{"model":"llama9","stream":"yes"}', {}),
    ("POST", "/api/generate", b"null", {}),
    ("POST", "/api/generate", b'{"model":"llama9","prompt":"hi"} and more', {}),
    ("POST", "/api/chat", b"{}", {}),
    ("POST", "/api/chat", CHAT_HI, {}),
    ("POST", "/api/show", b"[1]", {}),
    ("POST", "/api/show", b"{}", {}),
    ("POST", "/api/show", b'{"name":"llama9"}', {}),
    ("POST", "/api/embed", b"{}", {}),
    ("POST", "/api/embed", b'{"model":"llama9","input":"hi"}', {}),
    ("POST", "/api/embeddings", b"{}", {}),
    ("POST", "/api/embeddings", b'{"model":"llama9","prompt":"hi"}', {}),
    ("POST", "/api/copy", b"{}", {}),
    ("POST", "/api/copy", b'{"source":"llama9"}', {}),
    ("POST", "/api/copy", b'{"source":"llama9","destination":"x"}', {}),
    ("DELETE", "/api/delete", b"{}", {}),
    ("DELETE", "/api/delete", b'{"model":"llama9"}', {}),
    ("POST", "/api/pull", b"{}", {}),
    ("POST", "/api/create", b"{}", {}),
    ("HEAD", "/api/blobs/not-a-digest", None, {}),
    ("HEAD", f"/api/blobs/{ZEROS}", None, {}),
    ("POST", "/api/blobs/not-a-digest", b"abc", {}),
    ("POST", f"/api/blobs/{ZEROS}", b"abc", {}),
    ("POST", "/v1/chat/completions", b"", {}),
    ("POST", "/v1/chat/completions", b"oops", {}),
    ("POST", "/v1/chat/completions", b"[1]", {}),
    ("POST", "/v1/chat/completions", b'{"model":5}', {}),
    ("POST", "/v1/chat/completions", b'{"model":"gpt-4o","messages":[]}', {}),
    ("POST", "/v1/chat/completions", b'{"messages":[{"role":"user","content":"hi"}]}', {}),
    ("POST", "/v1/chat/completions", V1_HI, {}),
    ("POST", "/v1/completions", b"{}", {}),
    ("POST", "/v1/completions", b'{"model":"gpt-4o","prompt":"hi"}', {}),
    ("POST", "/v1/embeddings", b'{"model":"gpt-4o"}', {}),
    ("POST", "/v1/embeddings", b'{"input":"hi"}', {}),
    ("POST", "/v1/embeddings", b'{"model":"gpt-4o","input":"hi"}', {}),
    ("GET", "/v1/models/llama9", None, {}),
]


@pytest.mark.parametrize(("method", "path", "body", "headers"), FAKE_EXCHANGES)
async def test_the_fake_answers_as_the_real_server_does(
    server: RealOllama,
    fake: FakeOllama,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
) -> None:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        real = await fetch(session, method, server.url + path, body, headers)
        faked = await fetch(session, method, fake.url + path, body, headers)
    assert faked.comparable() == real.comparable()


# --- A client that goes away -------------------------------------------------------------

#: A generation that, left alone, runs for a few hundred milliseconds and ends normally
#: ("length"): the repeat penalty keeps this random model out of the loops that Ollama cuts
#: short itself, which would log a cancel too.
LONG: Final = {"seed": 1, "temperature": 0, "num_predict": 500, "repeat_penalty": 2}
#: What the runner logs when the request it serves is cancelled.
RUNNER_CANCEL: Final = "stop: cancel task"


async def wait_for_log(server: RealOllama, text: str, count: int) -> None:
    """Until ``text`` has occurred ``count`` times in the server's log (at most 10 s).

    This waits for other processes (the runner writes through the server into the file), which
    offer no event to await, so the file is re-read every 50 ms.
    """
    try:
        async with asyncio.timeout(10):
            while server.log_count(text) < count:  # noqa: ASYNC110 (another process: no event)
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"{text!r} did not reach {count} in {server.log} in 10 s") from None


async def test_dropped_stream_is_counted_and_the_runner_cancels(
    server: RealOllama, meter: Meter
) -> None:
    async with ollama.AsyncClient(host=server.url) as direct:
        whole = await direct.generate(model="tiny", prompt=PROMPT, options=LONG)
    # The premise: this generation ends by itself, normally, when nobody leaves.
    assert (whole.done, whole.done_reason, whole.eval_count) == (
        True,
        "length",
        LONG["num_predict"],
    )

    cancels = server.log_count(RUNNER_CANCEL)
    async with ollama.AsyncClient(host=meter.url) as client:
        stream = await client.generate(model="tiny", prompt=PROMPT, options=LONG, stream=True)
        async with contextlib.aclosing(stream) as parts:
            first = await anext(parts)
        # Leaving the block closed the response after one part: the connection is dropped.
    assert not first.done
    await wait_for_log(server, RUNNER_CANCEL, cancels + 1)
    # The proxy records a request in the step in which it closes the upstream connection, so
    # the runner's cancel, which follows from that close, comes after the counts exist.
    labels = {"endpoint": "/api/generate", "model": TINY}
    assert meter.value("requests_total", **labels, stream="true", status="499") == 1
    assert meter.value("request_errors_total", **labels, reason="client_disconnect") == 1
    assert meter.value("requests_in_flight", **labels) == 0
    assert meter.value("completion_tokens_total", **labels, stream="true") == 0


async def test_keys_and_roles_in_front_of_the_real_server(
    server: RealOllama, start_meter: MeterFactory, tmp_path: Path
) -> None:
    """With access control on, a keyed client gets the same answers as direct, with the
    key's usage counted; a keyless one and a read key are refused before Ollama sees them."""
    keys = make_keys(tmp_path)
    meter = await start_meter(upstream=server.url, settings=access_settings(keys))

    async def act(client: ollama.AsyncClient) -> Any:
        return await client.list(), await client.show("tiny")

    direct = await run(server.url, make_ollama, act)
    transport = recording_transport_for(make_ollama)
    async with ollama.AsyncClient(
        host=meter.url, transport=transport, headers={"Authorization": f"Bearer {keys.read}"}
    ) as client:
        proxied = Run(transport.captured, await act(client))
        with pytest.raises(ollama.ResponseError) as refused:
            await client.generate(model="tiny", prompt="hi")
        assert refused.value.status_code == 403
    # The two answers, then the refusal.
    compared = [c.comparable() for c in proxied.captured[:2]]
    assert compared == [c.comparable() for c in direct.captured]
    async with ollama.AsyncClient(
        host=meter.url, headers={"Authorization": f"Bearer {keys.inference}"}
    ) as user:
        reply = await user.generate(model="tiny", prompt="hi", options={"num_predict": 3})
    assert reply.eval_count
    tokens = meter.value("key_completion_tokens_total", key="alice", team="ml", model=TINY)
    assert tokens == reply.eval_count
    async with ollama.AsyncClient(host=meter.url) as anonymous:
        with pytest.raises(ollama.ResponseError) as refused:
            await anonymous.list()
    assert refused.value.status_code == 401

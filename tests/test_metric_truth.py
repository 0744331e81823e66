"""The numbers tell what was delivered: when a stream counts as complete, what its bytes and
tokens are when it ends early, which streams feed time to first token, how many streams
carried no usage, and the opt-in usage for OpenAI-style streams (--openai-stream-usage).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from .clients import make_openai, openai_httpx, recording_transport
from .conftest import Meter, MeterFactory
from .fake_ollama import NDJSON, SSE, FakeOllama, Reply, events_of, final_object, lines_of
from .test_official_clients import MESSAGES

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
LABELS = {"endpoint": "/api/chat", "model": "llama3.2:latest"}
V1 = {"endpoint": "/v1/chat/completions", "model": "llama3.2:latest"}


def held_after_the_last_line(name: str, gate: asyncio.Event) -> Reply:
    """A stream whose end (the chunked terminator) waits for ``gate`` after its last line,
    as when Ollama has sent done:true and not yet finished the response."""
    lines = lines_of(name)
    return Reply(content_type=NDJSON, chunks=[*lines, b""], gates={len(lines): gate})


async def test_a_stream_counts_once_its_final_object_has_passed(
    fake: FakeOllama, meter: Meter
) -> None:
    gate = asyncio.Event()
    fake.script("POST", "/api/chat", held_after_the_last_line("chat_stream.ndjson", gate))
    final = final_object("chat_stream.ndjson")
    async with (
        aiohttp.ClientSession() as session,
        session.post(meter.url + "/api/chat", json=CHAT) as response,
    ):
        while not (line := await response.content.readline()).startswith(b'{"model"') or (
            b'"done":true' not in line
        ):
            pass
        # The client has the final object; the body has not ended: the request is counted.
        assert (
            meter.value("completion_tokens_total", **LABELS, stream="true") == final["eval_count"]
        )
        assert meter.value("requests_total", **LABELS, stream="true", status="200") == 1
        assert meter.value("requests_in_flight", **LABELS) == 0
        gate.set()
        assert await response.read() == b""
    assert meter.value("requests_total", **LABELS, stream="true", status="200") == 1


async def test_a_client_that_leaves_after_done_got_a_complete_answer(
    fake: FakeOllama, meter: Meter
) -> None:
    """ollama-js stops reading at done:true; a script that exits then must not be a 499."""
    fake.script(
        "POST", "/api/chat", held_after_the_last_line("chat_stream.ndjson", asyncio.Event())
    )
    lines = lines_of("chat_stream.ndjson")
    async with aiohttp.ClientSession() as session:
        response = await session.post(meter.url + "/api/chat", json=CHAT)
        for line in lines:
            assert await response.content.readline() == line
        response.close()
    await asyncio.wait_for(fake.cancelled.wait(), timeout=5)
    final = final_object("chat_stream.ndjson")
    assert meter.value("requests_total", **LABELS, stream="true", status="200") == 1
    assert meter.value("requests_total", **LABELS, stream="true", status="499") == 0
    assert meter.value("request_errors_total", **LABELS, reason="client_disconnect") == 0
    assert meter.value("completion_tokens_total", **LABELS, stream="true") == final["eval_count"]
    assert meter.value("done_total", **LABELS, done_reason="stop") == 1
    assert meter.value("response_bytes_total", **LABELS, stream="true") == len(b"".join(lines))


async def test_a_tool_argument_named_done_is_not_the_end(fake: FakeOllama, meter: Meter) -> None:
    # "done":true inside a tool call's arguments object looks like the marker; it is not final.
    early = (
        b'{"model":"llama3.2","message":{"tool_calls":[{"function":{"arguments":'
        b'{"done":true}}}]},"done":false}\n'
    )
    lines = [early, *lines_of("chat_stream.ndjson")]
    gate = asyncio.Event()
    fake.script("POST", "/api/chat", Reply(content_type=NDJSON, chunks=lines, gates={1: gate}))
    async with (
        aiohttp.ClientSession() as session,
        session.post(meter.url + "/api/chat", json=CHAT) as response,
    ):
        assert await response.content.readline() == early
        assert meter.value("requests_total", **LABELS, stream="true", status="200") == 0
        gate.set()
        await response.read()
    assert meter.value("requests_total", **LABELS, stream="true", status="200") == 1


@pytest.mark.parametrize("how", ["client_leaves", "upstream_cuts"])
async def test_bytes_of_a_stream_that_ends_early_are_counted(
    fake: FakeOllama, meter: Meter, how: str
) -> None:
    lines = lines_of("chat_stream.ndjson")
    if how == "client_leaves":
        reply = Reply(content_type=NDJSON, chunks=lines, gates={1: asyncio.Event()})
        delivered = lines[0]
    else:
        reply = Reply(content_type=NDJSON, chunks=lines[:2], cut=True)
        delivered = lines[0] + lines[1]
    fake.script("POST", "/api/chat", reply)
    async with aiohttp.ClientSession() as session:
        response = await session.post(meter.url + "/api/chat", json=CHAT)
        got = await response.content.readline()
        if how == "client_leaves":
            response.close()
            await asyncio.wait_for(fake.cancelled.wait(), timeout=5)
        else:
            with pytest.raises(aiohttp.ClientPayloadError):
                got += await response.read()
            response.close()
    assert meter.value("response_bytes_total", **LABELS, stream="true") == len(delivered)
    reason = "client_disconnect" if how == "client_leaves" else "upstream_closed"
    assert meter.value("usage_missing_total", **LABELS, reason=reason) == 1
    assert meter.value("unmetered_chunks_total", **LABELS) == delivered.count(b"\n")


async def test_time_to_first_token_is_inference_only(fake: FakeOllama, meter: Meter) -> None:
    async with aiohttp.ClientSession() as session:
        for path, body in [("/api/pull", {"model": "llama3.2"}), ("/api/chat", CHAT)]:
            async with session.post(meter.url + path, json=body) as response:
                await response.read()
    assert meter.value("time_to_first_token_seconds_count", **LABELS) == 1
    endpoints = {s["endpoint"] for s in meter.series("time_to_first_token_seconds_count")}
    assert endpoints == {"/api/chat"}
    assert meter.series("usage_missing_total") == []


async def test_a_final_line_longer_than_the_tail_is_complete_without_usage(
    fake: FakeOllama, start_meter: MeterFactory
) -> None:
    meter = await start_meter(max_response_tail=64)
    async with (
        aiohttp.ClientSession() as session,
        session.post(meter.url + "/api/chat", json=CHAT) as response,
    ):
        await response.read()
    assert meter.value("usage_missing_total", **LABELS, reason="too_large") == 1
    assert meter.value("request_errors_total", **LABELS, reason="upstream_closed") == 0
    assert meter.value("requests_total", **LABELS, stream="true", status="200") == 1


# --- --openai-stream-usage ------------------------------------------------------------------


async def openai_stream(url: str, include_usage: bool = False) -> tuple[bytes, list[Any]]:
    """An openai SDK chat stream: the raw bytes its HTTP layer received, and its chunks."""
    transport = recording_transport(openai_httpx())
    client = make_openai(url, transport)
    options: Any = {"include_usage": True} if include_usage else openai.NOT_GIVEN
    stream: Any = await client.chat.completions.create(
        model="llama3.2", messages=MESSAGES, stream=True, stream_options=options
    )
    chunks = [chunk.model_dump() async for chunk in stream]
    await client.close()
    [captured] = transport.captured
    return bytes(captured.body), chunks


async def test_stream_usage_is_counted_and_the_client_sees_what_it_would_have(
    fake: FakeOllama, start_meter: MeterFactory
) -> None:
    meter = await start_meter(openai_stream_usage=True)
    direct, direct_chunks = await openai_stream(fake.url)
    asked = orjson.loads(fake.last("/v1/chat/completions").body)
    proxied, proxied_chunks = await openai_stream(meter.url)
    assert proxied == direct
    assert proxied_chunks == direct_chunks
    assert b'"choices":[]' not in proxied
    # What Ollama got: the client's body with include_usage added, nothing else changed.
    forwarded = orjson.loads(fake.last("/v1/chat/completions").body)
    assert forwarded == {**asked, "stream_options": {"include_usage": True}}
    usage = orjson.loads(events_of("v1_chat_stream_usage.sse")[-2][len(b"data: ") :])["usage"]
    assert meter.value("prompt_tokens_total", **V1, stream="true") == usage["prompt_tokens"]
    assert meter.value("completion_tokens_total", **V1, stream="true") == usage["completion_tokens"]
    assert meter.series("usage_missing_total") == []


async def test_stream_usage_asked_for_by_the_client_passes_untouched(
    fake: FakeOllama, start_meter: MeterFactory
) -> None:
    meter = await start_meter(openai_stream_usage=True)
    direct, _ = await openai_stream(fake.url, include_usage=True)
    sent = fake.last("/v1/chat/completions").body
    proxied, _ = await openai_stream(meter.url, include_usage=True)
    assert proxied == direct
    assert b'"choices":[]' in proxied
    assert fake.last("/v1/chat/completions").body == sent


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true}',
        b' {"stream": true, "model": "llama3.2", "messages": [{"role": "user", "content": "x"}] }',
        b'{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true,'
        b'"stream_options":{"include_usage":false}}',
    ],
)
async def test_stream_usage_rewrites_only_what_it_must(
    fake: FakeOllama, start_meter: MeterFactory, body: bytes
) -> None:
    meter = await start_meter(openai_stream_usage=True)
    async with (
        aiohttp.ClientSession() as session,
        session.post(meter.url + "/v1/chat/completions", data=body) as response,
    ):
        got = await response.read()
    forwarded = fake.last("/v1/chat/completions").body
    assert orjson.loads(forwarded) == {
        **orjson.loads(body),
        "stream_options": {"include_usage": True},
    }
    if b"stream_options" not in body:  # inserted, every other byte as the client sent it
        brace = body.index(b"{") + 1
        assert (
            forwarded == body[:brace] + b'"stream_options":{"include_usage":true},' + body[brace:]
        )
    assert b'"choices":[]' not in got
    assert meter.value("completion_tokens_total", **V1, stream="true") == 3


async def test_without_the_option_a_v1_stream_is_counted_as_unmetered(
    fake: FakeOllama, meter: Meter
) -> None:
    body, _ = await openai_stream(meter.url)
    assert meter.value("usage_missing_total", **V1, reason="not_requested") == 1
    assert meter.value("unmetered_chunks_total", **V1) == body.count(b"data:")


@pytest.mark.parametrize("split", [1, 7, 64])
async def test_hidden_usage_keeps_bytes_at_any_chunking(
    fake: FakeOllama, start_meter: MeterFactory, split: int
) -> None:
    meter = await start_meter(openai_stream_usage=True)
    whole = b"".join(events_of("v1_chat_stream_usage.sse"))
    pieces = [whole[i : i + split] for i in range(0, len(whole), split)]
    fake.script("POST", "/v1/chat/completions", Reply(content_type=SSE, chunks=pieces))
    async with (
        aiohttp.ClientSession() as session,
        session.post(meter.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as response,
    ):
        got = await response.read()
    expected = b"".join(
        e for e in events_of("v1_chat_stream_usage.sse") if b'"choices":[]' not in e
    )
    assert got == expected
    assert meter.value("completion_tokens_total", **V1, stream="true") == 3


@pytest.mark.parametrize(
    "options",
    [
        b'"stream_options":{"Include_Usage":true}',
        b'"Stream_Options":{"include_usage":true}',
        b'"stream_options":{"include_usage":1}',
        b'"stream_options":"x"',
    ],
)
async def test_stream_usage_leaves_alone_what_ollama_would_read_differently(
    fake: FakeOllama, start_meter: MeterFactory, options: bytes
) -> None:
    """Go matches JSON keys case-insensitively and refuses bad values: such a body passes as
    it is, never rewritten into something else."""
    meter = await start_meter(openai_stream_usage=True)
    body = b'{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true,' + (
        options + b"}"
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(meter.url + "/v1/chat/completions", data=body) as response,
    ):
        await response.read()
    assert fake.last("/v1/chat/completions").body == body


async def test_hidden_usage_gives_up_on_an_event_that_never_ends(
    fake: FakeOllama, start_meter: MeterFactory
) -> None:
    meter = await start_meter(openai_stream_usage=True, max_response_tail=1024)
    endless = [b"data: " + b"x" * 600] + [b"y" * 600 for _ in range(10)]
    fake.script("POST", "/v1/chat/completions", Reply(content_type=SSE, chunks=endless))
    async with (
        aiohttp.ClientSession() as session,
        session.post(meter.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as response,
    ):
        got = await response.read()
    assert got == b"".join(endless)


async def test_a_final_marker_split_across_chunks_still_counts_at_once(
    fake: FakeOllama, meter: Meter
) -> None:
    lines = lines_of("chat_stream.ndjson")
    final = lines[-1]
    cut = final.index(b'"done":true') + len(b'"done":t')
    chunks = [*lines[:-1], final[:cut], final[cut:], b""]
    gate = asyncio.Event()
    fake.script(
        "POST",
        "/api/chat",
        Reply(content_type=NDJSON, chunks=chunks, gates={len(chunks) - 1: gate}),
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(meter.url + "/api/chat", json=CHAT) as response,
    ):
        for line in lines:
            assert await response.content.readline() == line
        assert meter.value("requests_total", **LABELS, stream="true", status="200") == 1
        gate.set()
        await response.read()

"""The official clients, pointed at ollama-meter, get exactly what they get from Ollama.

Each exchange runs twice with the same client library: straight to the fake Ollama, then through
ollama-meter. The raw response bytes the client received (recorded under its HTTP layer), what
the upstream received, and what the library returned must be the same; then the metric deltas
are checked against the numbers in the fixtures.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import ollama
import openai
import pytest

from .clients import (
    Captured,
    collect,
    make_ollama,
    make_openai,
    recording_transport_for,
)
from .conftest import Meter, MeterFactory, unused_port
from .fake_ollama import (
    EMBEDDING,
    MISSING_MODEL,
    FakeOllama,
    final_object,
    fixture,
    lines_of,
)

T = TypeVar("T")

# Any: the openai SDK types messages as TypedDicts, the ollama package as Mappings.
MESSAGES: Any = [{"role": "user", "content": "Why is the sky blue? Two words."}]
CHAT_LABELS = {"endpoint": "/api/chat", "model": "llama3.2:latest"}


async def twice(
    fake: FakeOllama,
    meter: Meter,
    make: Callable[[str, Any], Any],
    act: Callable[[Any], Awaitable[T]],
) -> tuple[list[Captured], T]:
    """Run ``act`` with a client made for the fake, then for the proxy; compare; return proxied."""
    runs = []
    for url in (fake.url, meter.url):
        transport = recording_transport_for(make)
        client = make(url, transport)
        start = len(fake.received)
        result = await act(client)
        await client.close()
        runs.append((transport.captured, fake.received[start:], result))
    (direct_bytes, direct_up, direct_result), (proxied_bytes, proxied_up, proxied_result) = runs
    assert [c.comparable() for c in proxied_bytes] == [c.comparable() for c in direct_bytes]
    assert [r.view() for r in proxied_up] == [r.view() for r in direct_up]
    assert repr(proxied_result) == repr(direct_result)
    return proxied_bytes, proxied_result


def assert_native_tokens(meter: Meter, fixture_name: str, endpoint: str, stream: str) -> None:
    final = final_object(fixture_name)
    labels = {"endpoint": endpoint, "model": "llama3.2:latest"}
    assert meter.value("prompt_tokens_total", **labels, stream=stream) == final["prompt_eval_count"]
    assert meter.value("completion_tokens_total", **labels, stream=stream) == final["eval_count"]
    assert meter.value("eval_seconds_total", **labels) == pytest.approx(
        final["eval_duration"] / 1e9
    )
    assert meter.value("prompt_eval_seconds_total", **labels) == pytest.approx(
        final["prompt_eval_duration"] / 1e9
    )
    assert meter.value("done_total", **labels, done_reason="stop") == 1
    assert meter.value("load_duration_seconds_sum", model="llama3.2:latest") == pytest.approx(
        final["load_duration"] / 1e9
    )
    assert meter.value(
        "time_per_output_token_seconds_sum", model="llama3.2:latest"
    ) == pytest.approx(final["eval_duration"] / 1e9 / final["eval_count"])


# --- ollama -------------------------------------------------------------------------------


async def test_chat_stream(fake: FakeOllama, meter: Meter) -> None:
    captured, parts = await twice(
        fake,
        meter,
        make_ollama,
        lambda c: collect(c.chat(model="llama3.2", messages=MESSAGES, stream=True)),
    )
    assert "".join(p.message.content for p in parts) == "Rayleigh scattering."
    assert captured[0].body == fixture("chat_stream.ndjson")
    assert meter.value("requests_total", **CHAT_LABELS, stream="true", status="200") == 1
    assert meter.value("response_bytes_total", **CHAT_LABELS, stream="true") == len(
        fixture("chat_stream.ndjson")
    )
    assert (
        meter.value("request_bytes_total", **CHAT_LABELS, stream="true") == fake.received[-1].size
    )
    assert meter.value("time_to_first_token_seconds_count", **CHAT_LABELS) == 1
    assert meter.value("request_duration_seconds_count", **CHAT_LABELS, stream="true") == 1
    assert_native_tokens(meter, "chat_stream.ndjson", "/api/chat", "true")


async def test_chat_non_stream(fake: FakeOllama, meter: Meter) -> None:
    _, reply = await twice(
        fake, meter, make_ollama, lambda c: c.chat(model="llama3.2", messages=MESSAGES)
    )
    assert reply.message.content == "Rayleigh scattering."
    assert meter.value("requests_total", **CHAT_LABELS, stream="false", status="200") == 1
    # Not a streamed response: no time to first token.
    assert meter.value("time_to_first_token_seconds_count", **CHAT_LABELS) == 0
    assert_native_tokens(meter, "chat_stream.ndjson", "/api/chat", "false")


@pytest.mark.parametrize("stream", [True, False])
async def test_generate(fake: FakeOllama, meter: Meter, stream: bool) -> None:
    async def act(c: ollama.AsyncClient) -> Any:
        if stream:
            return await collect(
                c.generate(model="llama3.2", prompt="One French word?", stream=True)
            )
        return await c.generate(model="llama3.2", prompt="One French word?")

    _, result = await twice(fake, meter, make_ollama, act)
    text = "".join(p.response for p in result) if stream else result.response
    assert text == "Un café."
    flag = "true" if stream else "false"
    assert_native_tokens(meter, "generate_stream.ndjson", "/api/generate", flag)


async def test_load_and_unload_are_counted_as_such(fake: FakeOllama, meter: Meter) -> None:
    async def act(c: ollama.AsyncClient) -> Any:
        load = await c.generate(model="llama3.2")
        unload = await c.chat(model="llama3.2", messages=[], keep_alive=0)
        return load, unload

    _, (load, unload) = await twice(fake, meter, make_ollama, act)
    assert (load.done_reason, unload.done_reason) == ("load", "unload")
    model = "llama3.2:latest"
    assert meter.value("done_total", endpoint="/api/generate", model=model, done_reason="load") == 1
    assert meter.value("done_total", endpoint="/api/chat", model=model, done_reason="unload") == 1
    assert (
        meter.value("completion_tokens_total", endpoint="/api/chat", model=model, stream="false")
        == 0
    )


async def test_embed(fake: FakeOllama, meter: Meter) -> None:
    _, reply = await twice(
        fake,
        meter,
        make_ollama,
        lambda c: c.embed(model="nomic-embed-text", input=["first text", "second text"]),
    )
    assert len(reply.embeddings) == 2
    labels = {"endpoint": "/api/embed", "model": "nomic-embed-text:latest"}
    assert meter.value("prompt_tokens_total", **labels, stream="false") == reply.prompt_eval_count
    assert meter.value("completion_tokens_total", **labels, stream="false") == 0


async def test_list_ps_show(fake: FakeOllama, meter: Meter) -> None:
    async def act(c: ollama.AsyncClient) -> Any:
        return await c.list(), await c.ps(), await c.show("llama3.2")

    _, (tags, ps, show) = await twice(fake, meter, make_ollama, act)
    assert [m.model for m in tags.models] == [
        "llama3.2:latest",
        "qwen3:8b",
        "nomic-embed-text:latest",
    ]
    assert ps.models[0].size_vram == 2684354560
    assert show.details.family == "llama"
    assert (
        meter.value(
            "requests_total", endpoint="/api/tags", model="unknown", stream="false", status="200"
        )
        == 1
    )
    assert (
        meter.value(
            "requests_total",
            endpoint="/api/show",
            model="llama3.2:latest",
            stream="false",
            status="200",
        )
        == 1
    )


async def test_pull_progress(fake: FakeOllama, meter: Meter) -> None:
    _, parts = await twice(
        fake, meter, make_ollama, lambda c: collect(c.pull("llama3.2", stream=True))
    )
    assert len(parts) == len(lines_of("pull_stream.ndjson"))
    assert parts[-1].status == "success"
    labels = {"endpoint": "/api/pull", "model": "llama3.2:latest"}
    assert meter.value("requests_total", **labels, stream="true", status="200") == 1
    assert meter.value("request_errors_total", **labels, reason="upstream_closed") == 0


async def test_pull_error_mid_stream(fake: FakeOllama, meter: Meter) -> None:
    async def act(c: ollama.AsyncClient) -> Any:
        with pytest.raises(ollama.ResponseError) as caught:
            await collect(c.pull("no-such-model", stream=True))
        return str(caught.value)

    _, message = await twice(fake, meter, make_ollama, act)
    assert "file does not exist" in message
    labels = {"endpoint": "/api/pull", "model": "no-such-model:latest"}
    assert meter.value("request_errors_total", **labels, reason="stream_error") == 1


async def test_blob_upload_and_create(fake: FakeOllama, meter: Meter, tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 4096)

    async def act(c: ollama.AsyncClient) -> Any:
        fake.blobs.clear()  # each run uploads to a server without the blob (else: 200, unread)
        digest = await c.create_blob(gguf)
        progress = await collect(c.create(model="mine", files={"model.gguf": digest}, stream=True))
        return digest, [p.status for p in progress]

    _, (digest, statuses) = await twice(fake, meter, make_ollama, act)
    assert statuses[-1] == "success"
    upload = fake.last(f"/api/blobs/{digest}")
    assert upload.size == gguf.stat().st_size
    assert f"sha256:{upload.sha256}" == digest
    labels = {"endpoint": "/api/blobs/{digest}", "model": "unknown", "stream": "false"}
    assert meter.value("requests_total", **labels, status="201") == 1
    assert meter.value("request_bytes_total", **labels) == gguf.stat().st_size
    assert (
        meter.value(
            "requests_total",
            endpoint="/api/create",
            model="mine:latest",
            stream="true",
            status="200",
        )
        == 1
    )


async def test_missing_model_raises_the_same_error(fake: FakeOllama, meter: Meter) -> None:
    async def act(c: ollama.AsyncClient) -> Any:
        with pytest.raises(ollama.ResponseError) as caught:
            await c.chat(model=MISSING_MODEL, messages=MESSAGES)
        return caught.value.status_code, caught.value.error

    _, (status, error) = await twice(fake, meter, make_ollama, act)
    assert (status, error) == (404, f"model '{MISSING_MODEL}' not found")


async def test_unreachable_upstream_raises_response_error(start_meter: MeterFactory) -> None:
    upstream = f"http://127.0.0.1:{unused_port()}"
    meter = await start_meter(upstream=upstream)
    async with ollama.AsyncClient(host=meter.url) as client:
        with pytest.raises(ollama.ResponseError) as caught:
            await client.chat(model="llama3.2", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert caught.value.error == "ollama-meter: upstream: connection refused"
    assert upstream.removeprefix("http://") not in caught.value.error


# --- openai -------------------------------------------------------------------------------

V1_CHAT = {"endpoint": "/v1/chat/completions", "model": "llama3.2:latest"}


@pytest.mark.parametrize("include_usage", [True, False])
async def test_openai_chat_stream(fake: FakeOllama, meter: Meter, include_usage: bool) -> None:
    async def act(c: openai.AsyncOpenAI) -> Any:
        options: Any = {"include_usage": True} if include_usage else openai.NOT_GIVEN
        stream: Any = await c.chat.completions.create(
            model="llama3.2", messages=MESSAGES, stream=True, stream_options=options
        )
        return [chunk.model_dump() async for chunk in stream]

    captured, chunks = await twice(fake, meter, make_openai, act)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Rayleigh scattering."
    assert captured[0].body.endswith(b"data: [DONE]\n\n")
    assert meter.value("requests_total", **V1_CHAT, stream="true", status="200") == 1
    assert meter.value("done_total", **V1_CHAT, done_reason="stop") == 1
    assert meter.value("time_to_first_token_seconds_count", **V1_CHAT) == 1
    assert meter.value("request_errors_total", **V1_CHAT, reason="stream_error") == 0
    tokens = meter.series("completion_tokens_total")
    if include_usage:
        assert meter.value("prompt_tokens_total", **V1_CHAT, stream="true") == 34
        assert meter.value("completion_tokens_total", **V1_CHAT, stream="true") == 3
    else:
        # Without include_usage the stream carries no counts, and none are invented.
        assert tokens == []


async def test_openai_chat(fake: FakeOllama, meter: Meter) -> None:
    _, reply = await twice(
        fake,
        meter,
        make_openai,
        lambda c: c.chat.completions.create(model="llama3.2", messages=MESSAGES),
    )
    assert reply.choices[0].message.content == "Rayleigh scattering."
    assert (
        meter.value("prompt_tokens_total", **V1_CHAT, stream="false") == reply.usage.prompt_tokens
    )
    assert meter.value("completion_tokens_total", **V1_CHAT, stream="false") == (
        reply.usage.completion_tokens
    )


async def test_openai_embeddings(fake: FakeOllama, meter: Meter) -> None:
    _, reply = await twice(
        fake,
        meter,
        make_openai,
        lambda c: c.embeddings.create(model="nomic-embed-text", input="hello"),
    )
    assert reply.data[0].embedding == pytest.approx(list(EMBEDDING))
    labels = {"endpoint": "/v1/embeddings", "model": "nomic-embed-text:latest"}
    assert meter.value("prompt_tokens_total", **labels, stream="false") == reply.usage.prompt_tokens


async def test_openai_not_found(fake: FakeOllama, meter: Meter) -> None:
    async def act(c: openai.AsyncOpenAI) -> Any:
        with pytest.raises(openai.NotFoundError) as caught:
            await c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        return caught.value.status_code, caught.value.body

    _, (status, body) = await twice(fake, meter, make_openai, act)
    assert status == 404
    assert body == {
        "message": "model 'gpt-4o' not found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }
    assert (
        meter.value(
            "requests_total",
            endpoint="/v1/chat/completions",
            model="gpt-4o:latest",
            stream="false",
            status="404",
        )
        == 1
    )


def test_fixture_embedding_is_what_base64_decodes_to() -> None:
    packed = base64.b64encode(struct.pack("<4f", *EMBEDDING))
    assert struct.unpack("<4f", base64.b64decode(packed)) == EMBEDDING

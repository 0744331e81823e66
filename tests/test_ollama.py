"""The pure wire-format module: route table, request inspection, tail observation."""

from __future__ import annotations

import random

import orjson
import pytest

from ollama_meter.ollama import (
    ENDPOINTS,
    Ending,
    Framing,
    LineTail,
    Outcome,
    RouteKind,
    Usage,
    canonical_model,
    framing_for,
    inspect_request,
    judge,
    parse_ps,
    parse_tags,
    read_outcome,
    route_for,
    tail_for,
)

from .fake_ollama import PS_MODEL, final_object, fixture

LIMIT = 1 << 20


def observe(kind: RouteKind, framing: Framing, pieces: list[bytes], limit: int = LIMIT) -> Outcome:
    tail = tail_for(framing, limit, limit)
    for piece in pieces:
        tail.feed(piece)
    return judge(kind, tail)


def splits(data: bytes) -> list[list[bytes]]:
    """Every way to cut data in two, data in 1-byte pieces, and random cuts."""
    ways = [[data[:i], data[i:]] for i in range(len(data) + 1)]
    ways.append([data[i : i + 1] for i in range(len(data))])
    rng = random.Random(1234)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(data)), 6))
        ways.append([data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)])
    return ways


def native_usage(name: str) -> Usage:
    final = final_object(name)
    return Usage(
        prompt_tokens=final["prompt_eval_count"],
        completion_tokens=final["eval_count"],
        prompt_eval_seconds=final["prompt_eval_duration"] / 1e9,
        eval_seconds=final["eval_duration"] / 1e9,
        load_seconds=final["load_duration"] / 1e9,
        done_reason=final["done_reason"],
    )


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/", "/"),
        ("/api/chat", "/api/chat"),
        ("/api/blobs/sha256:abc", "/api/blobs/{digest}"),
        ("/api/blobs/", "other"),
        ("/v1/models/llama3.2", "/v1/models/{model}"),
        ("/v1/models", "/v1/models"),
        ("/api/user/keys/ssh-ed25519", "/api/user/keys/{key}"),
        ("/api/chat/", "other"),
        ("/wp-admin/../etc/passwd", "other"),
    ],
)
def test_route_templates_are_a_fixed_set(path: str, template: str) -> None:
    assert route_for(path).template == template
    assert template in ENDPOINTS


def test_every_route_of_the_reference_has_a_template() -> None:
    reference = {
        "/", "/api/version", "/api/status", "/api/tags", "/api/ps", "/api/show", "/api/copy",
        "/api/delete", "/api/pull", "/api/push", "/api/create", "/api/blobs/{digest}",
        "/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/me",
        "/api/signout", "/api/user/keys/{key}", "/api/experimental/web_search",
        "/api/experimental/web_fetch", "/api/experimental/model-recommendations",
        "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
        "/v1/models/{model}", "/v1/responses", "/v1/messages", "/v1/audio/transcriptions",
    }  # fmt: skip
    assert set(ENDPOINTS) == reference | {"other"}


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("llama3.2", "llama3.2:latest"),
        ("llama3.2:latest", "llama3.2:latest"),
        ("qwen3:8b", "qwen3:8b"),
        ("registry.ollama.ai/library/llama3.2", "llama3.2:latest"),
        ("registry.ollama.ai/alice/mine:v1", "alice/mine:v1"),
        ("hf.co/org/repo", "hf.co/org/repo:latest"),
        ("localhost:5000/m", "localhost:5000/m:latest"),
        ("m@sha256:abcd", "m@sha256:abcd"),
    ],
)
def test_canonical_model_names(name: str, canonical: str) -> None:
    assert canonical_model(name) == canonical


@pytest.mark.parametrize(
    ("path", "body", "model", "stream"),
    [
        ("/api/chat", b'{"model":"llama3.2","messages":[]}', "llama3.2", True),
        ("/api/chat", b'{"model":"llama3.2","stream":false}', "llama3.2", False),
        ("/api/generate", b'{"model":"m","stream":"yes"}', "m", True),
        # Not a boolean: the route's default, whatever the value's truthiness.
        ("/api/chat", b'{"model":"m","stream":0}', "m", True),
        ("/v1/chat/completions", b'{"model":"m","stream":"yes"}', "m", False),
        ("/v1/chat/completions", b'{"model":"m","stream":1}', "m", False),
        ("/api/show", b'{"name":"legacy"}', "legacy", False),
        ("/api/pull", b'{"model":"","name":"n"}', "n", True),
        ("/api/copy", b'{"source":"a","destination":"b"}', "a", False),
        ("/v1/chat/completions", b'{"model":"m"}', "m", False),
        ("/v1/chat/completions", b'{"model":"m","stream":true}', "m", True),
        ("/api/chat", b"{not json", None, True),
        ("/api/chat", b'["model"]', None, True),
        ("/api/chat", b'{"model":42}', None, True),
        ("/api/embed", b"", None, False),
        ("/api/tags", b'{"model":"m"}', None, False),
    ],
)
def test_inspect_request(path: str, body: bytes, model: str | None, stream: bool) -> None:
    facts = inspect_request(route_for(path), body)
    assert (facts.model, facts.stream) == (model, stream)


def test_framing_from_content_type() -> None:
    assert framing_for("application/x-ndjson") is Framing.NDJSON
    assert framing_for("text/event-stream; charset=utf-8") is Framing.SSE
    assert framing_for("application/json; charset=utf-8") is Framing.JSON
    assert framing_for("text/plain") is None
    assert framing_for(None) is None


@pytest.mark.parametrize("name", ["chat_stream.ndjson", "generate_stream.ndjson"])
def test_native_stream_usage_at_every_split(name: str) -> None:
    data = fixture(name)
    expected = Outcome(Ending.COMPLETE, native_usage(name))
    for pieces in splits(data):
        assert observe(RouteKind.NATIVE, Framing.NDJSON, pieces) == expected


def test_thinking_and_tool_calls_stream() -> None:
    data = fixture("chat_thinking_tools_stream.ndjson")
    expected = Outcome(Ending.COMPLETE, native_usage("chat_thinking_tools_stream.ndjson"))
    for pieces in splits(data):
        assert observe(RouteKind.NATIVE, Framing.NDJSON, pieces) == expected


@pytest.mark.parametrize("name", ["chat_stream_midstream_error.ndjson", "pull_error_stream.ndjson"])
def test_error_line_ends_a_stream_as_error(name: str) -> None:
    kind = RouteKind.PROGRESS if name.startswith("pull") else RouteKind.NATIVE
    for pieces in splits(fixture(name)):
        assert observe(kind, Framing.NDJSON, pieces) == Outcome(Ending.ERROR)


def test_pull_ends_with_success() -> None:
    for pieces in splits(fixture("pull_stream.ndjson")):
        assert observe(RouteKind.PROGRESS, Framing.NDJSON, pieces) == Outcome(Ending.COMPLETE)


@pytest.mark.parametrize("drop", [1, 2])
def test_stream_without_end_marker_is_unterminated(drop: int) -> None:
    lines = fixture("chat_stream.ndjson").splitlines(keepends=True)
    body = b"".join(lines[:-drop])
    assert observe(RouteKind.NATIVE, Framing.NDJSON, [body]) == Outcome(Ending.UNTERMINATED)
    # A final line cut in the middle is no end marker either.
    half = lines[-1][: len(lines[-1]) // 2]
    assert observe(RouteKind.NATIVE, Framing.NDJSON, [b"".join(lines[:-1]) + half]) == Outcome(
        Ending.UNTERMINATED
    )


def test_done_reason_without_done_is_final() -> None:
    body = b'{"model":"m","response":"","done_reason":"stop","eval_count":2}\n'
    outcome = observe(RouteKind.NATIVE, Framing.NDJSON, [body])
    assert outcome.ending is Ending.COMPLETE
    assert outcome.usage is not None
    assert outcome.usage.completion_tokens == 2


@pytest.mark.parametrize(
    ("name", "reason"), [("generate_load.json", "load"), ("chat_unload.json", "unload")]
)
def test_load_and_unload_replies(name: str, reason: str) -> None:
    for pieces in splits(fixture(name)):
        assert observe(RouteKind.NATIVE, Framing.JSON, pieces) == Outcome(
            Ending.COMPLETE, Usage(done_reason=reason)
        )


def test_embed_reply_usage() -> None:
    outcome = observe(RouteKind.NATIVE, Framing.JSON, [fixture("embed_response.json")])
    assert outcome.usage == Usage(prompt_tokens=14, load_seconds=1519458 / 1e9)


def test_a_single_object_reply_is_read_whole_even_across_lines() -> None:
    doc = orjson.loads(fixture("embed_response.json"))
    pretty = orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"
    assert pretty.count(b"\n") > 3
    expected = Outcome(Ending.COMPLETE, Usage(prompt_tokens=14, load_seconds=1519458 / 1e9))
    for pieces in splits(pretty):
        assert observe(RouteKind.NATIVE, Framing.JSON, pieces) == expected


def test_a_single_object_reply_over_the_limit_reports_nothing_and_holds_nothing() -> None:
    body = fixture("embed_response.json")
    tail = tail_for(Framing.JSON, len(body) - 1, LIMIT)
    for i in range(0, len(body), 7):
        tail.feed(body[i : i + 7])
        assert sum(len(piece) for piece in tail.lines()) < len(body)
    assert tail.lines() == []
    assert read_outcome(RouteKind.NATIVE, Framing.JSON, tail.lines()) == Outcome(Ending.COMPLETE)
    exact = tail_for(Framing.JSON, len(body), LIMIT)
    exact.feed(body)
    assert read_outcome(RouteKind.NATIVE, Framing.JSON, exact.lines()).usage is not None


def test_v1_chat_stream_usage_is_taken_from_the_empty_choices_chunk() -> None:
    expected = Outcome(Ending.COMPLETE, Usage(34, 3, done_reason="stop"))
    for pieces in splits(fixture("v1_chat_stream_usage.sse")):
        assert observe(RouteKind.OPENAI, Framing.SSE, pieces) == expected


def test_v1_completions_usage_is_never_summed_across_chunks() -> None:
    expected = Outcome(Ending.COMPLETE, Usage(32, 3, done_reason="stop"))
    for pieces in splits(fixture("v1_completions_stream_usage.sse")):
        assert observe(RouteKind.OPENAI, Framing.SSE, pieces) == expected


def test_v1_stream_without_include_usage_reports_no_tokens() -> None:
    events = fixture("v1_chat_stream_usage.sse").split(b"\n\n")
    body = b"\n\n".join(e for e in events if b'"choices":[]' not in e)
    outcome = observe(RouteKind.OPENAI, Framing.SSE, [body])
    assert outcome == Outcome(Ending.COMPLETE, Usage(done_reason="stop", tokens_reported=False))


def test_v1_stream_without_done_is_a_stream_error() -> None:
    body = fixture("v1_chat_stream_usage.sse").replace(b"data: [DONE]\n\n", b"")
    assert observe(RouteKind.OPENAI, Framing.SSE, [body]).ending is Ending.ERROR


def test_v1_non_stream_usage() -> None:
    body = (
        b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m",'
        b'"choices":[{"index":0,"message":{"role":"assistant","content":"x"},'
        b'"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":9,'
        b'"total_tokens":14}}\n'
    )
    assert observe(RouteKind.OPENAI, Framing.JSON, [body]) == Outcome(
        Ending.COMPLETE, Usage(5, 9, done_reason="length")
    )


def test_responses_stream() -> None:
    body = (
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta"}\n\n'
        b"event: response.completed\n"
        b'data: {"type":"response.completed","response":{"usage":{"input_tokens":11,'
        b'"output_tokens":4,"total_tokens":15}}}\n\n'
    )
    for pieces in splits(body):
        assert observe(RouteKind.RESPONSES, Framing.SSE, pieces) == Outcome(
            Ending.COMPLETE, Usage(11, 4)
        )
    failed = b'event: response.failed\ndata: {"type":"response.failed"}\n\n'
    assert observe(RouteKind.RESPONSES, Framing.SSE, [failed]).ending is Ending.ERROR


def test_messages_stream() -> None:
    body = (
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
        b'{"input_tokens":1,"output_tokens":0}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
        b'"end_turn"},"usage":{"input_tokens":12,"output_tokens":6}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    for pieces in splits(body):
        assert observe(RouteKind.MESSAGES, Framing.SSE, pieces) == Outcome(
            Ending.COMPLETE, Usage(12, 6, done_reason="end_turn")
        )
    assert observe(RouteKind.MESSAGES, Framing.SSE, [body[:-50]]).ending is Ending.UNTERMINATED


def test_a_line_longer_than_the_limit_reports_nothing_and_keeps_memory_bounded() -> None:
    huge = b'{"model":"m","done":true,"context":[' + b"1," * 5000 + b'1],"eval_count":3}\n'
    tail = LineTail(Framing.NDJSON, limit=1000)
    for i in range(0, len(huge), 100):
        tail.feed(huge[i : i + 100])
        assert sum(len(line) for line in tail.lines()) <= 1100
    assert read_outcome(RouteKind.NATIVE, Framing.NDJSON, tail.lines()).ending is (
        Ending.UNTERMINATED
    )


def test_only_the_last_lines_are_kept() -> None:
    tail = LineTail(Framing.NDJSON, LIMIT)
    line = b'{"model":"m","done":false}\n'
    for _ in range(10_000):
        tail.feed(line)
    assert len(tail.lines()) <= 3


def test_parse_ps_and_tags() -> None:
    [loaded] = parse_ps(orjson.dumps({"models": [PS_MODEL]})) or []
    assert loaded.name == PS_MODEL["name"]
    assert loaded.size_bytes == PS_MODEL["size"]
    assert loaded.vram_bytes == PS_MODEL["size_vram"]
    assert loaded.context_length == PS_MODEL["context_length"]
    assert loaded.expires_at == pytest.approx(1795323845.123456)
    assert parse_ps(b'{"models":null}') == []
    assert parse_ps(b"garbage") is None
    assert parse_tags(b'{"models":[{"name":"a:latest"},{"model":"b:1"},{}]}') == [
        "a:latest",
        "b:1",
    ]


def test_a_whole_reply_that_says_it_is_not_done_is_unterminated() -> None:
    # What Ollama sends for stream:false when the runner stopped early (seen on the real one).
    body = b'{"model":"tiny","created_at":"2026-12-02T00:00:00Z","response":"ab","done":false}'
    assert observe(RouteKind.NATIVE, Framing.JSON, [body]).ending is Ending.UNTERMINATED
    done = body.replace(b'"done":false', b'"done":true,"done_reason":"stop","eval_count":2')
    outcome = observe(RouteKind.NATIVE, Framing.JSON, [done])
    assert (outcome.ending, outcome.usage and outcome.usage.completion_tokens) == (
        Ending.COMPLETE,
        2,
    )


def test_a_long_line_then_the_final_one_keeps_its_usage() -> None:
    final = fixture("chat_stream.ndjson").splitlines(keepends=True)[-1]
    long_line = b'{"model":"m","message":{"content":"' + b"x" * 5000 + b'"},"done":false}\n'
    for pieces in (
        [long_line, final],
        [long_line + final],
        [long_line[:100], long_line[100:] + final],
    ):
        tail = tail_for(Framing.NDJSON, LIMIT, 1024)
        for piece in pieces:
            tail.feed(piece)
        outcome = judge(RouteKind.NATIVE, tail)
        assert outcome.ending is Ending.COMPLETE
        assert outcome.usage is not None
        assert outcome.usage.completion_tokens == final_object("chat_stream.ndjson")["eval_count"]


def test_a_final_line_over_the_limit_is_complete_without_usage_and_a_cut_one_is_not() -> None:
    lines = fixture("chat_stream.ndjson").splitlines(keepends=True)
    tail = tail_for(Framing.NDJSON, LIMIT, 64)
    for line in lines:
        tail.feed(line)
    assert judge(RouteKind.NATIVE, tail) == Outcome(Ending.COMPLETE, oversized=True)
    cut = tail_for(Framing.NDJSON, LIMIT, 64)
    for line in [*lines[:-1], lines[-1][:-10]]:
        cut.feed(line)
    assert judge(RouteKind.NATIVE, cut).ending is Ending.UNTERMINATED

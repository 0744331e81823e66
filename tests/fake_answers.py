"""What the fake Ollama answers when a test scripts nothing: Ollama's replies per route, its
error texts and shapes, as a real Ollama (v0.33.0-rc2) gives them (tests/test_real_ollama.py
pins them to the real server)."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import orjson
from aiohttp import web

from . import go_json
from .fake_wire import (
    JSON,
    JSON_UTF8,
    NDJSON,
    PLAIN,
    SSE,
    TAGS,
    TEXT,
    Received,
    Reply,
    events_of,
    final_object,
    fixture,
    lines_of,
)

if TYPE_CHECKING:
    from .fake_ollama import FakeOllama


_DIGEST: Final = re.compile(r"sha256[:-][0-9a-fA-F]{64}")
HTML: Final = "text/html; charset=utf-8"
_HTML_ESCAPES: Final = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&#34;", "'": "&#39;"}


def _trailing_slash_redirect(method: str, target: str, query: str) -> Reply:
    """Ollama's router sends ``/api/tags/`` to ``/api/tags``: 301 with a link for GET, else
    307 (a HEAD answer keeps the link's Content-Type, other methods get an empty body)."""
    url = f"{target}?{query}" if query else target
    location = {"Location": url}
    if method == "GET":
        escaped = "".join(_HTML_ESCAPES.get(char, char) for char in url)
        link = f'<a href="{escaped}">Moved Permanently</a>.\n\n'.encode()
        return Reply(301, HTML, [link], location, chunked=False)
    if method == "HEAD":
        return Reply(307, HTML, [], location)
    return Reply(307, None, [], location, chunked=False)


def _allowed_host(host: str) -> bool:
    """Whether Ollama on a loopback address accepts this Host (the fake listens on one)."""
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if ":" in host else host
    name = name.lower()
    if not name or name == "localhost" or name == socket.gethostname().lower():
        return True
    if name.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_unspecified


def _go_json(doc: object) -> bytes:
    """JSON as Go's encoding/json writes it: compact, with <, >, & and U+2028/9 escaped."""
    data = orjson.dumps(doc)
    for raw, escaped in _GO_ESCAPED:
        data = data.replace(raw, escaped)
    return data


_GO_ESCAPED: Final = (
    (b"<", b"\\u003c"),
    (b">", b"\\u003e"),
    (b"&", b"\\u0026"),
    ("\u2028".encode(), b"\\u2028"),
    ("\u2029".encode(), b"\\u2029"),
)


def _error(status: int, message: str, content_type: str = JSON_UTF8) -> Reply:
    """Ollama's native error shape (no trailing newline)."""
    return Reply.body(_go_json({"error": message}), content_type, status)


_OPENAI_TYPES: Final = {400: "invalid_request_error", 404: "not_found_error"}


def _openai_error(status: int, message: str, translated: bool = False) -> Reply:
    """The /v1 error shape. ``translated``: a native handler's error, which the /v1 layer
    rewrites with a trailing newline; else one the /v1 layer raised itself, without one."""
    error = {"message": message, "type": _OPENAI_TYPES.get(status, "api_error")}
    body = _go_json({"error": {**error, "param": None, "code": None}})
    if translated:
        return Reply.body(body + b"\n", JSON, status)
    return Reply.body(body, JSON_UTF8, status)


def _stream_flag(doc: dict[str, Any], default: bool) -> bool:
    stream = doc.get("stream")
    return stream if isinstance(stream, bool) else default


#: The model the fake does not have (the request of fixture error_404.json).
MISSING_MODEL: Final = "llama9"
#: Every model the fake does not have, on every route (gpt-4o for the /v1 tests).
MISSING: Final = frozenset({MISSING_MODEL, "gpt-4o"})


def _canonical(name: str) -> str:
    """``llama9`` -> ``llama9:latest``, as Ollama names a model in some of its errors."""
    return name if ":" in name.rpartition("/")[2] else f"{name}:latest"


def _is_missing(name: str) -> bool:
    return _canonical(name).casefold() in {_canonical(m) for m in MISSING}


def _model_of(doc: dict[str, Any], *keys: str) -> str:
    return next((str(doc[key]) for key in keys if doc.get(key)), "")


def _unloads(doc: dict[str, Any]) -> bool:
    """keep_alive 0 (a number, or a Go duration such as "0s"): unload instead of load."""
    keep_alive = doc.get("keep_alive")
    return keep_alive == 0 or keep_alive in ("0", "0s", "0m", "0h")


def _replaced(name: str, **fields: Any) -> bytes:
    """A fixture's single JSON object with some fields changed (their place kept)."""
    doc: dict[str, Any] = orjson.loads(fixture(name))
    return _go_json({**doc, **fields})


def _chat(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    model = _model_of(doc, "model")
    if not model:
        return _error(400, "model is required")
    if _is_missing(model):
        return _error(404, f"model '{model}' not found")
    if not doc.get("messages"):
        if _unloads(doc):
            return Reply.body(fixture("chat_unload.json"))
        return Reply.body(_replaced("chat_unload.json", done_reason="load"))
    source = "chat_thinking_tools_stream.ndjson" if doc.get("tools") else "chat_stream.ndjson"
    if _stream_flag(doc, True):
        return Reply(content_type=NDJSON, chunks=lines_of(source))
    final = final_object(source)
    final["message"]["content"] = "".join(
        orjson.loads(line)["message"]["content"] for line in lines_of(source)
    )
    return Reply.body(orjson.dumps(final))


def _generate(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    model = _model_of(doc, "model")
    if not model or _is_missing(model):
        return _error(404, f"model '{model}' not found")
    if not doc.get("prompt"):
        if _unloads(doc):
            return Reply.body(_replaced("generate_load.json", done_reason="unload"))
        return Reply.body(fixture("generate_load.json"))
    if _stream_flag(doc, True):
        return Reply(content_type=NDJSON, chunks=lines_of("generate_stream.ndjson"))
    final = final_object("generate_stream.ndjson")
    final["response"] = "".join(
        orjson.loads(line)["response"] for line in lines_of("generate_stream.ndjson")
    )
    return Reply.body(orjson.dumps(final))


def _not_pulled(model: str) -> Reply:
    return _error(404, f'model "{model}" not found, try pulling it first')


def _embed(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    model = _model_of(doc, "model")
    if not model:
        return _error(404, "model '' not found")
    if _is_missing(model):
        return _not_pulled(model)
    if not doc.get("input"):  # nothing to embed: Ollama only loads the model
        return Reply.body(_go_json({"model": model, "embeddings": []}))
    return Reply.body(fixture("embed_response.json"))


def _embeddings(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    """The legacy route: one vector, no usage numbers."""
    model = _model_of(doc, "model")
    if not model:
        return _error(400, "model is required")
    if _is_missing(model):
        return _not_pulled(model)
    vector = list(EMBEDDING) if doc.get("prompt") else []
    return Reply.body(_go_json({"embedding": vector}))


def _progress(lines: list[bytes], stream: bool) -> Reply:
    """A progress stream, or with stream false its last object (a 500 if that is an error)."""
    if stream:
        return Reply(content_type=NDJSON, chunks=lines)
    last = lines[-1].rstrip(b"\n")
    return Reply.body(last, JSON, 500 if b'"error"' in last else 200)


def _pull(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    model = _model_of(doc, "model", "name")
    if not model:
        return _error(400, "invalid model name")
    name = "pull_error_stream.ndjson" if model == "no-such-model" else "pull_stream.ndjson"
    return _progress(lines_of(name), _stream_flag(doc, True))


#: Where the fake pretends to keep its models (Ollama's default, ~/.ollama/models).
MODELS_DIR: Final = "/root/.ollama/models"


def _create(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    if not _model_of(doc, "model", "name"):
        return _error(400, "invalid model name")
    files = doc.get("files") or {}
    statuses: list[dict[str, str]] = [{"status": "parsing GGUF"}]
    missing = [digest for digest in files.values() if digest not in fake.blobs]
    if missing:
        blob = f"{MODELS_DIR}/blobs/{str(missing[0]).replace(':', '-')}"
        statuses.append({"error": f"open {blob}: no such file or directory"})
    else:
        statuses += [{"status": f"using existing layer {digest}"} for digest in files.values()]
        statuses += [{"status": "writing manifest"}, {"status": "success"}]
    lines = [_go_json(status) + b"\n" for status in statuses]
    return _progress(lines, _stream_flag(doc, True))


def _show(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    model = _model_of(doc, "model", "name")
    if not model:
        return _error(400, "model is required")
    if _is_missing(model):
        return _error(404, f"model '{_canonical(model)}' not found")
    body = {
        "license": "LLAMA 3.2 COMMUNITY LICENSE AGREEMENT",
        "modelfile": "FROM llama3.2:latest\n",
        "parameters": 'stop "<|eot_id|>"',
        "template": "{{ .Prompt }}",
        "details": _DETAILS,
        "model_info": {"general.architecture": "llama", "llama.context_length": 131072},
        "tensors": [{"name": "output.weight", "type": "Q6_K", "shape": [3072, 128256]}],
        "capabilities": ["completion", "tools"],
        "modified_at": MODIFIED_AT,
    }
    return Reply.body(_go_json(body))


def _copy(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    source, destination = _model_of(doc, "source"), _model_of(doc, "destination")
    if not source:
        return _error(400, 'source "" is invalid')
    if not destination:
        return _error(400, 'destination "" is invalid')
    if _is_missing(source):
        return _error(404, f'model "{source}" not found')
    return Reply(200, None, chunked=False)


def _delete(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    model = _model_of(doc, "model", "name")
    if not model:
        return _error(400, "model is required")
    if _is_missing(model):
        return _error(404, f"model '{model}' not found")
    return Reply(200, None, chunked=False)


MODIFIED_AT: Final = "2026-11-01T10:00:00.123456789Z"
#: MODIFIED_AT in Unix seconds, as /v1/models gives it.
MODIFIED_UNIX: Final = 1793527200

_DETAILS: Final = {
    "parent_model": "",
    "format": "gguf",
    "family": "llama",
    "families": ["llama"],
    "parameter_size": "3.2B",
    "quantization_level": "Q4_K_M",
}

#: Per listed model: capabilities, context length, embedding length.
_CATALOGUE: Final = {
    "llama3.2:latest": (["completion", "tools"], 131072, 3072),
    "qwen3:8b": (["completion", "tools", "thinking"], 40960, 4096),
    "nomic-embed-text:latest": (["embedding"], 2048, 768),
}


def _tags(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    models = []
    for name in TAGS:
        capabilities, context, embedding = _CATALOGUE[name]
        # /api/tags gives a model's lengths in its details (/api/ps and /api/show do not).
        details = {**_DETAILS, "context_length": context, "embedding_length": embedding}
        digest = hashlib.sha256(name.encode()).hexdigest()
        models.append(
            {
                "name": name,
                "model": name,
                "modified_at": MODIFIED_AT,
                "size": 2019393189,
                "digest": digest,
                "details": details,
                "capabilities": capabilities,
            }
        )
    return Reply.body(_go_json({"models": models}))


#: /api/ps as the fake reports it.
PS_MODEL: Final = {
    "name": "llama3.2:latest",
    "model": "llama3.2:latest",
    "size": 3583100928,
    "digest": hashlib.sha256(b"llama3.2:latest").hexdigest(),
    "details": _DETAILS,
    "expires_at": "2026-11-22T06:04:05.123456789+01:00",
    "size_vram": 2684354560,
    "context_length": 4096,
}


def _ps(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    return Reply.body(orjson.dumps({"models": [PS_MODEL]}))


def _v1_chat(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    if not doc.get("messages"):
        return _openai_error(400, "[] is too short - 'messages'")
    model = _model_of(doc, "model")
    if not model:
        return _openai_error(400, "model is required", translated=True)
    if _is_missing(model):
        return _openai_error(404, f"model '{model}' not found", translated=True)
    events = events_of("v1_chat_stream_usage.sse")
    if doc.get("stream") is True:
        if not (doc.get("stream_options") or {}).get("include_usage"):
            events = [event for event in events if b'"choices":[]' not in event]
        return Reply(content_type=SSE, chunks=events)
    chunks = [orjson.loads(event[len(b"data: ") :]) for event in events[:-1]]
    body = {
        "id": chunks[0]["id"],
        "object": "chat.completion",
        "created": chunks[0]["created"],
        "model": chunks[0]["model"],
        "system_fingerprint": "fp_ollama",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "".join(
                        c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]
                    ),
                },
                "finish_reason": "stop",
            }
        ],
        "usage": chunks[-1]["usage"],
    }
    return Reply.body(orjson.dumps(body) + b"\n", JSON)


def _v1_completions(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    model = _model_of(doc, "model")
    if not model or _is_missing(model):
        return _openai_error(404, f"model '{model}' not found", translated=True)
    events = events_of("v1_completions_stream_usage.sse")
    chunks = [orjson.loads(event[len(b"data: ") :]) for event in events[:-1]]
    if doc.get("stream") is True:
        if (doc.get("stream_options") or {}).get("include_usage"):
            return Reply(content_type=SSE, chunks=events)
        # Without include_usage no chunk carries usage, and there is no usage chunk.
        plain = [{k: v for k, v in c.items() if k != "usage"} for c in chunks if c["choices"]]
        data = [b"data: " + _go_json(c) + b"\n\n" for c in plain]
        return Reply(content_type=SSE, chunks=[*data, events[-1]])
    body = {
        "id": chunks[0]["id"],
        "object": "text_completion",
        "created": chunks[0]["created"],
        "model": chunks[0]["model"],
        "system_fingerprint": "fp_ollama",
        "choices": [
            {
                "text": "".join(c["choices"][0]["text"] for c in chunks if c["choices"]),
                "index": 0,
                "finish_reason": "stop",
            }
        ],
        "usage": chunks[-1]["usage"],
    }
    return Reply.body(_go_json(body) + b"\n", JSON)


#: An embedding whose numbers Go and orjson write alike (no integral floats: Go writes 1.0
#: as 1), and which float32 holds exactly (Ollama's vectors are float32).
EMBEDDING: Final = (0.25, -0.5, 0.125, 0.75)


def _v1_embeddings(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    if doc.get("input") in (None, []):
        return _openai_error(400, "invalid input")
    model = _model_of(doc, "model")
    if not model:
        return _openai_error(404, "model '' not found", translated=True)
    if _is_missing(model):
        message = f'model "{model}" not found, try pulling it first'
        return _openai_error(404, message, translated=True)
    vector: object = list(EMBEDDING)
    if doc.get("encoding_format") == "base64":
        vector = base64.b64encode(struct.pack(f"<{len(EMBEDDING)}f", *EMBEDDING)).decode()
    body = {
        "object": "list",
        "data": [{"object": "embedding", "embedding": vector, "index": 0}],
        "model": model,
        "usage": {"prompt_tokens": 7, "total_tokens": 7},
    }
    return Reply.body(_go_json(body) + b"\n", JSON)


def _v1_models(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    data = [_v1_model_entry(name) for name in TAGS]
    return Reply.body(_go_json({"object": "list", "data": data}) + b"\n", JSON)


def _v1_model_entry(name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": MODIFIED_UNIX, "owned_by": "library"}


def _v1_model(model: str) -> Reply:
    """``/v1/models/{model}``: the id is the name as the path spells it."""
    if _canonical(model) not in TAGS:
        return _openai_error(404, f"model '{_canonical(model)}' not found", translated=True)
    return Reply.body(_go_json(_v1_model_entry(model)) + b"\n", JSON)


def _root(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    return Reply.body(b"Ollama is running", TEXT)


def _version(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    return Reply.body(b'{"version":"0.33.0"}')


def _status(fake: FakeOllama, doc: dict[str, Any]) -> Reply:
    return Reply.body(b'{"cloud":{"disabled":false,"source":"none"}}')


Handler = Callable[["FakeOllama", dict[str, Any]], Reply]


@dataclass(frozen=True)
class _Route:
    handler: Handler
    #: The Go type Ollama decodes the JSON body into; None: the body is not read.
    go_type: str | None = None
    #: Fields whose type Ollama checks as it decodes (the ones the proxy reads).
    fields: Mapping[str, type] = field(default_factory=dict)
    #: Errors in the /v1 shape.
    openai: bool = False


_MODEL: Final = {"model": str}
_MODEL_STREAM: Final = {"model": str, "stream": bool}
_MODEL_NAME: Final = {"model": str, "name": str}
_PROGRESS: Final = {"model": str, "name": str, "stream": bool}


def _native(handler: Handler, go_type: str, fields: Mapping[str, type]) -> _Route:
    return _Route(handler, f"api.{go_type}", fields)


def _openai(handler: Handler, go_type: str, fields: Mapping[str, type]) -> _Route:
    return _Route(handler, f"openai.{go_type}", fields, openai=True)


# In the order in which Ollama's router lists a path's methods in an Allow header.
_ROUTES: Final[dict[tuple[str, str], _Route]] = {
    ("HEAD", "/"): _Route(_root),
    ("GET", "/"): _Route(_root),
    ("HEAD", "/api/version"): _Route(_version),
    ("GET", "/api/version"): _Route(_version),
    ("GET", "/api/status"): _Route(_status),
    ("HEAD", "/api/tags"): _Route(_tags),
    ("GET", "/api/tags"): _Route(_tags),
    ("GET", "/api/ps"): _Route(_ps),
    ("POST", "/api/show"): _native(_show, "ShowRequest", _MODEL_NAME),
    ("POST", "/api/chat"): _native(_chat, "ChatRequest", _MODEL_STREAM),
    ("POST", "/api/generate"): _native(_generate, "GenerateRequest", _MODEL_STREAM),
    ("POST", "/api/embed"): _native(_embed, "EmbedRequest", _MODEL),
    ("POST", "/api/embeddings"): _native(_embeddings, "EmbeddingRequest", _MODEL),
    ("POST", "/api/pull"): _native(_pull, "PullRequest", _PROGRESS),
    ("POST", "/api/create"): _native(_create, "CreateRequest", _PROGRESS),
    ("POST", "/api/copy"): _native(_copy, "CopyRequest", {"source": str, "destination": str}),
    ("DELETE", "/api/delete"): _native(_delete, "DeleteRequest", _MODEL_NAME),
    ("POST", "/v1/chat/completions"): _openai(_v1_chat, "ChatCompletionRequest", _MODEL_STREAM),
    ("POST", "/v1/completions"): _openai(_v1_completions, "CompletionRequest", _MODEL_STREAM),
    ("POST", "/v1/embeddings"): _openai(_v1_embeddings, "EmbedRequest", _MODEL),
    ("GET", "/v1/models"): _Route(_v1_models),
}
#: The methods of the routes with a path parameter, by prefix (handled in _default).
_PREFIX_ROUTES: Final = {"/api/blobs/": ("HEAD", "POST"), "/v1/models/": ("GET",)}


def _methods_of(path: str) -> tuple[str, ...]:
    """The methods Ollama serves on a path, in its order; empty for a path it does not know."""
    for prefix, methods in _PREFIX_ROUTES.items():
        parameter = path.removeprefix(prefix)
        if parameter != path:
            return methods if parameter and "/" not in parameter else ()
    return tuple(method for method, known in _ROUTES if known == path)


# --- What Ollama answers when nothing is scripted -------------------------------------
#
# In Ollama's order: the router's trailing-slash redirect, the Host check, routing (404,
# 405), decoding the body into the route's request type, then the handler.


def default_reply(fake: FakeOllama, request: web.Request, received: Received) -> Reply:
    """What Ollama answers a request nothing was scripted for."""
    method, path = request.method, request.path
    target = path.removesuffix("/")
    if target != path and target and method in _methods_of(target):
        return _trailing_slash_redirect(method, target, request.query_string)
    methods = _methods_of(path)
    if not _allowed_host(request.host):
        # Ollama's DNS-rebinding defence: an empty 403, before routing (with its Allow).
        allow = {} if not methods or method in methods else {"Allow": ", ".join(methods)}
        return Reply(403, None, headers=allow, chunked=False)
    if not methods:
        return Reply.body(b"404 page not found", PLAIN, 404)
    if method not in methods:
        allow = {"Allow": ", ".join(methods)}
        return Reply(405, PLAIN, [b"405 method not allowed"], allow, chunked=False)
    if path.startswith("/api/blobs/"):  # raw bytes, not JSON
        return _blob(fake, method, path, received)
    if path.startswith("/v1/models/"):
        return _v1_model(path.removeprefix("/v1/models/"))
    route = _ROUTES[method, path]
    if route.go_type is None:
        return route.handler(fake, {})
    if received.size > len(received.body):  # too big to keep: not decoded
        return route.handler(fake, {})
    try:
        doc = go_json.decode(received.body, route.go_type, route.fields)
    except go_json.EmptyBody:
        return _openai_error(400, "EOF") if route.openai else _error(400, "missing request body")
    except go_json.DecodeError as error:
        return _openai_error(400, str(error)) if route.openai else _error(400, str(error))
    return route.handler(fake, doc)


def existing_blob(fake: FakeOllama, request: web.Request) -> Reply | None:
    """Ollama answers an upload of a blob it has before reading the body. Go's server then
    reads up to 256 KiB of what is left to keep the connection, else closes it."""
    digest = request.path.removeprefix("/api/blobs/")
    if request.method != "POST" or digest == request.path or digest not in fake.blobs:
        return None
    if not _allowed_host(request.host):
        return None
    length = request.content_length
    small = length is not None and length <= 256 * 1024
    return Reply(200, None, chunked=False, read_body=False, keep_alive=small)


def _blob(fake: FakeOllama, method: str, path: str, received: Received) -> Reply:
    digest = path[len("/api/blobs/") :]
    if not _DIGEST.fullmatch(digest):
        return _error(400, "invalid digest format")
    if method == "HEAD":  # the 404's body is not sent, but its length is
        return (
            Reply(200, None) if digest in fake.blobs else _error(404, f'blob "{digest}" not found')
        )
    # Ollama stores what it received under its own digest, and only then compares.
    actual = f"sha256:{received.sha256}"
    fake.blobs.add(actual)
    if digest != actual:
        return _error(400, f'digest mismatch, expected "{digest}", got "{actual}"')
    return Reply(201, None, chunked=False)

"""What a fake upstream of the fleet (tests/fake_fleet.py) sends: Ollama's objects for the routes
it serves itself, in Ollama's key order and Go's JSON (tests/fake_answers.py's helpers), built
from what its scheduler (tests/fake_sched.py) knows. No I/O and no waiting here: the upstream
feeds the tokens in as it makes them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from .fake_answers import (
    _CATALOGUE,
    _DETAILS,
    EMBEDDING,
    MODIFIED_AT,
    MODIFIED_UNIX,
    PS_MODEL,
    _canonical,
    _error,
    _go_json,
    _openai_error,
)
from .fake_sched import FOREVER, Runner, go_time
from .fake_wire import JSON, Reply, final_object

#: Ollama's answer when its queue is full (server/sched.go ErrMaxQueue; two spaces).
BUSY: Final = "server busy, please try again.  maximum pending requests exceeded"

GENERATE: Final = "generate"
CHAT: Final = "chat"
OPENAI: Final = "openai"  # /v1/chat/completions
EMBED: Final = "embed"

#: The routes an upstream schedules (placement, a slot), by what they answer.
SCHEDULED: Final = {
    "/api/generate": GENERATE,
    "/api/chat": CHAT,
    "/v1/chat/completions": OPENAI,
    "/api/embed": EMBED,
}
#: The field whose emptiness makes a request load-only (the /v1 layer refuses it instead).
PROMPT_FIELD: Final = {GENERATE: "prompt", CHAT: "messages", OPENAI: "messages", EMBED: "input"}

_PULL_IT: Final = 'model "{}" not found, try pulling it first'
_NOT_HELD: Final[dict[str, Callable[[str], Reply]]] = {
    "/api/generate": lambda m: _error(404, f"model '{m}' not found"),
    "/api/chat": lambda m: _error(404, f"model '{m}' not found"),
    "/api/show": lambda m: _error(404, f"model '{_canonical(m)}' not found"),
    "/api/embed": lambda m: _error(404, _PULL_IT.format(m)),
    "/api/embeddings": lambda m: _error(404, _PULL_IT.format(m)),
    "/v1/chat/completions": lambda m: _openai_error(404, f"model '{m}' not found", True),
    "/v1/completions": lambda m: _openai_error(404, f"model '{m}' not found", True),
    "/v1/embeddings": lambda m: _openai_error(404, _PULL_IT.format(m), True),
}
#: The POST routes that name a model, each answered for a model it does not hold.
MODEL_ROUTES: Final = frozenset(_NOT_HELD)


def not_held(path: str, model: str) -> Reply:
    """Ollama's 404 on this route for a model it does not have."""
    return _NOT_HELD[path](model)


def busy(kind: str) -> Reply:
    return _openai_error(503, BUSY, True) if kind == OPENAI else _error(503, BUSY)


#: The tokens of the fake's replies, in turn (tests/fixtures/generate_stream.ndjson's).
TOKENS: Final = ("Un", " café", ".")
_CONTEXT: Final = final_object("generate_stream.ndjson")["context"]


def prompt_tokens(doc: dict[str, Any]) -> int:
    """The prompt's tokens, as the fake counts them: one per word, at least one."""
    texts: list[str] = []
    for key in ("system", "prompt", "input"):
        value = doc.get(key)
        values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        texts += [v for v in values if isinstance(v, str)]
    for message in doc.get("messages") or ():
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            texts.append(message["content"])
    return max(1, sum(len(text.split()) for text in texts))


def int_option(doc: dict[str, Any], name: str, openai: str = "") -> int | None:
    """A positive ``options`` integer (num_ctx, num_predict), or /v1's top-level spelling."""
    options = doc.get("options")
    value = options.get(name) if isinstance(options, dict) else None
    if openai and value is None:
        value = doc.get(openai)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


@dataclass
class Timing:
    """What the final object reports, in ns: the real time, plus each injected delay's nominal
    rest (what ``time_scale`` spared; tests/fake_sched.py, "Time")."""

    arrival: int = field(default_factory=time.monotonic_ns)
    load_extra: int = 0
    eval_extra: int = 0
    load: int = 0
    slot: int = 0  # when it got a slot
    prompt: int = 0
    eval: int = 0

    def metrics(self, prompt_count: int, eval_count: int) -> dict[str, int]:
        total = time.monotonic_ns() - self.arrival + self.load_extra + self.eval_extra
        got = {
            "total_duration": total,
            "load_duration": self.load,
            "prompt_eval_count": prompt_count,
            "prompt_eval_duration": self.prompt,
            "eval_count": eval_count,
            "eval_duration": self.eval,
        }
        return {key: value for key, value in got.items() if value}  # Go's omitempty


def _head(model: str, kind: str, text: str, now: float) -> dict[str, Any]:
    head: dict[str, Any] = {"model": model, "created_at": go_time(now)}
    if kind == GENERATE:
        head["response"] = text
    else:
        head["message"] = {"role": "assistant", "content": text}
    return head


def load_reply(model: str, kind: str, reason: str, now: float) -> Reply:
    """The answer to a request with nothing to do: ``load`` (or ``unload``, keep_alive 0)."""
    if kind == EMBED:
        return Reply.body(_go_json({"model": model, "embeddings": []}))
    head = _head(model, kind, "", now)
    return Reply.body(_go_json({**head, "done": True, "done_reason": reason}))


def final(
    model: str, kind: str, text: str, reason: str, metrics: dict[str, int], now: float
) -> dict[str, Any]:
    """The last object of a stream (``text`` "") or a whole reply."""
    doc = {**_head(model, kind, text, now), "done": True, "done_reason": reason}
    if kind == GENERATE:
        doc["context"] = _CONTEXT
    return {**doc, **metrics}


def whole(doc: dict[str, Any]) -> Reply:
    """A non-stream native reply (no trailing newline)."""
    return Reply.body(_go_json(doc))


def embed_body(model: str, doc: dict[str, Any], timing: Timing) -> Reply:
    inputs = doc.get("input")
    vectors = [list(EMBEDDING)] * (len(inputs) if isinstance(inputs, list) else 1)
    metrics = timing.metrics(prompt_tokens(doc), 0)
    metrics.pop("prompt_eval_duration", None)  # /api/embed reports no other duration
    return Reply.body(_go_json({"model": model, "embeddings": vectors, **metrics}))


async def ndjson(
    model: str,
    kind: str,
    tokens: AsyncIterator[str],
    end: Callable[[], dict[str, Any]],
    clock: Callable[[], float],
) -> AsyncIterator[bytes]:
    """A native stream: one line per token, then ``end()``'s final object."""
    async for token in tokens:
        yield _go_json({**_head(model, kind, token, clock()), "done": False}) + b"\n"
    yield _go_json(end()) + b"\n"


async def openai_chunks(
    base: dict[str, Any],
    tokens: AsyncIterator[str],
    reason: str,
    usage: Callable[[], dict[str, int]] | None,
) -> AsyncIterator[dict[str, Any]]:
    """/v1/chat/completions chunks as Ollama >= v0.32.6 sends them (ollama-api.md §6): the
    role only in the first, a finish chunk, then (``usage``) one with ``"choices":[]``."""
    first = True
    async for token in tokens:
        delta = {"role": "assistant", "content": token} if first else {"content": token}
        first = False
        yield {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}
    if usage is not None:
        yield {**base, "choices": [], "usage": usage()}


def openai_base(ordinal: int, model: str, now: float) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{ordinal % 999}",
        "object": "chat.completion.chunk",
        "created": int(now),
        "model": model,
        "system_fingerprint": "fp_ollama",
    }


async def sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield b"data: " + _go_json(chunk) + b"\n\n"
    yield b"data: [DONE]\n\n"


async def openai_body(chunks: AsyncIterator[dict[str, Any]]) -> Reply:
    """The non-stream /v1 reply: the chunks gathered, usage always present."""
    got = [chunk async for chunk in chunks]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in got if c["choices"])
    first, finish, usage = got[0], got[-2], got[-1]
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish["choices"][0]["finish_reason"],
    }
    body = {
        "id": first["id"],
        "object": "chat.completion",
        "created": first["created"],
        "model": first["model"],
        "system_fingerprint": "fp_ollama",
        "choices": [choice],
        "usage": usage["usage"],
    }
    return Reply.body(_go_json(body) + b"\n", JSON)


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def tags(names: list[str]) -> Reply:
    """/api/tags, each entry as FakeOllama's (tests/fake_answers.py) for the models it knows."""
    models = []
    for name in names:
        capabilities, context, embedding = _CATALOGUE.get(name, (["completion"], 131072, 3072))
        models.append(
            {
                "name": name,
                "model": name,
                "modified_at": MODIFIED_AT,
                "size": 2019393189,
                "digest": _digest(name),
                "details": {**_DETAILS, "context_length": context, "embedding_length": embedding},
                "capabilities": capabilities,
            }
        )
    return Reply.body(_go_json({"models": models}))


def v1_models(names: list[str]) -> Reply:
    data = [
        {"id": name, "object": "model", "created": MODIFIED_UNIX, "owned_by": "library"}
        for name in names
    ]
    return Reply.body(_go_json({"object": "list", "data": data or None}) + b"\n", JSON)


def ps(runners: list[Runner], now: float) -> Reply:
    """/api/ps: loading models too, and the longest time left first (by whole seconds, stable),
    as Ollama's PsHandler lists them."""
    entries = []
    for runner in runners:
        expires = runner.expires
        if expires is None:  # never idle yet: Ollama reports now + keep-alive
            expires = now + (FOREVER if runner.keep_alive < 0 else runner.keep_alive)
        expires = min(expires, now + FOREVER)
        entry = {
            "name": runner.name,
            "model": runner.name,
            "size": PS_MODEL["size"],
            "digest": _digest(runner.name),
            "details": _DETAILS,
            "expires_at": go_time(expires),
            "size_vram": PS_MODEL["size_vram"],
            "context_length": runner.context_length,
        }
        entries.append((int(expires), entry))
    entries.sort(key=lambda pair: -pair[0])
    return Reply.body(_go_json({"models": [entry for _, entry in entries]}))

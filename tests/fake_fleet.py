"""A scriptable fake fleet for the fleet tests: several fake Ollamas on loopback, each holding
some models, with Ollama's scheduler in miniature (tests/fake_sched.py: serial placement,
``slots`` per model, ``max_loaded`` with an eviction that waits for its victim to be idle, cold
loads, keep-alive) and the replies of tests/fake_fleet_answers.py.

Each upstream is a FakeOllama (tests/fake_ollama.py): scripts, ``received``, the Host check, the
errors of bad bodies and every route not named here behave as they do there. Served here, per
upstream: /api/tags, /api/ps and /v1/models from its own models; /api/generate, /api/chat,
/api/embed and /v1/chat/completions through its scheduler, streamed one token per write
(NDJSON, or SSE on /v1) or answered whole, durations in ns in the final object; and Ollama's
404 on every route that names a model it does not hold. Not emulated: memory (a model fits
wherever ``max_loaded`` allows), the reload Ollama makes for another num_ctx, thinking and tool
calls, mid-stream error lines, and scheduling on /v1/completions, /v1/embeddings and
/api/embeddings (answered at once with FakeOllama's replies).

What a test steers, besides the options of ``Spec``:

- gates, so that nothing sleeps to synchronise: ``hold_loads(*models)`` stops cold loads and
  ``hold_tokens(*models, after=k)`` stops replies before token k (0: before the status line,
  as Ollama sends nothing before its first token; the token count: before the final object),
  until the Event they return is set. ``wait_until(predicate)`` waits for a state.
- ``busy = True``: the scheduled routes answer 503 with Ollama's "server busy" text.
- faults: ``await refuse()`` stops listening and cuts every open connection (``restore()``
  listens again on the same port); ``hang = True`` reads every request and never answers;
  ``drop_after = k`` closes the connection after k chunks of a streamed reply (0: before the
  status line, on every reply of the scheduled routes).

What it counts: ``loads``, ``evictions``, ``unloads`` (keep-alive, ``unload()``), ``not_found``
(its 404s) and ``peak`` (most requests of a model running at once), per model (``PerModel``:
``x`` is ``x:latest``); ``peak_loaded``; ``busy_replies``; ``calls``, one record per request it
served itself (method, path, model, headers, body, status, cold, cancelled); and, as FakeOllama,
``received`` (every request) and ``cancelled`` (an Event: a connection went mid-request). Live
state: ``loaded()``, ``running(model)``, ``in_flight(model)``, ``placing``.

Any test module asks for the ``start_fleet`` fixture (tests/conftest.py registers it)::

    async def test_x(start_fleet: FleetFactory) -> None:
        fleet = await start_fleet(2, models=["llama3.2", ("llama3.2", "qwen3:8b")], slots=[1, 4])

An option given as a list holds one value per upstream; any other value is every upstream's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol, TypedDict, Unpack

import pytest
from aiohttp import hdrs, web
from aiohttp.test_utils import BaseTestServer
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpServer

from . import fake_fleet_answers as answers
from . import go_json
from .fake_answers import _ROUTES, _allowed_host, _model_of, _stream_flag, _unloads, default_reply
from .fake_fleet_answers import BUSY, Timing
from .fake_ollama import FakeOllama, _GoResponse
from .fake_sched import CONTEXT_LENGTH, KEEP_ALIVE, Holds, PerModel, Scheduler, keep_alive_of
from .fake_wire import NDJSON, SSE, TAGS, Received, Reply

__all__ = [
    "BUSY",
    "Call",
    "FakeUpstream",
    "Fleet",
    "FleetFactory",
    "FleetOptions",
    "PerModel",
    "Spec",
    "start_fleet",
]


@dataclass(frozen=True, slots=True)
class Spec:
    """One fake upstream. Delays are nominal seconds (tests/fake_sched.py, "Time")."""

    #: The models it holds (/api/tags), as Ollama names them (``x`` is ``x:latest``).
    models: tuple[str, ...] = TAGS
    #: Those resident from the start (warm: no request loads them).
    loaded: tuple[str, ...] = ()
    #: Requests it runs at once per model (OLLAMA_NUM_PARALLEL).
    slots: int = 1
    #: Models it holds in memory at once (OLLAMA_MAX_LOADED_MODELS); 0: no limit.
    max_loaded: int = 0
    #: How long a cold load takes (in load_duration).
    load_delay: float = 0.0
    #: How long each generated token takes (in eval_duration).
    token_delay: float = 0.0
    #: Real sleep = delay * time_scale; 0: report the delays, never sleep.
    time_scale: float = 1.0
    #: Tokens per reply, unless the request sets options.num_predict (/v1: max_tokens).
    tokens: int = 3
    #: Seconds a model stays after its last request, when the request gives no keep_alive.
    keep_alive: float = KEEP_ALIVE
    #: context_length of a model loaded without options.num_ctx.
    context_length: int = CONTEXT_LENGTH
    #: Requests that may wait to be placed behind the one being placed (OLLAMA_MAX_QUEUE);
    #: one more gets 503. None: no limit.
    max_queue: int | None = None
    #: Unix seconds now: expires_at, created_at, and when a keep-alive runs out.
    clock: Callable[[], float] = time.time


_Models = str | tuple[str, ...]


class FleetOptions(TypedDict, total=False):
    """``start_fleet``'s options: Spec's fields; a list gives one value per upstream."""

    models: _Models | list[_Models]
    loaded: _Models | list[_Models]
    slots: int | list[int]
    max_loaded: int | list[int]
    load_delay: float | list[float]
    token_delay: float | list[float]
    time_scale: float | list[float]
    tokens: int | list[int]
    keep_alive: float | list[float]
    context_length: int | list[int]
    max_queue: int | list[int | None] | None
    clock: Callable[[], float] | list[Callable[[], float]]


def specs(n: int, options: FleetOptions) -> list[Spec]:
    """One Spec per upstream from ``start_fleet``'s options."""
    unknown = set(options) - {f.name for f in fields(Spec)}
    if n < 1 or unknown:
        raise ValueError(f"start_fleet: n must be >= 1; unknown options: {sorted(unknown)}")
    chosen: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, value in options.items():
        if isinstance(value, list) and len(value) != n:
            raise ValueError(f"start_fleet: {key} has {len(value)} values for {n} upstreams")
        values: list[Any] = value if isinstance(value, list) else [value] * n
        for one, given in zip(chosen, values, strict=True):
            names = key in ("models", "loaded") and isinstance(given, str)
            one[key] = (given,) if names else given
    return [replace(Spec(), **one) for one in chosen]


@dataclass
class Call:
    """A request an upstream served itself (not one left to FakeOllama's defaults)."""

    method: str
    path: str  # without the query
    model: str  # as the request named it; "" for none
    headers: CIMultiDict[str]
    body: bytes
    #: What it answered; 0: nothing (it hung, or dropped the connection before the status).
    status: int = 0
    #: It loaded its model (a cold start).
    cold: bool = False
    #: Its connection went while it was served: the client left, or ``refuse()`` cut it.
    cancelled: bool = False


_LISTS = frozenset({("GET", "/api/tags"), ("HEAD", "/api/tags"), ("GET", "/api/ps")})
_LISTS |= {("GET", "/v1/models")}


class FakeUpstream(FakeOllama):
    """One fake Ollama of a fleet (the module docstring says what it does)."""

    def __init__(self, name: str, spec: Spec) -> None:
        super().__init__()
        self.name, self.spec = name, spec
        self.sched = Scheduler(
            spec.models,
            spec.loaded,
            slots=spec.slots,
            max_loaded=spec.max_loaded,
            keep_alive=spec.keep_alive,
            context_length=spec.context_length,
            clock=spec.clock,
        )
        self.not_found = PerModel()
        self.busy_replies = 0
        self.calls: list[Call] = []
        self.busy = False
        self.hang = False
        self.drop_after: int | None = None
        self.refusing = False
        self._token_holds = Holds()
        self._server: BaseTestServer | None = None
        self._port = 0
        self._ordinal = 0
        self.app.on_shutdown.append(self._on_shutdown)

    # --- What tests read ------------------------------------------------------------

    @property
    def loads(self) -> PerModel:
        return self.sched.loads

    @property
    def evictions(self) -> PerModel:
        return self.sched.evictions

    @property
    def unloads(self) -> PerModel:
        return self.sched.unloads

    @property
    def peak(self) -> PerModel:
        return self.sched.peak

    @property
    def peak_loaded(self) -> int:
        return self.sched.peak_loaded

    def loaded(self) -> list[str]:
        """The models resident now (loading ones too, as /api/ps lists them)."""
        self.sched.sweep()
        return [runner.name for runner in self.sched.resident.values()]

    def running(self, model: str) -> int:
        """Requests of the model that hold a slot now."""
        return self.sched.running(model)

    def in_flight(self, model: str) -> int:
        """Requests of the model placed and not finished (waiting for a slot, or running)."""
        return self.sched.in_flight(model)

    @property
    def placing(self) -> int:
        """Requests not placed yet: queued, or waiting for a load or an eviction."""
        return self.sched.placing

    # --- What tests steer -----------------------------------------------------------

    def unload(self, model: str) -> bool:
        """As ``ollama stop``: unload now if idle, else once idle; False if not resident."""
        return self.sched.unload(model)

    def hold_loads(self, *models: str) -> asyncio.Event:
        return self.sched.load_holds.hold(models)

    def hold_tokens(self, *models: str, after: int = 0) -> asyncio.Event:
        return self._token_holds.hold(models, after)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate()`` holds, checked on every change of the upstream's state."""
        await self.sched.wait_until(predicate)

    def attach(self, server: BaseTestServer) -> None:
        self._server, self._port = server, server.port or 0
        self.url = str(server.make_url("")).rstrip("/")

    async def refuse(self, *, cut: bool = True) -> None:
        """Stop listening: connections are refused. ``cut``: close the open ones too, as a
        dying Ollama does (streams end mid-body, pooled idle connections go)."""
        runner = self._runner()
        for site in list(runner.sites):
            await site.stop()
        self.refusing = True
        if cut:
            self._cut_all()

    async def restore(self) -> None:
        """Listen again, on the same port."""
        site = web.TCPSite(self._runner(), "127.0.0.1", self._port, reuse_address=True)
        await site.start()
        self.refusing = False

    # --- Serving --------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._serve(request)
        except asyncio.CancelledError:  # the connection went while it was served
            self.cancelled.set()
            raise

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        route = (request.method, request.path)
        if self.hang:
            await self._arrive(request)
            await asyncio.Event().wait()  # until the client, or the server, goes
        served = route in _LISTS or (
            request.method == "POST" and request.path in answers.MODEL_ROUTES
        )
        if not served or self._scripts.get(route):
            return await super()._handle(request)
        received = await self._arrive(request)
        doc = self._decode(request, received)
        keys = ("model", "name") if request.path == "/api/show" else ("model",)
        model = _model_of(doc or {}, *keys)
        call = Call(request.method, request.path, model, received.headers, received.body)
        self.calls.append(call)
        self.sched.changed()
        try:
            return await self._dispatch(request, received, doc, call)
        except asyncio.CancelledError:
            call.cancelled = True
            raise

    async def _dispatch(
        self, request: web.Request, received: Received, doc: dict[str, Any] | None, call: Call
    ) -> web.StreamResponse:
        if (request.method, request.path) in _LISTS and doc is not None:
            reply = self._list(request.path)
        elif doc is None or not call.model or _refused_by_v1(request.path, doc):
            reply = default_reply(self, request, received)  # Ollama's own 400, 403 or 404
        elif self.sched.holds(call.model) is None:
            self.not_found.add(call.model)
            self.sched.changed()
            reply = answers.not_held(request.path, call.model)
        elif request.path in answers.SCHEDULED:
            return await self._scheduled(request, call, doc, answers.SCHEDULED[request.path])
        else:
            reply = default_reply(self, request, received)
        return await self._answer(request, call, reply)

    async def _arrive(self, request: web.Request) -> Received:
        received = await self._receive(request)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        received.port = peer[1] if peer else 0
        self.received.append(received)
        async with self._arrivals:
            self._arrivals.notify_all()
        return received

    def _decode(self, request: web.Request, received: Received) -> dict[str, Any] | None:
        """The body as Ollama decodes it; None if Ollama refuses the request before that."""
        if not _allowed_host(request.host):
            return None
        route = _ROUTES.get((request.method, request.path))
        if route is None or route.go_type is None:
            return {}
        try:
            return go_json.decode(received.body, route.go_type, route.fields)
        except (go_json.EmptyBody, go_json.DecodeError):
            return None

    def _list(self, path: str) -> Reply:
        names = list(self.sched.models.values())
        if path == "/api/tags":
            return answers.tags(names)
        if path == "/v1/models":
            return answers.v1_models(names)
        self.sched.sweep()
        return answers.ps(list(self.sched.resident.values()), self.spec.clock())

    async def _answer(self, request: web.Request, call: Call, reply: Reply) -> web.StreamResponse:
        if self.drop_after == 0 and request.path in answers.SCHEDULED:
            return self._cut(request, web.StreamResponse())
        call.status = reply.status
        return await self._send(request, reply)

    def _nominal(self, delay: float) -> tuple[float, int]:
        """A delay's real sleep (s), and the rest of its nominal length (ns), reported only."""
        real = delay * self.spec.time_scale
        return real, round((delay - real) * 1e9)

    async def _scheduled(
        self, request: web.Request, call: Call, doc: dict[str, Any], kind: str
    ) -> web.StreamResponse:
        timing = Timing()
        name = self.sched.holds(call.model) or call.model
        now = self.spec.clock
        empty = not doc.get(answers.PROMPT_FIELD[kind])
        if empty and kind in (answers.GENERATE, answers.CHAT) and _unloads(doc):
            self.sched.unload(name)  # Ollama does this before it queues the request
            return await self._answer(
                request, call, answers.load_reply(call.model, kind, "unload", now())
            )
        if self.busy or self.sched.queue_full(self.spec.max_queue):
            self.busy_replies += 1
            self.sched.changed()
            return await self._answer(request, call, answers.busy(kind))
        keep_alive = keep_alive_of(doc.get("keep_alive"), self.spec.keep_alive)
        runner, cold = await self.sched.place(name, keep_alive, answers.int_option(doc, "num_ctx"))
        try:
            if cold:
                call.cold = True
                real, timing.load_extra = self._nominal(self.spec.load_delay)
                await self.sched.load(runner, real)
            # Ollama's load_duration: from arrival until a runner is assigned (queue + load).
            timing.load = time.monotonic_ns() - timing.arrival + timing.load_extra
            if empty:
                return await self._answer(
                    request, call, answers.load_reply(call.model, kind, "load", now())
                )
            async with runner.slots:  # an unbounded wait, as Ollama's runner queues
                timing.slot = time.monotonic_ns()
                self.sched.start(runner)
                try:
                    return await self._reply(request, call, doc, kind, timing)
                finally:
                    self.sched.stop(runner)
        finally:
            self.sched.release(runner)

    async def _tokens(self, name: str, count: int, timing: Timing) -> AsyncIterator[str]:
        """The reply's tokens, each after its delay and after the gates before it."""
        start = time.monotonic_ns()
        timing.prompt = max(1, start - timing.slot)
        real, rest = self._nominal(self.spec.token_delay)
        for index in range(count):
            await self._token_holds.pass_(name, index)
            if real > 0:
                await asyncio.sleep(real)
            timing.eval_extra += rest
            yield answers.TOKENS[index % len(answers.TOKENS)]
        await self._token_holds.pass_(name, count)
        timing.eval = time.monotonic_ns() - start + timing.eval_extra

    async def _reply(
        self, request: web.Request, call: Call, doc: dict[str, Any], kind: str, timing: Timing
    ) -> web.StreamResponse:
        model, clock = call.model, self.spec.clock
        if kind == answers.EMBED:
            return await self._answer(request, call, answers.embed_body(model, doc, timing))
        prompt = answers.prompt_tokens(doc)
        limit = answers.int_option(
            doc, "num_predict", "max_tokens" if kind == answers.OPENAI else ""
        )
        count, reason = (limit, "length") if limit else (self.spec.tokens, "stop")
        tokens = self._tokens(self.sched.holds(model) or model, count, timing)
        if kind == answers.OPENAI:
            self._ordinal += 1
            base = answers.openai_base(self._ordinal, model, clock())
            stream = _stream_flag(doc, False)
            options = doc.get("stream_options")
            wanted = isinstance(options, dict) and options.get("include_usage") is True

            def usage() -> dict[str, int]:
                return {
                    "prompt_tokens": prompt,
                    "completion_tokens": count,
                    "total_tokens": prompt + count,
                }

            chunks = answers.openai_chunks(
                base, tokens, reason, usage if wanted or not stream else None
            )
            if stream:
                return await self._stream(request, call, SSE, answers.sse(chunks))
            return await self._answer(request, call, await answers.openai_body(chunks))

        def end(text: str = "") -> dict[str, Any]:
            metrics = timing.metrics(prompt, count)
            return answers.final(model, kind, text, reason, metrics, clock())

        if _stream_flag(doc, True):
            lines = answers.ndjson(model, kind, tokens, end, clock)
            return await self._stream(request, call, NDJSON, lines)
        text = "".join([token async for token in tokens])
        return await self._answer(request, call, answers.whole(end(text)))

    async def _stream(
        self, request: web.Request, call: Call, content_type: str, chunks: AsyncIterator[bytes]
    ) -> web.StreamResponse:
        """One write per chunk, the headers with the first, as Ollama sends a stream."""
        response = _GoResponse(status=200)
        response.headers[hdrs.CONTENT_TYPE] = content_type
        written = 0
        async for chunk in chunks:
            if self.drop_after is not None and written >= self.drop_after:
                return self._cut(request, response)
            if not written:
                call.status = 200
                await response.prepare(request)
            await response.write(chunk)
            written += 1
        await response.write_eof()
        return response

    def _cut(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        """Close the connection under the reply (FakeOllama's ``Reply.cut``, anywhere)."""
        response.force_close()
        if request.transport is not None:
            request.transport.close()
        return response

    async def _on_shutdown(self, app: web.Application) -> None:
        # Cut whatever still waits (a hang, a gate never set): teardown must not wait for it.
        self._cut_all()

    def _runner(self) -> web.BaseRunner:
        assert self._server is not None, "not started"
        assert self._server.runner is not None, "not started"
        return self._server.runner

    def _cut_all(self) -> None:
        server = self._runner().server
        for connection in server.connections if server is not None else []:
            connection.force_close()


def _refused_by_v1(path: str, doc: dict[str, Any]) -> bool:
    """The /v1 layer refuses an empty ``messages`` before it looks at the model."""
    return path == "/v1/chat/completions" and not doc.get("messages")


class Fleet:
    """The fake upstreams of a test, named u1, u2, ... (as ``--upstream`` names them)."""

    def __init__(self, upstreams: list[FakeUpstream]) -> None:
        self.upstreams = upstreams

    def __getitem__(self, index: int) -> FakeUpstream:
        return self.upstreams[index]

    def __len__(self) -> int:
        return len(self.upstreams)

    def __iter__(self) -> Iterator[FakeUpstream]:
        return iter(self.upstreams)

    @property
    def urls(self) -> list[str]:
        return [upstream.url for upstream in self.upstreams]

    def named(self, name: str) -> FakeUpstream:
        return next(upstream for upstream in self.upstreams if upstream.name == name)

    def loads(self, model: str | None = None) -> int:
        """Cold loads over the fleet, of one model or of all."""
        return sum(_count(upstream.loads, model) for upstream in self.upstreams)

    def evictions(self, model: str | None = None) -> int:
        return sum(_count(upstream.evictions, model) for upstream in self.upstreams)

    def not_found(self, model: str | None = None) -> int:
        return sum(_count(upstream.not_found, model) for upstream in self.upstreams)

    def toml(self) -> str:
        """The fleet as the ``[[upstream]]`` tables of a fleet.toml (issue 11)."""
        return "\n".join(
            f'[[upstream]]\nname = "{u.name}"\nurl = "{u.url}"\n'
            f"slots = {u.spec.slots}\nmax_loaded = {u.spec.max_loaded}\n"
            for u in self.upstreams
        )


def _count(counts: PerModel, model: str | None) -> int:
    return counts.total() if model is None else counts[model]


class FleetFactory(Protocol):
    def __call__(self, n: int, **options: Unpack[FleetOptions]) -> Awaitable[Fleet]: ...


@pytest.fixture
def start_fleet(aiohttp_server: AiohttpServer) -> FleetFactory:
    """Start ``n`` fake upstreams on loopback (options: ``FleetOptions``)."""

    async def start(n: int, **options: Unpack[FleetOptions]) -> Fleet:
        upstreams = []
        for index, spec in enumerate(specs(n, options)):
            upstream = FakeUpstream(f"u{index + 1}", spec)
            upstream.attach(await aiohttp_server(upstream.app))
            upstreams.append(upstream)
        return Fleet(upstreams)

    return start

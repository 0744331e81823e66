"""The pass-through handler: one client request in, the same request out to Ollama, the same
response back, byte for byte, while an ``Exchange`` record is filled for metrics and logs.

Rules:
1. Bytes are never changed, added or held back. Request bodies stream upstream as they arrive,
   except the JSON body of a route that names a model, read whole within bounds to learn the
   model and stream flag (bodies.py). Response chunks are written to the client as they
   arrive. Observing them (ollama.tail_for) is a side channel that cannot fail. (The
   opt-in exceptions: stream_usage.py, and gateway/keep_alive.py for keys under
   ``max_keep_alive``.)
2. What a client may send and what goes upstream in the head is inbound.py's, and who may
   send it is gateway/access.py's (with access control on): refusals there are answered
   here, in the route's error shape, before anything goes upstream.
3. A request is recorded exactly once, and before the client can see the end of its response:
   when the final record of a stream passes (before it is written), else before
   ``write_eof`` for chunked bodies and before the last write for fixed-length ones. A client
   that leaves after its stream's final record has been delivered got a complete answer: it
   is recorded as such, with its usage.
4. Failures: before the response starts, an upstream failure becomes a 502/504. After it
   starts, the status cannot change: the client connection is closed without the end of the
   body, so the client sees the same truncation the proxy saw. A client that goes away
   cancels this handler (handler_cancellation), which closes the upstream connection, which
   makes Ollama stop generating.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any, Final

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

from . import exchange as ex
from .bodies import NOTHING_HELD, Body, InspectBudget, read_body, sent
from .config import Config, HostPort
from .errors import (
    UpstreamClosed,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_body,
)
from .exchange import Exchange
from .gateway.access import Access, Gate
from .gateway.admission import Admission
from .gateway.dispatch import NO_UPSTREAM, PIN_HEADER, Dispatch
from .gateway.identity import ANONYMOUS
from .gateway.keys import Role
from .gateway.limit_metrics import LimitMetrics
from .gateway.limits import Limiter
from .gateway.router import model_key
from .gateway.union import FLEET_WIDE, V1_MODELS, merge
from .hosts import HostCheck, host_check_for
from .inbound import (
    HOP_BY_HOP,
    HeadWriter,
    Refusal,
    check_base_path,
    check_transfer_coding,
    filtered_headers,
    target_of,
)
from .labels import MAX_NAME_LENGTH, ModelLabels
from .metrics import Metrics
from .ollama import (
    Ending,
    Framing,
    LineTail,
    Route,
    RouteKind,
    WholeBody,
    framing_for,
    inspect_request,
    judge,
    route_for,
    tail_for,
)
from .responses import OwnResponse
from .stream_usage import HiddenUsage, with_include_usage

log = logging.getLogger(__name__)

SESSION: Final = web.AppKey("upstream_session", aiohttp.ClientSession)

_STREAMED: Final = (Framing.NDJSON, Framing.SSE)
JSON_ERROR: Final = "application/json; charset=utf-8"
_V1_CHAT: Final = "/v1/chat/completions"
_READS: Final = frozenset({"GET", "HEAD"})
_REFUSED_HOSTS_LOGGED: Final = 64
#: A refused request's body, when it came whole with the head and is no larger, is read for
#: its audit line (which model someone tried to pull).
_HELD: Final = 64 * 1024
#: Model names whose slot name is kept worked out (at most MAX_NAME_LENGTH long each).
_SLOT_NAMES_KEPT: Final = 1024


class _PassthroughResponse(web.StreamResponse):
    """A StreamResponse that adds no ``Server`` header of its own."""

    def __init__(self, *, status: int, reason: str | None, headers: CIMultiDict[str]) -> None:
        super().__init__(status=status, reason=reason, headers=headers)
        self._upstream_server = hdrs.SERVER in headers

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        if not self._upstream_server:
            self.headers.popall(hdrs.SERVER, None)


# What reading the upstream body can raise once the response has started.
_UPSTREAM_READ_ERRORS: Final = (
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    asyncio.TimeoutError,
)


def _unroutable(request: web.Request, cap: int) -> Refusal:
    """A request whose model is in a body the proxy could not read: in a fleet it cannot be
    placed (sending it anywhere could reach a server without the model), and behind slots it
    cannot be given one (sent anyway, it would run on top of the slots others wait for)."""
    coding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").lower()
    if coding != "identity":
        return Refusal(415, "ollama-meter: send the body unencoded: the proxy reads its model")
    length = request.content_length
    if length is None or length > cap:
        return Refusal(
            413, f"ollama-meter: the body is over --max-inspect-bytes ({cap}): the proxy "
            "reads its model",
        )  # fmt: skip
    return Refusal(503, "ollama-meter: too many large bodies at once", {"Retry-After": "1"})


def _retry_reason(exc: BaseException) -> str | None:
    """Why a failed attempt may be tried on another upstream (nothing reached Ollama's
    handler, or it was reset before answering), or None."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return "reset"
    return None


#: Largest 503 body read to see whether it is Ollama's "server busy".
_BUSY_BODY: Final = 4096


async def _busy_body(upstream: aiohttp.ClientResponse) -> bytes | None:
    """The body of a short 503 (read to tell "server busy" from other 503s), else None."""
    length = upstream.content_length
    if upstream.status != 503 or length is None or length > _BUSY_BODY:
        return None
    try:
        return await upstream.content.readexactly(length)
    except (aiohttp.ClientError, asyncio.IncompleteReadError, TimeoutError):
        return None


def _took(x: Exchange, tail: LineTail | WholeBody | None, content: aiohttp.StreamReader) -> None:
    """What the response body amounted to, however it ended."""
    x.response_bytes = content.total_bytes
    if isinstance(tail, LineTail):
        x.records = tail.records


class Proxy:
    """The catch-all request handler."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        labels: ModelLabels,
        access_log: Callable[[Exchange], None] | None,
        access: Access | None = None,
        dispatch: Dispatch | None = None,
        limiter: Limiter | None = None,
        admission: Admission[Any] | None = None,
        limit_metrics: LimitMetrics | None = None,
        ledger: Callable[[Exchange], None] | None = None,
        status: Callable[[Exchange], None] | None = None,
    ) -> None:
        self._ledger = ledger
        self._status = status
        self._base = str(config.upstream).rstrip("/")
        self._has_base_path = bool(config.upstream.path.strip("/"))
        self._config = config
        self._metrics = metrics
        self._labels = labels
        self._access_log = access_log
        self._access = access
        self._dispatch = dispatch
        self._limiter = limiter
        self._admission = admission
        self._limit_metrics = limit_metrics
        self._slot_names: dict[str, str] = {}
        if dispatch is not None and any(
            node.settings.url.path.strip("/") for node in dispatch.fleet.nodes
        ):
            self._has_base_path = True  # some upstream has one: keep requests inside it
        self._head = HeadWriter(
            config.preserve_host,
            config.trusted_proxies,
            drop_credentials=access is not None,
            drop=frozenset({PIN_HEADER.lower()}) if dispatch is not None else frozenset(),
        )
        self.host_check = host_check_for(config, config.listen)
        self._budget = InspectBudget(config.max_inspect_total)
        self._refused_hosts: set[str] = set()
        #: Set when the server begins its graceful shutdown: a cancellation after that is ours.
        self.shutting_down = False
        self._tasks: set[asyncio.Task[None]] = set()

    def client_of(self, request: web.BaseRequest) -> str | None:
        """The client's address (behind trusted proxies, from X-Forwarded-For)."""
        return self._head.client_of(request)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def cut_off(self) -> int:
        """Cancel every request still in flight (the shutdown deadline has passed); how many.

        aiohttp's own graceful shutdown cannot do this on time: it only fails reads of the
        request body, which a handler streaming a response is not doing, and then waits the
        shutdown timeout a second time before cancelling.
        """
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return len(tasks)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, None, self.host_check)

    def handler_for(
        self, role: Role, listen: HostPort
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """The handler of a role listener on ``listen``: its requests have at least ``role``,
        and the Host rule applies as it would on any listener there (a loopback listener that
        grants a role is what a DNS-rebinding page would aim at)."""
        check = host_check_for(self._config, listen)

        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, role, check)

        return handle

    async def _serve(
        self, request: web.Request, role: Role | None, check: HostCheck | None
    ) -> web.StreamResponse:
        route = route_for(request.path)
        x = Exchange(request.method, route.template, perf_counter(), inference=route.inference)
        task = request.task  # the handler's task (asyncio.current_task() costs a getpid())
        self._tasks.add(task)
        try:
            return await self._handle(request, route, x, role, check)
        except Refusal as refusal:
            return self._refuse(request, x, refusal)
        except asyncio.CancelledError:
            # (Already recorded: the client left after its answer was complete.)
            if x.recorded:
                pass
            elif self.shutting_down:
                x.error = ex.SHUTDOWN
                x.status = x.status or ex.STATUS_SHUTDOWN
            else:
                x.error = ex.CLIENT_DISCONNECT
                x.status = ex.STATUS_CLIENT_CLOSED
            raise
        except ConnectionError:
            # The client went away while we read its body or wrote the response.
            if not x.recorded:
                x.error = ex.CLIENT_DISCONNECT
                x.status = ex.STATUS_CLIENT_CLOSED
            return web.Response()  # never sent: the connection is gone
        except Exception:
            # A bug of ours: aiohttp logs it and answers 500 (if nothing was sent yet); the
            # request is counted with that status, never as status 0.
            x.status = x.status or 500
            raise
        finally:
            self._tasks.discard(task)
            # A cancelled handler's traceback holds this frame: without this, frame -> task ->
            # exception -> traceback -> frame is a cycle that keeps the request's memory until
            # a full garbage collection (rare by design, cli.tune_runtime).
            del task
            self._record(request, x)

    async def expect(self, request: web.Request) -> None:
        """``Expect: 100-continue``: the 100 only for a request that will be admitted; one
        that will be refused gets its refusal at once, before it sends its body."""
        try:
            self.admit(request)
        except Refusal:
            return
        if self._access is not None:
            route = route_for(request.path)
            if self._access.identify(request.headers, request.method, route).refusal:
                return
        if request.version == aiohttp.HttpVersion11:
            if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
                raise web.HTTPExpectationFailed(text="unknown Expect")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the response itself has not started

    def admit(self, request: web.BaseRequest) -> str:
        """The target to send upstream, or a Refusal (inbound.py's rules, and the Host rule)."""
        headers = request.headers
        host, coding = headers.get(hdrs.HOST, ""), headers.get(hdrs.TRANSFER_ENCODING)
        return self._admit(request, host, coding, self.host_check)

    def _admit(
        self, request: web.BaseRequest, host: str, coding: str | None, check: HostCheck | None
    ) -> str:
        target = request.raw_path
        if target[:1] != "/":
            target, host = target_of(request)
        if check is not None and not check.allows(host):
            self._say_refused(host)
            raise Refusal(403, None)
        if self._has_base_path:
            check_base_path(target)
        if coding is not None:
            check_transfer_coding(coding)
        return target

    def _say_refused(self, host: str) -> None:
        """Say once per Host value (a bounded number of them) why it was refused: the client
        only gets Ollama's empty 403."""
        if host in self._refused_hosts or len(self._refused_hosts) >= _REFUSED_HOSTS_LOGGED:
            return
        self._refused_hosts.add(host)
        log.info(
            "refused Host %r: not a local name or address (Ollama's rule against DNS "
            "rebinding); allow it with --allowed-hosts, or see --host-check",
            host[:200],
        )

    def _record(self, request: web.Request, x: Exchange) -> None:
        if x.recorded:
            return
        x.finished = perf_counter()
        x.request_bytes = request.content.total_bytes
        self._metrics.request_finished(x)
        if self._dispatch is not None:
            self._dispatch.ended(x)
        if self._limiter is not None:
            self._limiter.ended(x)
        if x.slot is not None and self._admission is not None:
            slot, x.slot = x.slot, None  # given back once (admission.py, rule 4)
            self._admission.release(slot)
        if self._access is not None:
            self._access.finished(x, x.gate, lambda: self._head.client_of(request), request.path)
        if self._ledger is not None:
            self._ledger(x)
        if self._status is not None:
            self._status(x)
        if self._access_log is not None:
            self._access_log(x)

    async def _handle(
        self,
        request: web.Request,
        route: Route,
        x: Exchange,
        role: Role | None,
        check: HostCheck | None,
    ) -> web.StreamResponse:
        # One pass over the head: filtered, and the Host and Transfer-Encoding it carries.
        headers, host, coding = self._head.headers(request)
        target = self._admit(request, host, coding, check)
        gate: Gate | None = None
        if self._access is not None:
            x.gate = gate = self._access.identify(request.headers, request.method, route, role)
            identity = gate.identity
            if identity.keyed:
                x.key, x.team = identity.name, identity.team
            if gate.refusal is not None:
                content = request.content
                if route.inspects_body and content.is_eof() and content.total_bytes <= _HELD:
                    gate.body = content.read_nowait()  # arrived with the head: for the audit
                raise gate.refusal
        if (
            self._dispatch is not None
            and route.template in FLEET_WIDE
            and request.method in _READS
            and PIN_HEADER not in request.headers
        ):
            return await self._fleet_answer(x, route)
        config = self._config
        body, data, hold = await read_body(
            request, route, config.max_inspect_bytes, self._budget, config.keepalive_timeout
        )
        hidden: HiddenUsage | None = None
        whole = body  # the bytes that go up, when the body was read whole (for a retry)
        try:
            facts = inspect_request(route, body)
            model = facts.model
            if route.model_in_path:
                model = request.path[len("/v1/models/") :] or None
            x.model = self._labels.label(model)
            x.stream = facts.stream
            if gate is not None and self._access is not None:
                read = body is not None or not request.body_exists
                changed = await self._access.check_body(gate, route, model, body, read)
                if changed is not None:
                    body = whole = changed
                    data = sent(changed, hold)
                    headers[hdrs.CONTENT_LENGTH] = str(len(changed))
            if config.openai_stream_usage and body is not None and route.template == _V1_CHAT:
                asking = with_include_usage(body)
                if asking is not None:
                    data, hidden = sent(asking, hold), HiddenUsage(config.max_response_tail)
                    whole = asking
                    headers[hdrs.CONTENT_LENGTH] = str(len(asking))
            body = None
            if (
                (self._dispatch is not None or self._gated(route))
                and whole is None
                and route.inspects_body
                and request.body_exists
            ):
                # Its model decides the server, or the slot it waits for: never sent blind.
                raise _unroutable(request, config.max_inspect_bytes)
            if (limiter := self._limiter) is not None and route.inference:
                who = None if gate is None else gate.identity
                openai = request.path.startswith("/v1/")
                x.held = (
                    limiter.check_now(who, openai)
                    if limiter.memory is not None
                    else await limiter.check(who, openai)
                )
            if (dispatch := self._dispatch) is not None:
                method, head = request.method, request.headers
                x.target = dispatch.place_now(method, route, model, head) or await dispatch.place(
                    method, route, model, head
                )
            if (
                self._admission is not None
                and route.inference
                and model is not None
                and not self._take_slot(x, model)  # most find one free: no coroutine then
            ):
                await self._admit_slot(x, route, model)
            self._metrics.request_started(x)
            sending = await self._send(request, route, x, target, headers, data, model, whole)
            if isinstance(sending, OwnResponse):
                return sending
            upstream, first = sending
        finally:
            hold.release()  # if the body has not already given it back on its way up
        data = None
        clean = False
        try:
            response = await self._relay(request, route, x, upstream, hidden, first)
            # The request body must have gone out whole too: a body read to inspect it, or
            # no body, is at its end; a streamed one only if the client finished it.
            clean = x.error is None and request.content.is_eof()
            return response
        finally:
            # A whole exchange frees the connection for reuse; anything else closes it,
            # which is how Ollama learns that nobody is waiting for the rest.
            if clean:
                upstream.release()
            else:
                upstream.close()

    def _gated(self, route: Route) -> bool:
        """Whether this request waits for a slot (the admit step is on, and it runs a model)."""
        return self._admission is not None and route.inference

    def _take_slot(self, x: Exchange, model: str) -> bool:
        """The admit step when the chosen upstream has a slot free (or is not gated): taken
        at once. False: the request must wait (``_admit_slot``)."""
        admission = self._admission
        assert admission is not None
        if self._dispatch is None:
            slot = admission.take_now(self._slot_name(model))
        else:
            assert x.target is not None
            slot = admission.take_now(x.target)
        if slot is False:
            return False
        x.slot = slot
        if slot is not None and self._limit_metrics is not None:
            self._limit_metrics.waited(x.model, 0.0)
        return True

    async def _admit_slot(self, x: Exchange, route: Route, model: str) -> None:
        """The admit step when every slot is taken: a wait in the queue for one."""
        admission = self._admission
        assert admission is not None
        if self._dispatch is None:
            name = self._slot_name(model)
            admitted = await admission.admit(x.key or ANONYMOUS, name, lambda: name)
        else:
            dispatch, first = self._dispatch, x.target
            assert first is not None
            admitted = await admission.admit(
                x.key or ANONYMOUS, first, lambda: dispatch.again(first, route, model)
            )
            x.target = admitted.target
        x.slot = admitted.slot
        if admitted.slot is not None and self._limit_metrics is not None:
            self._limit_metrics.waited(x.model, admitted.waited)

    def _slot_name(self, model: str) -> str:
        """The name slots are counted under with one upstream: the bounded model label (a
        client naming endless made-up models must not grow the slots' table; Ollama answers
        those with a 404 at once anyway), of the name as Ollama compares names, so that no
        other spelling of a model (library/NAME) has slots of its own."""
        names = self._slot_names
        name = names.get(model)
        if name is None:
            name = self._labels.label(model_key(model))
            if len(model) <= MAX_NAME_LENGTH:  # a made-up name of a megabyte is not kept
                if len(names) >= _SLOT_NAMES_KEPT:
                    names.clear()
                names[model] = name
        return name

    async def _fleet_answer(self, x: Exchange, route: Route) -> OwnResponse:
        """``/api/tags``, ``/v1/models``, ``/api/ps`` of a fleet: every healthy upstream's
        answer, merged (union.py)."""
        assert self._dispatch is not None
        answers = await self._dispatch.fleet.ask_all(route.template)
        if not answers:
            raise Refusal(503, "ollama-meter: no upstream is answering", {"Retry-After": "2"})
        body = merge(route.template, [answer for _, answer in answers])
        x.status, x.response_bytes = 200, len(body)
        kind = "application/json" if route.template == V1_MODELS else JSON_ERROR
        names = ",".join(node.name for node, _ in answers)
        return OwnResponse(body=body, headers={hdrs.CONTENT_TYPE: kind, PIN_HEADER: names})

    async def _send(
        self,
        request: web.Request,
        route: Route,
        x: Exchange,
        target: str,
        headers: CIMultiDict[str],
        data: Body,
        model: str | None,
        whole: bytes | None = None,
    ) -> tuple[aiohttp.ClientResponse, bytes] | OwnResponse:
        """The request sent upstream: its response head (and the body, when it had to be
        read to judge it), or our 502/504. In a fleet, a failure before any answer (refused,
        reset) and Ollama's 503 "server busy" are retried on another eligible upstream, each
        at most once, when the proxy holds the whole body (never a blob, never a streamed
        body, never a pinned request); when none is left, the last answer or failure stands."""
        session = request.app[SESSION]
        place = x.target
        if place is None:
            try:
                upstream = await session.request(
                    request.method,
                    URL(self._base + target, encoded=True),
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                )
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                return self._fail(request, x, self._translate(exc))
            return upstream, b""
        assert self._dispatch is not None
        fleet = self._dispatch.fleet
        resendable = (data is None or whole is not None) and place.decision != "pinned"
        tried: set[str] = set()
        common = headers
        while True:
            node = place.node
            if node.settings.headers:  # this upstream's own, never sent to another
                headers = common.copy()
                for name, value in node.settings.headers:
                    headers[name] = value
            else:
                headers = common
            x.cold = x.loading = fleet.sent(node, place.key)
            x.dispatched = True
            fleet.count_decision(node, place.decision)
            busy: tuple[aiohttp.ClientResponse, bytes] | None = None
            failure: UpstreamError | None = None
            try:
                upstream = await session.request(
                    request.method,
                    URL(node.base + target, encoded=True),
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                )
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                reason, failure = _retry_reason(exc), self._translate(exc)
                if reason is None or not resendable:
                    return self._fail(request, x, failure)
            else:
                busy_503 = resendable and upstream.status == 503
                read = await _busy_body(upstream) if busy_503 else None
                if read is None or b"server busy" not in read:
                    if x.loading:
                        fleet.answered(node, place.key, upstream.status)
                        x.loading = False
                    return upstream, read or b""
                reason, busy = "busy", (upstream, read)
            tried.add(node.name)
            try:
                if len(tried) >= len(fleet.nodes):
                    raise Refusal(503, None)  # each upstream at most once
                next_place = await self._dispatch.place(
                    request.method, route, model, request.headers, frozenset(tried)
                )
                if x.slot is not None and self._admission is not None:
                    held, x.slot = x.slot, None  # move gives it back, or keeps it (False)
                    moved = self._admission.move(held, next_place)
                    if moved is False:  # the other one's slots are all taken: no retry
                        x.slot = held
                        raise Refusal(503, None)
                    x.slot = moved
            except Refusal:
                if busy is not None:
                    return busy  # every holder is busy: Ollama's own 503 stands
                assert failure is not None
                return self._fail(request, x, failure)
            # This attempt ended without an answer the client will see.
            fleet.ended(node, place.key, cold=x.cold, loading=x.cold, status=0, usage=None,
                        transport_failed=busy is None)  # fmt: skip
            fleet.count_retry(node, reason)
            if busy is not None:
                busy[0].release()
            x.target = place = next_place
            if whole is not None:
                data = sent(whole, NOTHING_HELD)  # the first attempt consumed its slices

    async def _relay(
        self,
        request: web.Request,
        route: Route,
        x: Exchange,
        upstream: aiohttp.ClientResponse,
        hidden: HiddenUsage | None,
        first: bytes = b"",
    ) -> web.StreamResponse:
        """Relay the response (``first``: its body, when it had to be read already)."""
        x.status = status = upstream.status
        framing: Framing | None = None
        if (
            route.kind is not RouteKind.PLAIN
            and 200 <= status < 300
            and hdrs.CONTENT_ENCODING not in upstream.headers
        ):
            framing = framing_for(upstream.headers.get(hdrs.CONTENT_TYPE))
        config = self._config
        tail = (
            tail_for(framing, config.max_inspect_bytes, config.max_response_tail)
            if framing
            else None
        )
        marker = route.final_marker(framing) if framing else None
        reach = len(marker) - 1 if marker else 0
        edge = b""
        if framing is not Framing.SSE:
            hidden = None
        x.streamed = framing in _STREAMED
        out = filtered_headers(upstream.headers, HOP_BY_HOP)
        if x.target is not None:
            out[PIN_HEADER] = x.target.node.name
        if status == 503 and x.slot is not None and hdrs.RETRY_AFTER not in out:
            # Ollama's own 503 (its queue is full, or it is busy loading) says nothing of when
            # to come back; behind a gated upstream, the client is told (limits issue, item 5).
            out[hdrs.RETRY_AFTER] = "1"
        response = _PassthroughResponse(status=status, reason=upstream.reason, headers=out)
        await response.prepare(request)
        content = upstream.content
        watching = False
        try:
            while True:
                try:
                    chunk = first or await content.readany()
                except _UPSTREAM_READ_ERRORS as exc:
                    return await self._broken(request, response, x, exc, tail, content, hidden)
                first = b""
                if not chunk:
                    break
                if x.first_byte is None:
                    x.first_byte = perf_counter()
                if tail is not None:
                    tail.feed(chunk)
                    if marker is not None:
                        if watching or marker in chunk or marker in edge + chunk[:reach]:
                            # Maybe the final record: if so, record now, before it is written;
                            # if its line is not complete yet, look again with the next chunk.
                            if self._complete(request, route, x, tail, content, True):
                                marker = None
                            else:
                                watching = not chunk.endswith(b"\n")
                        edge = chunk[-reach:]  # a marker may be split across two chunks
                if content.at_eof():
                    # The last chunk: with a fixed length, the client sees the end with it.
                    self._complete(request, route, x, tail, content)
                if hidden is not None:
                    chunk = hidden.feed(chunk)
                    if not chunk:
                        continue
                await response.write(chunk)
        except (asyncio.CancelledError, ConnectionError):
            # Judge what was delivered: a stream whose final record went out is complete.
            if not x.recorded and (
                not reach or not self._complete(request, route, x, tail, content, True)
            ):
                _took(x, tail, content)
            raise
        if hidden is not None and (rest := hidden.flush()):
            await response.write(rest)
        self._complete(request, route, x, tail, content)
        await response.write_eof()
        return response

    def _complete(
        self,
        request: web.Request,
        route: Route,
        x: Exchange,
        tail: LineTail | WholeBody | None,
        content: aiohttp.StreamReader,
        final_only: bool = False,
    ) -> bool:
        """Judge the body and record the exchange (once). With ``final_only``, only if the
        stream's final record has passed; returns whether the exchange is recorded."""
        if x.recorded:
            return True
        if tail is not None:
            outcome = judge(route.kind, tail)
            if final_only and (outcome.ending is not Ending.COMPLETE or outcome.oversized):
                return False
            x.usage = outcome.usage
            x.usage_oversized = outcome.oversized
            if outcome.ending is Ending.ERROR:
                x.error = ex.STREAM_ERROR
            elif outcome.ending is Ending.UNTERMINATED:
                x.error = ex.UPSTREAM_CLOSED
        elif final_only:
            return False
        _took(x, tail, content)
        self._record(request, x)
        return True

    async def _broken(
        self,
        request: web.Request,
        response: web.StreamResponse,
        x: Exchange,
        exc: BaseException,
        tail: LineTail | WholeBody | None,
        content: aiohttp.StreamReader,
        hidden: HiddenUsage | None,
    ) -> web.StreamResponse:
        """The upstream failed mid-body: count it, and cut the client off the same way."""
        if not x.recorded:
            x.error = (
                ex.UPSTREAM_TIMEOUT if isinstance(exc, asyncio.TimeoutError) else ex.UPSTREAM_CLOSED
            )
            _took(x, tail, content)
        log.warning(
            "%s %s: upstream %s broke off the response: %s",
            request.method,
            x.endpoint,
            self._base if x.target is None else x.target.node.name,
            self._translate(exc).detail,
        )
        self._record(request, x)
        if hidden is not None and (rest := hidden.flush()):
            await response.write(rest)
        # Flush what was written, then close without the end of the body: never a clean end.
        response.force_close()
        if request.transport is not None:
            request.transport.close()
        return response

    def _fail(self, request: web.Request, x: Exchange, error: UpstreamError) -> OwnResponse:
        x.status = error.status
        x.error = error.reason
        headers: dict[str, str] = {hdrs.CONTENT_TYPE: JSON_ERROR}
        where = self._base
        if x.target is not None:
            where = headers[PIN_HEADER] = x.target.node.name
        log.warning("%s %s: upstream %s: %s", x.method, x.endpoint, where, error.detail)
        self._record(request, x)
        return OwnResponse(
            status=error.status,
            body=error_body(x.endpoint, error.status, f"ollama-meter: upstream: {error}"),
            headers=headers,
        )

    def _refuse(self, request: web.Request, x: Exchange, refusal: Refusal) -> OwnResponse:
        x.status = refusal.status
        x.refused = refusal.reason or "refused"
        if refusal.reason == NO_UPSTREAM and self._limit_metrics is not None and x.target is None:
            self._limit_metrics.refused(NO_UPSTREAM, x.key)
        if refusal.message is None:
            response = OwnResponse(status=refusal.status)
        else:
            response = OwnResponse(
                status=refusal.status,
                # The shape by the path itself: a /v1 path the route table does not know is
                # still an OpenAI-style client's.
                body=error_body(request.path, refusal.status, refusal.message),
                headers={hdrs.CONTENT_TYPE: JSON_ERROR, **(refusal.headers or {})},
            )
        if refusal.status in (408, 501):
            # The rest of the body is in doubt: never read another request on this connection.
            response.force_close()
        return response

    def _translate(self, exc: BaseException) -> UpstreamError:
        """The one place where aiohttp's client exceptions become ours."""
        config = self._config
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return UpstreamTimeout(f"no connection within {config.connect_timeout:g}s")
        if isinstance(exc, asyncio.TimeoutError):
            return UpstreamTimeout(f"no data for {config.read_timeout or 0:g}s")
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            return UpstreamUnavailable("cannot resolve its host name", detail=str(exc))
        if isinstance(exc, aiohttp.ClientConnectorError):
            if isinstance(exc.os_error, ConnectionRefusedError):
                return UpstreamUnavailable("connection refused")
            reason = (exc.os_error.strerror or "cannot connect").lower()
            return UpstreamUnavailable(reason, detail=str(exc))
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return UpstreamClosed("connection closed before the response was complete")
        if isinstance(exc, aiohttp.ClientPayloadError):
            return UpstreamClosed("response body cut short", detail=str(exc))
        return UpstreamClosed("invalid response", detail=str(exc) or type(exc).__name__)

"""The fleet: every upstream, what the proxy knows of it, and the poller that keeps it current.

Rules:
1. A background poller asks each upstream ``/api/version`` and ``/api/ps`` every ``interval``
   seconds (2), and ``/api/tags`` every ``tags_interval`` (30) and whenever ``refresh_tags`` is
   called (after a model-management call, or when nobody lists a model); concurrent refreshes
   share one round of asks. The first round runs before the listener opens.
2. A poll that gets no answer (refused, reset, timed out) is a transport failure for the
   upstream's breaker (breaker.py), as is a request that fails before its headers; an HTTP
   error answer is not. An upstream is healthy when its last poll answered and its breaker
   allows it.
3. The proxy's own traffic adds to what the poller saw: a model is hot on an upstream after a
   2xx for it there (until the expiry the last /api/ps gave, else ``DEFAULT_KEEP_ALIVE``); a
   request sent while it was cold marks it loading until it answers; in-flight counts and
   moving averages of service and load times come from the requests that ended.
4. ``views`` hands the router (router.py) a snapshot that it only reads. Nothing here blocks: the
   poller's asks are bounded by the probe timeout, and the request path only does arithmetic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import orjson
from yarl import URL

from ..fleet_settings import UpstreamSettings
from ..ollama import Usage, parse_time
from .breaker import Breaker
from .router import UpstreamView, expected_victim, model_key

log = logging.getLogger(__name__)

INTERVAL: Final = 2.0
TAGS_INTERVAL: Final = 30.0
#: How long a model stays hot after a 2xx when /api/ps gave no expiry (Ollama's default).
DEFAULT_KEEP_ALIVE: Final = 300.0
#: routing_decisions_total's decisions, and upstream_retries_total's reasons.
DECISIONS: Final = ("hot", "queued_hot", "loading", "cold", "retry", "pinned", "only")
RETRY_REASONS: Final = ("connect", "reset", "busy")
#: Weight of the newest sample in the moving averages.
ALPHA: Final = 0.2
_PROBE_ERRORS: Final = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def poll_error(exc: BaseException) -> str:
    """A failed poll in words, for /-/fleet and the status page. Never ``repr(exc)``: a
    ClientResponseError's holds the request's headers, the upstream's token among them."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "connection refused"
        return (exc.os_error.strerror or "cannot connect").lower()
    if isinstance(exc, aiohttp.TooManyRedirects):
        return "too many redirects"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "not a valid HTTP answer"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection closed before the answer"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "answer cut short"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


def _average(previous: float | None, sample: float) -> float:
    return sample if previous is None else previous + ALPHA * (sample - previous)


@dataclass(slots=True)
class Node:
    """One upstream as the proxy knows it."""

    settings: UpstreamSettings
    breaker: Breaker = field(default_factory=Breaker)
    answered: bool = False
    #: The raw bodies of its last answers, for the routes the fleet answers as a whole.
    version: bytes | None = None
    tags: list[dict[str, Any]] = field(default_factory=list)
    ps: list[dict[str, Any]] = field(default_factory=list)
    models: frozenset[str] = frozenset()
    #: Whether /api/tags has answered at least once (until then, "not listed" means "not known").
    tags_known: bool = False
    loaded: dict[str, float | None] = field(default_factory=dict)
    last_poll: float = 0.0
    last_error: str | None = None
    in_flight: int = 0
    # Per model, kept in the shapes the router reads, so that a snapshot copies nothing
    # (the router reads them synchronously and never changes them): requests in flight
    # (no zeros), requests sent cold and not answered, since when the first of those was
    # sent, and the moving averages.
    in_flight_by: dict[str, int] = field(default_factory=dict)
    cold_by: dict[str, int] = field(default_factory=dict)
    loading: dict[str, float] = field(default_factory=dict)
    service: dict[str, float] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)
    #: Its address as text, without the trailing slash (a request path is appended to it).
    base: str = field(init=False)
    #: Its name (the settings', kept here: read several times a request).
    name: str = field(init=False)
    _view: UpstreamView | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.base = str(self.settings.url).rstrip("/")
        self.name = self.settings.name

    def healthy(self, now: float) -> bool:
        return self.answered and self.breaker.allows(now)

    def view(self, now: float) -> UpstreamView:
        """The router's view of it now. The per-model dicts in it are this node's own, so a
        view stays current as requests come and go; what else it holds is rebuilt only when
        it changed (health, a new ``loaded`` or ``models``, which are replaced, never changed
        in place), or always while a model loads (``loaded`` is then a filtered copy)."""
        breaker = self.breaker  # (self.healthy(now), inline: this runs per upstream per request)
        probe = breaker.retry_at if breaker.is_open else None
        healthy = self.answered and (probe is None or now >= probe)
        cached = self._view
        if (
            cached is not None
            and cached.loaded is self.loaded
            and cached.models is self.models
            and cached.healthy == healthy
            and cached.next_probe == probe
            and not self.loading
        ):
            return cached
        loading = self.loading
        loaded = self.loaded
        if loading:  # a model /api/ps lists while the proxy's request still loads it
            loaded = {k: v for k, v in loaded.items() if k not in loading}
        settings = self.settings
        self._view = view = UpstreamView(
            settings.name,
            healthy,
            self.models,
            loaded,
            loading,
            self.in_flight_by,
            settings.slots,
            settings.max_loaded,
            self.service,
            self.load,
            probe,
        )
        return view


def _decrement(counts: dict[str, int], key: str) -> bool:
    """One less for ``key`` (a count is never kept at 0); whether any is left."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
        return True
    counts.pop(key, None)
    return False


def _models_of(body: bytes | None) -> list[dict[str, Any]] | None:
    if body is None:
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, list):
        return None
    return [m for m in models if isinstance(m, dict) and isinstance(m.get("name"), str)]


def _expiry(entry: dict[str, Any]) -> float | None:
    return parse_time(entry.get("expires_at"))


class Fleet:
    def __init__(
        self,
        upstreams: Sequence[UpstreamSettings],
        probe_timeout: float,
        clock: Callable[[], float] = time.time,
        interval: float = INTERVAL,
        tags_interval: float = TAGS_INTERVAL,
    ) -> None:
        self.nodes = [Node(u) for u in upstreams]
        self.by_name = {node.name: node for node in self.nodes}
        self._timeout = aiohttp.ClientTimeout(total=probe_timeout)
        self._clock = clock
        self._interval = interval
        self._tags_interval = tags_interval
        self._session: aiohttp.ClientSession | None = None
        self._refresh: asyncio.Future[None] | None = None
        self._refreshed_at = float("-inf")
        self._background: set[asyncio.Future[None]] = set()
        self.polls = 0
        #: Counters for the metrics: (upstream, decision), (upstream, reason), (upstream,
        #: model) of loads the proxy caused (a request sent while cold that answered 2xx).
        #: Decisions and retries exist at 0 from the start, so that Prometheus sees the first
        #: increase of each; ``created`` holds each series' creation time (OpenMetrics).
        started = time.time()
        self.decisions = {(n.name, d): 0 for n in self.nodes for d in DECISIONS}
        self.retries = {(n.name, r): 0 for n in self.nodes for r in RETRY_REASONS}
        self.cold_loads: dict[tuple[str, str], int] = {}
        self.created: dict[tuple[str, str], float] = dict.fromkeys(
            [*self.decisions, *self.retries], started
        )

    # --- polling -------------------------------------------------------------------------

    async def _get(self, node: Node, path: str) -> tuple[bytes | None, bool]:
        """(the body of a 2xx answer, whether the upstream answered at all)."""
        assert self._session is not None
        try:
            async with self._session.get(
                URL(node.base + path, encoded=True),
                headers=dict(node.settings.headers),
                timeout=self._timeout,
            ) as response:
                body = await response.read()
                return (body if 200 <= response.status < 300 else None), True
        except _PROBE_ERRORS as exc:
            node.last_error = f"{path}: {poll_error(exc)}"[:300]
            return None, False

    async def poll(self, node: Node, tags: bool) -> None:
        asks = [self._get(node, "/api/version"), self._get(node, "/api/ps")]
        if tags:
            asks.append(self._get(node, "/api/tags"))
        answers = await asyncio.gather(*asks)
        now = self._clock()
        node.last_poll = now
        (version, up), (ps, _) = answers[0], answers[1]
        node.answered = up
        if not up:
            node.breaker.failure(now)
            return
        node.breaker.success()
        node.version = version
        entries = _models_of(ps)
        if entries is not None:
            node.ps = entries
            node.loaded = {model_key(e["name"]): _expiry(e) for e in entries}
        if tags:
            listed = _models_of(answers[2][0])
            if listed is not None:
                node.tags = listed
                node.models = frozenset(model_key(e["name"]) for e in listed)
                node.tags_known = True

    async def ask_all(self, path: str) -> list[tuple[Node, bytes]]:
        """GET ``path`` from every healthy upstream at once: (node, body) of each 2xx, in the
        fleet's order."""
        nodes = list(self.healthy())
        answers = await asyncio.gather(*(self._get(node, path) for node in nodes))
        return [(node, body) for node, (body, _) in zip(nodes, answers, strict=True) if body]

    async def poll_all(self, tags: bool) -> None:
        await asyncio.gather(*(self.poll(node, tags) for node in self.nodes))
        self.polls += 1

    def refresh_soon(self) -> None:
        """Refresh the tags in the background (after a model-management call)."""
        task = asyncio.ensure_future(self.refresh_tags())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self) -> None:
        """Wait for the background refreshes under way (before the session they use closes;
        and for tests)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def refresh_tags(self, min_gap: float = 0.0) -> None:
        """Ask every upstream for its tags now; concurrent callers share one round, and
        with ``min_gap`` a round less than that many seconds old counts as now."""
        if self._refresh is None and self._clock() - self._refreshed_at < min_gap:
            return
        if self._refresh is None:
            self._refresh = asyncio.ensure_future(self.poll_all(tags=True))
            self._refresh.add_done_callback(self._refreshed)
        await asyncio.shield(self._refresh)

    def _refreshed(self, _: asyncio.Future[None]) -> None:
        self._refresh = None
        self._refreshed_at = self._clock()

    async def run(self, session: aiohttp.ClientSession) -> None:
        """The poller (after ``start``): forever, every ``interval``."""
        last_tags = self._clock()
        while True:
            await asyncio.sleep(self._interval)
            due = self._clock() - last_tags >= self._tags_interval
            if due:
                last_tags = self._clock()
            try:
                await self.poll_all(tags=due)
            except Exception:  # a bug of ours must not end polling
                log.exception("polling the fleet failed")

    async def start(self, session: aiohttp.ClientSession) -> None:
        """The first round, before the listener opens."""
        self._session = session
        await self.poll_all(tags=True)

    # --- what routing needs ---------------------------------------------------------------

    def now(self) -> float:
        return self._clock()

    def tag_names(self) -> list[str]:
        """Every model name any upstream lists, as it lists it (for the model labels)."""
        return [entry["name"] for node in self.nodes for entry in node.tags]

    def views(self, now: float | None = None) -> list[UpstreamView]:
        """Every node's view at ``now`` (the fleet's clock when None)."""
        at = self._clock() if now is None else now
        views = []  # (a loop: a comprehension is a call of its own, on every request)
        for node in self.nodes:
            views.append(node.view(at))
        return views

    def healthy(self) -> Iterable[Node]:
        now = self._clock()
        return (node for node in self.nodes if node.healthy(now))

    def status(self) -> dict[str, Any]:
        """What ``ollama-meter fleet status`` shows (GET /-/fleet), as plain JSON."""
        now = self._clock()
        return {
            "version": 1,
            "upstreams": [
                {
                    "name": node.name,
                    "url": str(node.settings.url),
                    "up": node.answered,
                    "breaker": "open" if node.breaker.is_open else "closed",
                    "slots": node.settings.slots,
                    "max_loaded": node.settings.max_loaded,
                    "models": len(node.models),
                    "loaded": sorted(k for k, v in node.loaded.items() if v is None or v > now),
                    "in_flight": dict(node.in_flight_by),
                    "last_poll": node.last_poll,
                    "last_error": node.last_error,
                }
                for node in self.nodes
            ],
        }

    # --- the proxy's own traffic (rule 3) ------------------------------------------------

    def sent(self, node: Node, key: str | None) -> bool:
        """A request went to ``node``; whether its model was cold there."""
        node.in_flight += 1
        if key is None:
            return False
        in_flight = node.in_flight_by
        in_flight[key] = in_flight.get(key, 0) + 1
        now = self._clock()
        loaded = node.loaded  # (_hot_at, inline: this runs on every request)
        if key in loaded:
            expires = loaded[key]
            if expires is None or expires > now:
                return False
        now = self._clock()
        # A full upstream unloads a model to load this one: count on that model no more
        # (until the next /api/ps says otherwise).
        victim = expected_victim(node.view(now), now)
        if victim is not None:
            node.loaded = {k: v for k, v in node.loaded.items() if k != victim}
        node.cold_by[key] = node.cold_by.get(key, 0) + 1
        node.loading.setdefault(key, now)
        return True

    def answered(self, node: Node, key: str | None, status: int) -> None:
        """The head of a request sent while cold arrived: its model is loaded (2xx), or the
        load is over anyway."""
        if key is None:
            return
        if not _decrement(node.cold_by, key):
            node.loading.pop(key, None)
        if 200 <= status < 300 and not self._is_hot(node, key):
            node.loaded = {**node.loaded, key: self._clock() + DEFAULT_KEEP_ALIVE}

    def count_decision(self, node: Node, decision: str | None) -> None:
        if decision is not None:
            key = (node.name, decision)
            self.decisions[key] += 1

    def count_retry(self, node: Node, reason: str) -> None:
        self.retries[node.name, reason] += 1

    def ended(
        self,
        node: Node,
        key: str | None,
        *,
        cold: bool,
        loading: bool,
        status: int,
        usage: Usage | None,
        transport_failed: bool,
        label: str | None = None,
    ) -> None:
        """A request sent to ``node`` is over (``loading``: sent cold, and no head came)."""
        node.in_flight -= 1
        now = self._clock()
        if transport_failed:
            node.breaker.failure(now)
        if key is None:
            return
        in_flight = node.in_flight_by  # (_decrement, inline: this runs on every request)
        left = in_flight.get(key, 0) - 1
        if left > 0:
            in_flight[key] = left
        else:
            in_flight.pop(key, None)
        if loading:
            self.answered(node, key, 0)
        if cold and 200 <= status < 300:
            load = (node.name, label or key)  # the model label the other families use
            if load not in self.cold_loads:
                self.cold_loads[load] = 0
                self.created[load] = time.time()
            self.cold_loads[load] += 1
        if 200 <= status < 300 and not (
            key in node.loaded and ((expires := node.loaded[key]) is None or expires > now)
        ):  # (not _hot_at, inline)
            # Loaded, for as long as Ollama keeps a model by default (the next poll of /api/ps
            # says exactly).
            node.loaded = {**node.loaded, key: now + DEFAULT_KEEP_ALIVE}
        if usage is not None:
            busy = (usage.prompt_eval_seconds or 0.0) + (usage.eval_seconds or 0.0)
            if busy:
                node.service[key] = _average(node.service.get(key), busy)
            if cold and usage.load_seconds is not None:
                node.load[key] = _average(node.load.get(key), usage.load_seconds)

    def is_hot(self, node: Node, key: str) -> bool:
        return self._is_hot(node, key)

    def _is_hot(self, node: Node, key: str) -> bool:
        return _hot_at(node, key, self._clock())


def _hot_at(node: Node, key: str, now: float) -> bool:
    if key not in node.loaded:
        return False
    expires = node.loaded[key]
    return expires is None or expires > now

"""The choice of upstream for a request that names a model: a pure function over a snapshot.

The fleet (fleet.py) keeps what the proxy knows of each Ollama server; at decision time it
hands ``choose`` one ``UpstreamView`` per upstream. ``choose`` does no I/O and keeps no state:
the clock and the random source are parameters, so a test or a simulation replays it exactly.
Every model name in a view is spelt by ``model_key`` (as Ollama compares names).

Rule 1, eligibility. An upstream is eligible for a model when it is healthy, its
``/api/tags`` lists the model, and it is not in ``exclude`` (already tried for this request).
Nobody lists the model: ``NotListed`` (the caller refreshes the tags once, then answers 404).
Only unhealthy upstreams list it: ``OnlyUnhealthy`` (503; ``retry_after``, whole seconds >= 1,
until the first of them is probed again, ``DEFAULT_RETRY_AFTER`` when none says). Upstreams list
it and are healthy, but all were tried: ``AllTried`` (the caller answers with the last failure).
The three refusals are judged in that order, on the whole fleet, before ``exclude``.

Rule 2, cost: the expected seconds until the request holds a slot with its model in memory,
``cost = load + slot wait`` (plus an eviction charge, rule 3).

- State of the model on an upstream: *hot* when it is in ``loaded`` and not expired at ``now``
  (an ``expires_at`` of None counts as hot); else *loading* when the proxy has a request for it
  there that was sent while cold and has not answered; else *cold*.
- load: 0 when hot; when loading, the load estimate minus the time since the first cold
  request was sent (never below 0); when cold, the load estimate. The load estimate is the
  upstream's ``load_seconds`` for the model, else the mean of the other upstreams' (same
  weights, similar disks), else ``DEFAULT_LOAD_SECONDS``.
- slot wait: with ``n`` of the proxy's requests in flight for the model and ``s`` slots
  (``slots`` None counts as 1), a new request waits for ``n - s + 1`` slot releases when
  ``n >= s``, and a slot frees every ``S / s`` seconds on average (S, the mean service time:
  ``service_seconds``, else the other upstreams' mean, else ``DEFAULT_SERVICE_SECONDS``). So the
  wait is ``max(0, n - s + 1) * S / s``: 0 with a free slot, ``S / s`` when every slot is busy.

Rule 3, evictions. An upstream is *full* at ``max_loaded`` resident models (hot or loading; 0
means unknown, never full). A cold load on a full upstream evicts one, as Ollama does: an idle
one, else it waits for a busy one to go idle.

- Every resident model busy: that upstream is not a candidate for a cold load while another
  eligible upstream is. Ollama would make the request wait for a victim to go idle, holding
  every request queued behind it meanwhile, then evict a model in use. When every candidate is
  such an upstream, the cost adds the time for the first victim to drain.
- An idle victim (the resident model that expires first: Ollama's least recently used) that no
  other healthy upstream holds hot: the cost adds the victim's load estimate, since its next
  request pays that load. (Not in the fleet issue: without it, a queue that spills over onto a
  full upstream evicts a model held nowhere else, whose next request spills over in turn; in
  the simulation of docs/routing.md it cuts loads by a third to a half.)

Rule 4, the pick. Take the cheapest candidate. Candidates whose cost is within
``TIE_FRACTION`` (10%) of the cheapest, or within ``TIE_SECONDS`` (50 ms) of it, whichever is
wider, are a near-tie: among them, the fewest requests in flight in total (all models) wins,
then a draw from ``rng``, so that several proxies in front of one fleet do not herd onto the
same server. Candidates keep the fleet's order before the draw, so a seeded ``rng`` replays.

The decision label (``routing_decisions_total``) is the model's state on the chosen upstream:
``hot`` (a free slot), ``queued_hot`` (hot, every slot taken), ``loading`` or ``cold``; or
``only`` when exactly one upstream was eligible. ``retry`` and ``pinned`` are the caller's.
"""

from __future__ import annotations

import enum
import functools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

from ..ollama import canonical_model

__all__ = [
    "DEFAULT_LOAD_SECONDS",
    "DEFAULT_RETRY_AFTER",
    "DEFAULT_SERVICE_SECONDS",
    "TIE_FRACTION",
    "TIE_SECONDS",
    "AllTried",
    "Choice",
    "Decision",
    "NotListed",
    "OnlyUnhealthy",
    "Result",
    "UpstreamView",
    "choose",
    "expected_victim",
    "model_key",
]

#: Seconds a cold load is expected to take before any upstream has reported one for the model.
DEFAULT_LOAD_SECONDS: Final = 10.0
#: Seconds a request is expected to hold a slot before any has completed for the model.
DEFAULT_SERVICE_SECONDS: Final = 2.0
#: A near-tie (rule 4): within this fraction of the cheapest cost ...
TIE_FRACTION: Final = 0.10
#: ... or within this many seconds of it, whichever is wider.
TIE_SECONDS: Final = 0.05
#: Retry-After of OnlyUnhealthy when no unhealthy upstream knows when it probes next.
DEFAULT_RETRY_AFTER: Final = 5


@functools.lru_cache(maxsize=1024)  # called with the same few names on every request
def model_key(name: str) -> str:
    """A model name spelt as Ollama compares names: ``x`` is ``x:latest``, case-insensitive.

    >>> model_key("Llama3.2")
    'llama3.2:latest'
    >>> model_key("library/llama3.2")  # the default namespace, as Ollama reads it
    'llama3.2:latest'
    """
    key = canonical_model(name).casefold()
    return key.removeprefix("library/") if key.count("/") == 1 else key


class Decision(enum.Enum):
    """The ``decision`` label of ``routing_decisions_total`` that ``choose`` can give."""

    HOT = "hot"  # loaded there, a slot free
    QUEUED_HOT = "queued_hot"  # loaded there, every slot taken
    LOADING = "loading"  # a cold request for it there has not answered yet
    COLD = "cold"  # this request makes it load
    ONLY = "only"  # one eligible upstream: no choice was made


# Not frozen: a frozen dataclass sets each field through object.__setattr__, and these are
# built on every request. Nothing changes them once built (the router only reads).
@dataclass(slots=True)
class UpstreamView:
    """What the router knows of one upstream at decision time. Model names by ``model_key``."""

    name: str
    #: Answered its last poll, and its breaker is closed.
    healthy: bool
    #: What its /api/tags lists.
    models: frozenset[str]
    #: Models in memory there (last /api/ps, or a 2xx since) -> expires_at, Unix seconds
    #: (None: no expiry known, counts as hot).
    loaded: Mapping[str, float | None]
    #: Models the proxy sent a request for while cold, not answered yet -> when the first such
    #: request was sent (Unix seconds).
    loading: Mapping[str, float]
    #: The proxy's own requests in flight there, per model (queued in Ollama included).
    in_flight: Mapping[str, int]
    #: Parallel slots per model (its OLLAMA_NUM_PARALLEL); None: unknown, estimated as 1.
    slots: int | None
    #: Models it holds at once (its OLLAMA_MAX_LOADED_MODELS); 0: unknown, never full.
    max_loaded: int
    #: Moving average of the seconds a request holds a slot (prompt_eval + eval durations).
    service_seconds: Mapping[str, float]
    #: Moving average of the load_duration reported by requests sent while cold, seconds.
    load_seconds: Mapping[str, float]
    #: When the breaker or the poller next asks it (Unix seconds), if known: the Retry-After
    #: of OnlyUnhealthy.
    next_probe: float | None = None


@dataclass(slots=True)
class Choice:
    """Send the request to ``upstream``."""

    upstream: str
    #: The routing_decisions_total label.
    decision: Decision
    #: The model's state there (never ONLY): LOADING or COLD means the caller marks it loading.
    state: Decision
    #: Expected seconds until the request holds a slot there (rule 2).
    cost: float


@dataclass(frozen=True, slots=True)
class NotListed:
    """No upstream lists the model: refresh the tags once, then answer 404."""

    status: ClassVar[int] = 404
    model: str


@dataclass(frozen=True, slots=True)
class OnlyUnhealthy:
    """Only unhealthy upstreams list the model: answer 503 with ``Retry-After``."""

    status: ClassVar[int] = 503
    model: str
    upstreams: tuple[str, ...]
    #: Whole seconds, >= 1: until the first of them is asked again.
    retry_after: int


@dataclass(frozen=True, slots=True)
class AllTried:
    """Every healthy upstream that lists the model is in ``exclude``: answer the last failure."""

    model: str
    tried: tuple[str, ...]


Result = Choice | NotListed | OnlyUnhealthy | AllTried


def choose(
    model: str,
    fleet: Sequence[UpstreamView],
    now: float,
    rng: random.Random,
    exclude: frozenset[str] = frozenset(),
) -> Result:
    """Where to send a request for ``model`` (any spelling), by the rules of this module."""
    key = model_key(model)
    # One pass over the fleet: eligibility (rule 1) and each eligible upstream's cost, as
    # (cost, state, blocked, view). A hot one (the steady state) is scored inline, without
    # the defaults that only a missing average or a load needs: those are worked out once,
    # the first time a candidate needs them (the same values either way). Loops rather than
    # comprehensions: each of those is a function call of its own, on every request.
    scored: list[tuple[float, Decision, bool, UpstreamView]] = []
    defaults: _Defaults | None = None
    blocked = free = False
    best = best_free = 0.0  # the least cost, of all and of those not blocked (rule 3)
    for view in fleet:
        if key not in view.models or not view.healthy or (exclude and view.name in exclude):
            continue
        slots = view.slots or 1
        busy = view.in_flight.get(key, 0)
        queued = busy - slots + 1
        wait = 0.0
        if queued > 0:
            service = view.service_seconds.get(key)
            if service is None:
                defaults = defaults or _Defaults(fleet, _listing(fleet, key), key)
                service = defaults.service
            wait = queued * service / slots
        expires = view.loaded.get(key, _NOT_LOADED)
        if expires is None or expires > now:
            entry = (wait, _HOT if busy < slots else _QUEUED_HOT, False, view)
        else:
            defaults = defaults or _Defaults(fleet, _listing(fleet, key), key)
            entry = (*_not_hot(view, key, now, wait, defaults), view)
        cost = entry[0]
        if not scored or cost < best:
            best = cost
        if entry[2]:
            blocked = True
        elif not free or cost < best_free:
            best_free, free = cost, True
        scored.append(entry)
    if not scored:
        return _refusal(key, fleet, now)
    if len(scored) == 1:  # one eligible upstream: no choice to make
        cost, state, _, view = scored[0]
        return Choice(view.name, Decision.ONLY, state, cost)
    candidates = scored
    if blocked and free:  # rule 3: those not blocked, when there are any
        candidates = [entry for entry in scored if not entry[2]]
        best = best_free

    margin = TIE_FRACTION * best
    if margin < TIE_SECONDS:
        margin = TIE_SECONDS
    limit = best + margin
    # The near-tie, and among it those with the fewest requests in flight in total, in order.
    near: list[tuple[float, Decision, bool, UpstreamView]] = []
    fewest = 0
    for entry in candidates:
        if entry[0] <= limit:
            total = sum(entry[3].in_flight.values())
            if not near or total < fewest:
                near = [entry]
                fewest = total
            elif total == fewest:
                near.append(entry)
    cost, state, _, view = near[0] if len(near) == 1 else rng.choice(near)
    return Choice(view.name, state, state, cost)


def _listing(fleet: Sequence[UpstreamView], key: str) -> list[UpstreamView]:
    return [view for view in fleet if key in view.models]


def _refusal(
    key: str, fleet: Sequence[UpstreamView], now: float
) -> NotListed | OnlyUnhealthy | AllTried:
    """Why no upstream is eligible (rule 1, judged in this order on the whole fleet)."""
    listing = _listing(fleet, key)
    if not listing:
        return NotListed(key)
    healthy = [view for view in listing if view.healthy]
    if not healthy:
        return OnlyUnhealthy(key, tuple(v.name for v in listing), _retry_after(listing, now))
    return AllTried(key, tuple(view.name for view in healthy))


_HOT: Final = Decision.HOT
_QUEUED_HOT: Final = Decision.QUEUED_HOT

#: The expiry of a model not in ``loaded``: never hot (None there means "no expiry known").
_NOT_LOADED: Final = -math.inf


class _Defaults:
    """What scoring a candidate without a model's own averages, or a cold one, needs: the
    other upstreams' mean load and service times, and where an evicted model may stay hot."""

    __slots__ = ("live", "load", "service")

    def __init__(
        self, fleet: Sequence[UpstreamView], listing: Sequence[UpstreamView], key: str
    ) -> None:
        self.load = _mean([view.load_seconds for view in listing], key, DEFAULT_LOAD_SECONDS)
        self.service = _mean(
            [view.service_seconds for view in listing], key, DEFAULT_SERVICE_SECONDS
        )
        self.live = [view for view in fleet if view.healthy]


def _not_hot(
    view: UpstreamView, key: str, now: float, wait: float, defaults: _Defaults
) -> tuple[float, Decision, bool]:
    """(cost, state, blocked) of an upstream where the model is not hot (rules 2 and 3;
    ``blocked``: a cold load there would wait for a model in use to go idle)."""
    load = view.load_seconds.get(key, defaults.load)
    started = view.loading.get(key)
    if started is not None:
        return max(0.0, load - (now - started)) + wait, Decision.LOADING, False
    victim, drain = _victim(view, now)
    if drain is not None:
        return drain + load + wait, Decision.COLD, True
    charge = 0.0
    if victim is not None and not any(
        other is not view and _holds(other, victim, now) for other in defaults.live
    ):
        charge = view.load_seconds.get(victim, DEFAULT_LOAD_SECONDS)
    return load + wait + charge, Decision.COLD, False


def expected_victim(view: UpstreamView, now: float) -> str | None:
    """The model a cold load on ``view`` makes Ollama unload at once, as rule 3 predicts it: when
    it is full, its idle model that expires first (None: not full, or every model busy).

    The fleet drops it from its ``loaded`` when it sends a cold request there, until the next
    /api/ps says otherwise, so that the next decision does not count on a model already gone.
    """
    return _victim(view, now)[0]


def _is_hot(expires_at: float | None, now: float) -> bool:
    return expires_at is None or expires_at > now


def _holds(view: UpstreamView, key: str, now: float) -> bool:
    return key in view.loaded and _is_hot(view.loaded[key], now)


def _victim(view: UpstreamView, now: float) -> tuple[str | None, float | None]:
    """(victim, drain) of a cold load there: (None, None) when it is not full; (the idle model
    that expires first, None); or, every resident model busy (rule 3), (None, about the
    seconds until the first of them has finished the requests it holds)."""
    if view.max_loaded <= 0:
        return None, None
    hot = {key: expires for key, expires in view.loaded.items() if _is_hot(expires, now)}
    resident = hot.keys() | view.loading.keys()
    if len(resident) < view.max_loaded:
        return None, None
    idle = [
        (math.inf if expires is None else expires, key)
        for key, expires in hot.items()
        if view.in_flight.get(key, 0) <= 0 and key not in view.loading
    ]
    if idle:
        return min(idle)[1], None
    slots = view.slots or 1
    drain = min(
        max(view.in_flight.get(key, 0), 1)
        * view.service_seconds.get(key, DEFAULT_SERVICE_SECONDS)
        / slots
        for key in resident
    )
    return None, drain


def _mean(averages: Sequence[Mapping[str, float]], key: str, default: float) -> float:
    """The mean of the upstreams' averages for ``key`` (those that have one), else ``default``."""
    known = [average[key] for average in averages if key in average]
    return sum(known) / len(known) if known else default


def _retry_after(views: Sequence[UpstreamView], now: float) -> int:
    probes = [view.next_probe for view in views if view.next_probe is not None]
    if not probes:
        return DEFAULT_RETRY_AFTER
    return max(1, math.ceil(min(probes) - now))

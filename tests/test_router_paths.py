"""The router's short cuts agree with the plain reading of its rules.

``choose`` scores hot candidates without the cost model's defaults and works those out only
when a candidate needs them; ``Fleet`` keeps each node's view and rebuilds it only when it
changed. Both are checked here against a straightforward version on random inputs: the
reference below computes every default, list and estimate for every candidate, as the rules
in router.py read, and the fresh view is built from the node's fields every time.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from ollama_meter.fleet_settings import UpstreamSettings
from ollama_meter.gateway.fleet import Fleet, Node
from ollama_meter.gateway.router import (
    DEFAULT_LOAD_SECONDS,
    DEFAULT_SERVICE_SECONDS,
    TIE_FRACTION,
    TIE_SECONDS,
    AllTried,
    Choice,
    Decision,
    NotListed,
    OnlyUnhealthy,
    Result,
    UpstreamView,
    choose,
    expected_victim,
    model_key,
)

from .test_router import MODELS, NAMES, NOW, fleets


def _hot(view: UpstreamView, key: str, now: float) -> bool:
    if key not in view.loaded:
        return False
    expires = view.loaded[key]
    return expires is None or expires > now


def _mean(averages: Sequence[Mapping[str, float]], key: str, default: float) -> float:
    known = [average[key] for average in averages if key in average]
    return sum(known) / len(known) if known else default


def reference(
    key: str,
    fleet: Sequence[UpstreamView],
    now: float,
    rng: random.Random,
    exclude: frozenset[str] = frozenset(),
) -> tuple[str, Decision, Decision, float] | None:
    """Rules 2-4 with every default worked out up front (None: no eligible upstream)."""
    listing = [view for view in fleet if key in view.models]
    eligible = [view for view in listing if view.healthy and view.name not in exclude]
    if not eligible:
        return None
    load_default = _mean([v.load_seconds for v in listing], key, DEFAULT_LOAD_SECONDS)
    service_default = _mean([v.service_seconds for v in listing], key, DEFAULT_SERVICE_SECONDS)
    live = [view for view in fleet if view.healthy]
    scored: list[tuple[float, Decision, bool, UpstreamView]] = []
    for view in eligible:
        slots = view.slots or 1
        busy = view.in_flight.get(key, 0)
        service = view.service_seconds.get(key, service_default)
        wait = max(0, busy - slots + 1) * service / slots
        load = view.load_seconds.get(key, load_default)
        victim = expected_victim(view, now)
        if _hot(view, key, now):
            state = Decision.HOT if busy < slots else Decision.QUEUED_HOT
            scored.append((wait, state, False, view))
        elif key in view.loading:
            remaining = max(0.0, load - (now - view.loading[key]))
            scored.append((remaining + wait, Decision.LOADING, False, view))
        elif victim is None and _all_busy_and_full(view, now):
            drain = min(
                max(view.in_flight.get(m, 0), 1)
                * view.service_seconds.get(m, DEFAULT_SERVICE_SECONDS)
                / slots
                for m in _resident(view, now)
            )
            scored.append((drain + load + wait, Decision.COLD, True, view))
        else:
            charge = 0.0
            if victim is not None and not any(
                other is not view and _hot(other, victim, now) for other in live
            ):
                charge = view.load_seconds.get(victim, DEFAULT_LOAD_SECONDS)
            scored.append((load + wait + charge, Decision.COLD, False, view))
    candidates = [entry for entry in scored if not entry[2]] or scored
    best = min(entry[0] for entry in candidates)
    margin = max(TIE_SECONDS, TIE_FRACTION * best)
    near = [entry for entry in candidates if entry[0] <= best + margin]
    if len(near) > 1:
        fewest = min(sum(entry[3].in_flight.values()) for entry in near)
        near = [entry for entry in near if sum(entry[3].in_flight.values()) == fewest]
    cost, state, _, view = near[0] if len(near) == 1 else rng.choice(near)
    return view.name, Decision.ONLY if len(eligible) == 1 else state, state, cost


def _resident(view: UpstreamView, now: float) -> set[str]:
    return {m for m in view.loaded if _hot(view, m, now)} | set(view.loading)


def _all_busy_and_full(view: UpstreamView, now: float) -> bool:
    return 0 < view.max_loaded <= len(_resident(view, now))


@settings(max_examples=600, deadline=None)
@given(fleet=fleets(), model=st.sampled_from(MODELS), seed=st.integers(0, 2**32))
def test_choose_agrees_with_the_plain_reading(
    fleet: list[UpstreamView], model: str, seed: int
) -> None:
    key = model_key(model)
    result: Result = choose(key, fleet, NOW, random.Random(seed))
    expected = reference(key, fleet, NOW, random.Random(seed))
    if expected is None:
        assert not isinstance(result, Choice)
        return
    assert isinstance(result, Choice)
    name, decision, state, cost = expected
    assert (result.upstream, result.decision, result.state) == (name, decision, state)
    assert math.isclose(result.cost, cost, rel_tol=1e-12, abs_tol=1e-12)


@settings(max_examples=600, deadline=None)
@given(
    fleet=fleets(),
    model=st.sampled_from(MODELS),
    seed=st.integers(0, 2**32),
    exclude=st.frozensets(st.sampled_from(NAMES)),
)
def test_a_retry_agrees_with_the_plain_reading(
    fleet: list[UpstreamView], model: str, seed: int, exclude: frozenset[str]
) -> None:
    """Upstreams already tried are not candidates, yet the defaults still count them; with
    none eligible, the refusal is judged on the whole fleet (rule 1's order)."""
    key = model_key(model)
    result: Result = choose(key, fleet, NOW, random.Random(seed), exclude)
    expected = reference(key, fleet, NOW, random.Random(seed), exclude)
    if expected is None:
        listing = [view for view in fleet if key in view.models]
        healthy = [view for view in listing if view.healthy]
        if not listing:
            assert result == NotListed(key)
        elif not healthy:
            assert isinstance(result, OnlyUnhealthy)
            assert result.upstreams == tuple(view.name for view in listing)
        else:
            assert result == AllTried(key, tuple(view.name for view in healthy))
        return
    assert isinstance(result, Choice)
    name, decision, state, cost = expected
    assert (result.upstream, result.decision, result.state) == (name, decision, state)
    assert math.isclose(result.cost, cost, rel_tol=1e-12, abs_tol=1e-12)


@settings(max_examples=600, deadline=None)
@given(fleet=fleets(), model=st.sampled_from(MODELS), seed=st.integers(0, 2**32))
def test_every_model_hot_takes_the_same_choices(
    fleet: list[UpstreamView], model: str, seed: int
) -> None:
    """The steady state (hot everywhere it is listed), where no default is worked out."""
    key = model_key(model)
    for view in fleet:
        view.loaded = {**view.loaded, key: NOW + 60.0}
        view.loading = {m: t for m, t in view.loading.items() if m != key}
    result = choose(key, fleet, NOW, random.Random(seed))
    expected = reference(key, fleet, NOW, random.Random(seed))
    if expected is None:
        assert not isinstance(result, Choice)
        return
    assert isinstance(result, Choice)
    assert (result.upstream, result.decision, result.state) == expected[:3]
    assert result.state in (Decision.HOT, Decision.QUEUED_HOT)


def fresh(node: Node, now: float) -> UpstreamView:
    """A node's view built from its fields, as if nothing were kept."""
    loaded = {k: v for k, v in node.loaded.items() if k not in node.loading}
    return UpstreamView(
        name=node.name,
        healthy=node.healthy(now),
        models=node.models,
        loaded=loaded,
        loading=dict(node.loading),
        in_flight=dict(node.in_flight_by),
        slots=node.settings.slots,
        max_loaded=node.settings.max_loaded,
        service_seconds=dict(node.service),
        load_seconds=dict(node.load),
        next_probe=node.breaker.retry_at if node.breaker.is_open else None,
    )


KEYS = tuple(model_key(m) for m in MODELS)
STEPS = st.lists(
    st.tuples(
        st.sampled_from(("send", "answer", "end", "ps", "tags", "fail", "ok", "tick")),
        st.integers(0, 2),
        st.sampled_from(KEYS),
        st.sampled_from((200, 404, 500)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(steps=STEPS, max_loaded=st.integers(0, 2))
def test_a_kept_view_is_the_fresh_one(
    steps: list[tuple[str, int, str, int]], max_loaded: int
) -> None:
    """After any sequence of traffic, polls and breaker changes, each node's view is what
    building it anew gives, and the router decides the same on both."""
    clock = [time.time()]
    upstreams = [
        UpstreamSettings(name, URL(f"http://127.0.0.1:{11434 + n}"), max_loaded=max_loaded)
        for n, name in enumerate(NAMES[:3])
    ]
    fleet = Fleet(upstreams, probe_timeout=1.0, clock=lambda: clock[0])
    sent: list[tuple[Node, str, bool]] = []
    for node in fleet.nodes:
        node.answered = True
        node.models = frozenset(KEYS)
    for action, index, key, status in steps:
        node = fleet.nodes[index]
        now = clock[0]
        if action == "send":
            sent.append((node, key, fleet.sent(node, key)))
        elif action == "answer" and sent:
            node, key, cold = sent[-1]
            if cold:
                fleet.answered(node, key, status)
        elif action == "end" and sent:
            node, key, cold = sent.pop(0)
            fleet.ended(node, key, cold=cold, loading=False, status=status, usage=None,
                        transport_failed=status == 500)  # fmt: skip
        elif action == "ps":
            node.loaded = {key: now + 30.0}
        elif action == "tags":
            node.models = node.models - {key} if key in node.models else node.models | {key}
        elif action == "fail":  # enough to open it
            for _ in range(3):
                node.breaker.failure(now)
        elif action == "ok":
            node.breaker.success()
        else:
            clock[0] += 20.0
        now = clock[0]
        kept = fleet.views()
        assert kept == [fresh(node, now) for node in fleet.nodes]
        for model in KEYS:
            a = choose(model, kept, now, random.Random(3))
            b = choose(model, [fresh(node, now) for node in fleet.nodes], now, random.Random(3))
            assert a == b

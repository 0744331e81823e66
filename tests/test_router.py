"""The router, pure: a decision table of the routing rules, then properties over random fleets.

Each table row is a small fleet at one instant. ``up`` builds an upstream the way the fleet's
snapshot will: model names by ``model_key``, times in Unix seconds around ``NOW``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ollama_meter.gateway.router import (
    DEFAULT_LOAD_SECONDS,
    DEFAULT_RETRY_AFTER,
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

NOW = 1_700_000_000.0
LATER = NOW + 300.0  # an expires_at five minutes away: Ollama's default keep_alive
M, OTHER = "llama3.2:latest", "qwen3:8b"


def up(
    name: str,
    *,
    models: tuple[str, ...] = (M,),
    healthy: bool = True,
    loaded: Mapping[str, float | None] | None = None,
    loading: Mapping[str, float] | None = None,
    in_flight: Mapping[str, int] | None = None,
    slots: int | None = 1,
    max_loaded: int = 0,
    service: Mapping[str, float] | None = None,
    load: Mapping[str, float] | None = None,
    next_probe: float | None = None,
) -> UpstreamView:
    return UpstreamView(
        name=name,
        healthy=healthy,
        models=frozenset(models),
        loaded=loaded or {},
        loading=loading or {},
        in_flight=in_flight or {},
        slots=slots,
        max_loaded=max_loaded,
        service_seconds=service or {},
        load_seconds=load or {},
        next_probe=next_probe,
    )


def pick(*fleet: UpstreamView, seed: int = 0, exclude: frozenset[str] = frozenset()) -> Choice:
    result = choose(M, fleet, NOW, random.Random(seed), exclude)
    assert isinstance(result, Choice), result
    return result


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("llama3.2", "llama3.2:latest"),
        ("Llama3.2:LATEST", "llama3.2:latest"),
        ("registry.ollama.ai/library/llama3.2", "llama3.2:latest"),
        ("qwen3:8b", "qwen3:8b"),
        ("hf.co/Org/Model-GGUF:Q4_K_M", "hf.co/org/model-gguf:q4_k_m"),
        (" phi4 ", "phi4:latest"),
    ],
)
def test_model_key_spells_names_as_ollama_compares_them(name: str, key: str) -> None:
    assert model_key(name) == key
    assert model_key(key) == key


def test_any_spelling_of_the_model_routes() -> None:
    result = choose("LLAMA3.2", [up("a")], NOW, random.Random(0))
    assert isinstance(result, Choice)
    assert result.upstream == "a"


# --- rule 1: eligibility and refusals ------------------------------------------------------


def test_not_listed_anywhere() -> None:
    fleet = [up("a", models=(OTHER,)), up("b", models=(OTHER,), healthy=False)]
    assert choose(M, fleet, NOW, random.Random(0)) == NotListed(M)
    assert NotListed.status == 404


def test_only_unhealthy_upstreams_list_it() -> None:
    fleet = [
        up("a", healthy=False, next_probe=NOW + 7.2),
        up("b", healthy=False, next_probe=NOW + 3.1),
        up("c", models=(OTHER,)),  # healthy, but without the model
    ]
    result = choose(M, fleet, NOW, random.Random(0))
    assert result == OnlyUnhealthy(M, ("a", "b"), retry_after=4)  # ceil(3.1)
    assert OnlyUnhealthy.status == 503


@pytest.mark.parametrize(
    ("next_probe", "retry_after"),
    [(None, DEFAULT_RETRY_AFTER), (NOW - 10.0, 1), (NOW, 1), (NOW + 0.2, 1), (NOW + 2.0, 2)],
)
def test_retry_after_is_whole_seconds_at_least_one(
    next_probe: float | None, retry_after: int
) -> None:
    result = choose(M, [up("a", healthy=False, next_probe=next_probe)], NOW, random.Random(0))
    assert isinstance(result, OnlyUnhealthy)
    assert result.retry_after == retry_after


def test_never_an_upstream_without_the_model_or_unhealthy() -> None:
    hot_elsewhere = {OTHER: LATER}
    fleet = [
        up("lacks", models=(OTHER,), loaded=hot_elsewhere),
        up("sick", healthy=False, loaded={M: LATER}),
        up("cold"),
    ]
    choice = pick(*fleet)
    assert choice.upstream == "cold"
    assert choice.decision is Decision.ONLY  # the one eligible
    assert choice.state is Decision.COLD


def test_exclude_skips_upstreams_already_tried() -> None:
    fleet = [up("a", loaded={M: LATER}), up("b", loaded={M: LATER}), up("c")]
    assert pick(*fleet, exclude=frozenset({"a"})).upstream == "b"
    choice = pick(*fleet, exclude=frozenset({"a", "b"}))
    assert (choice.upstream, choice.decision, choice.state) == ("c", Decision.ONLY, Decision.COLD)
    result = choose(M, fleet, NOW, random.Random(0), frozenset({"a", "b", "c"}))
    assert result == AllTried(M, ("a", "b", "c"))


def test_refusals_are_judged_before_exclude() -> None:
    fleet = [up("a", healthy=False, next_probe=NOW + 2.0)]
    result = choose(M, fleet, NOW, random.Random(0), frozenset({"a"}))
    assert isinstance(result, OnlyUnhealthy)


# --- rule 2: cost --------------------------------------------------------------------------


def test_hot_and_free_beats_cold() -> None:
    choice = pick(up("cold", load={M: 0.5}), up("hot", loaded={M: LATER}, slots=4))
    assert (choice.upstream, choice.decision, choice.cost) == ("hot", Decision.HOT, 0.0)


@pytest.mark.parametrize(
    ("queued", "winner", "decision", "cost"),
    [
        # slots 2, service 4 s: a slot frees every 2 s; n in flight -> (n - 2 + 1) * 2 s of wait
        (2, "hot", Decision.QUEUED_HOT, 2.0),
        (3, "hot", Decision.QUEUED_HOT, 4.0),
        (4, "cold", Decision.COLD, 5.0),  # the queue (6 s) now costs more than the load (5 s)
        (9, "cold", Decision.COLD, 5.0),
    ],
)
def test_hot_with_a_long_queue_loses_to_cold_once_the_queue_costs_more_than_a_load(
    queued: int, winner: str, decision: Decision, cost: float
) -> None:
    hot = up("hot", loaded={M: LATER}, in_flight={M: queued}, slots=2, service={M: 4.0})
    cold = up("cold", slots=2, load={M: 5.0}, service={M: 4.0})
    choice = pick(hot, cold)
    assert (choice.upstream, choice.decision, choice.cost) == (winner, decision, cost)


def test_a_free_slot_is_hot_and_a_full_one_queued_hot() -> None:
    fleet = [up("a", loaded={M: LATER}, in_flight={M: 3}, slots=4, service={M: 1.0})]
    assert pick(*fleet).state is Decision.HOT
    fleet = [up("a", loaded={M: LATER}, in_flight={M: 4}, slots=4, service={M: 1.0})]
    choice = pick(*fleet)
    assert (choice.state, choice.cost) == (Decision.QUEUED_HOT, 0.25)  # S / s


def test_unknown_slots_count_as_one() -> None:
    fleet = [up("a", loaded={M: LATER}, in_flight={M: 2}, slots=None, service={M: 3.0})]
    choice = pick(*fleet)
    assert (choice.state, choice.cost) == (Decision.QUEUED_HOT, 6.0)


@pytest.mark.parametrize(
    ("expires_at", "state"),
    [
        (None, Decision.HOT),
        (NOW + 0.001, Decision.HOT),
        (NOW, Decision.COLD),
        (NOW - 1, Decision.COLD),
    ],
)
def test_an_expired_model_is_cold(expires_at: float | None, state: Decision) -> None:
    assert pick(up("a", loaded={M: expires_at})).state is state


def test_an_expired_model_loses_to_a_hot_one() -> None:
    choice = pick(up("stale", loaded={M: NOW - 1}), up("fresh", loaded={M: NOW + 1}))
    assert (choice.upstream, choice.decision) == ("fresh", Decision.HOT)


def test_loading_beats_cold_when_its_remaining_time_is_lower() -> None:
    # 8 s into a 10 s load: 2 s left, against a 5 s cold load elsewhere
    loading = up("loading", loading={M: NOW - 8.0}, in_flight={M: 1}, slots=4, load={M: 10.0})
    cold = up("cold", load={M: 5.0})
    choice = pick(loading, cold)
    assert (choice.upstream, choice.decision, choice.cost) == ("loading", Decision.LOADING, 2.0)


def test_cold_beats_loading_when_the_load_has_far_to_go() -> None:
    loading = up("loading", loading={M: NOW - 1.0}, in_flight={M: 1}, slots=4, load={M: 20.0})
    cold = up("cold", load={M: 5.0})
    assert pick(loading, cold).upstream == "cold"


def test_a_load_past_its_estimate_is_due_now() -> None:
    loading = up("a", loading={M: NOW - 30.0}, in_flight={M: 1}, slots=2, load={M: 10.0})
    assert pick(loading).cost == 0.0


def test_requests_behind_a_load_wait_for_slots_too() -> None:
    # 3 requests already wait on the load, 1 slot of 2 s: 3 slot releases after 4 s of load
    loading = up("a", loading={M: NOW - 1.0}, in_flight={M: 3}, load={M: 5.0}, service={M: 2.0})
    assert pick(loading).cost == 4.0 + 6.0


def test_a_load_time_learnt_elsewhere_beats_the_default() -> None:
    learnt = up("learnt", loaded={OTHER: LATER}, load={M: 3.0})
    fresh = up("fresh")
    assert pick(fresh).cost == DEFAULT_LOAD_SECONDS
    assert pick(fresh, up("x", healthy=False, load={M: 3.0})).cost == 3.0
    assert pick(learnt, fresh).cost == 3.0


# --- rule 3: no eviction of a model in use -------------------------------------------------


def test_a_busy_victim_at_max_loaded_excludes_its_upstream_for_cold_loads() -> None:
    # "full" would be cheaper (fast disk), but loading there evicts a model in use
    full = up(
        "full",
        loaded={OTHER: LATER},
        in_flight={OTHER: 1},
        max_loaded=1,
        load={M: 1.0},
        service={OTHER: 0.5},
    )
    roomy = up("roomy", max_loaded=1, load={M: 8.0})
    choice = pick(full, roomy)
    assert (choice.upstream, choice.decision) == ("roomy", Decision.COLD)


def test_a_busy_victim_counts_with_loading_models() -> None:
    full = up(
        "full",
        loaded={OTHER: LATER},
        loading={"phi4:latest": NOW},
        max_loaded=2,
        in_flight={OTHER: 2, "phi4:latest": 1},
        load={M: 1.0},
    )
    assert pick(full, up("roomy", load={M: 8.0})).upstream == "roomy"


def test_an_idle_victim_does_not_exclude() -> None:
    # OTHER is idle on "full" and hot on "spare" too: evicting it costs nothing more
    full = up("full", loaded={OTHER: LATER}, max_loaded=1, load={M: 1.0})
    spare = up("spare", models=(OTHER,), loaded={OTHER: LATER})
    choice = pick(full, spare, up("roomy", max_loaded=1, load={M: 8.0}))
    assert (choice.upstream, choice.cost) == ("full", 1.0)


def test_evicting_the_only_copy_of_an_idle_model_is_charged_its_load() -> None:
    full = up("full", loaded={OTHER: LATER}, max_loaded=1, load={M: 1.0, OTHER: 4.0})
    assert pick(full).cost == 1.0 + 4.0
    assert pick(full, up("roomy", load={M: 4.5})).upstream == "roomy"
    assert pick(full, up("roomy", load={M: 6.0})).upstream == "full"
    # a copy on an unhealthy upstream does not count
    sick = up("sick", healthy=False, models=(OTHER,), loaded={OTHER: LATER})
    assert pick(full, sick).cost == 5.0


def test_the_victim_is_the_idle_model_that_expires_first() -> None:
    phi = "phi4:latest"
    full = up(
        "full",
        loaded={OTHER: NOW + 100, phi: NOW + 50, "busy:latest": NOW + 10},
        in_flight={"busy:latest": 1},
        max_loaded=3,
        load={M: 1.0, OTHER: 4.0, phi: 7.0},
    )
    assert pick(full).cost == 1.0 + 7.0  # phi4 goes; the busy model, though older, stays
    phi_elsewhere = up("other", models=(phi,), loaded={phi: None})
    assert pick(full, phi_elsewhere).cost == 1.0


def test_expected_victim() -> None:
    phi = "phi4:latest"
    loaded: dict[str, float | None] = {OTHER: NOW + 100, phi: NOW + 50}
    assert expected_victim(up("a", loaded=loaded, max_loaded=2), NOW) == phi
    assert expected_victim(up("a", loaded=loaded, max_loaded=3), NOW) is None  # room
    assert expected_victim(up("a", loaded=loaded, max_loaded=0), NOW) is None  # unknown
    busy = up("a", loaded=loaded, in_flight={phi: 1}, max_loaded=2)
    assert expected_victim(busy, NOW) == OTHER
    all_busy = up("a", loaded=loaded, in_flight={phi: 1, OTHER: 2}, max_loaded=2)
    assert expected_victim(all_busy, NOW) is None  # rule 3: Ollama waits, nothing goes at once
    loading = up("a", loaded={OTHER: None}, loading={phi: NOW}, in_flight={phi: 1}, max_loaded=2)
    assert expected_victim(loading, NOW) == OTHER


def test_a_queue_spills_over_onto_a_full_upstream_only_past_load_and_eviction() -> None:
    # Two models, two upstreams with max_loaded 1 (the fleet issue's end-to-end case): M is
    # hot on a (1 slot, 3 s per request), OTHER idle on b; loads take 5 s.
    def fleet(queued: int) -> tuple[UpstreamView, UpstreamView]:
        a = up("a", loaded={M: LATER}, in_flight={M: queued}, max_loaded=1, service={M: 3.0})
        b = up("b", loaded={OTHER: LATER}, max_loaded=1, load={M: 5.0, OTHER: 5.0})
        return a, b

    assert pick(*fleet(2)).upstream == "a"  # 6 s of queue: less than 5 s load + 5 s reload
    assert pick(*fleet(3)).upstream == "a"  # 9 s
    choice = pick(*fleet(4))  # 12 s
    assert (choice.upstream, choice.decision, choice.cost) == ("b", Decision.COLD, 10.0)


def test_expired_models_leave_room() -> None:
    full = up("full", loaded={OTHER: NOW - 1}, in_flight={OTHER: 1}, max_loaded=1, load={M: 1.0})
    assert pick(full, up("roomy", load={M: 8.0})).upstream == "full"


def test_unknown_max_loaded_is_never_full() -> None:
    busy = {OTHER: LATER, "phi4:latest": LATER}
    a = up("a", loaded=busy, in_flight={OTHER: 1, "phi4:latest": 1}, load={M: 1.0})
    assert pick(a, up("b", load={M: 8.0})).upstream == "a"


def test_rule_3_yields_when_every_upstream_is_full_and_busy() -> None:
    def full(name: str, busy: int) -> UpstreamView:
        return up(
            name,
            loaded={OTHER: LATER},
            in_flight={OTHER: busy},
            max_loaded=1,
            load={M: 5.0},
            service={OTHER: 2.0},
        )

    choice = pick(full("a", 3), full("b", 1))
    # b drains first: 1 request of 2 s, then the 5 s load
    assert (choice.upstream, choice.decision, choice.cost) == ("b", Decision.COLD, 7.0)


def test_a_hot_model_on_a_full_upstream_is_no_eviction() -> None:
    full = up(
        "full",
        loaded={M: LATER, OTHER: LATER},
        in_flight={M: 1, OTHER: 1},
        max_loaded=2,
        slots=2,
    )
    assert pick(full, up("roomy")).upstream == "full"


# --- rule 4: cheapest, near-ties by total in flight, then at random ------------------------


def test_ties_rotate_across_seeds() -> None:
    fleet = [up(name, loaded={M: LATER}, slots=2) for name in ("a", "b", "c")]
    chosen = [pick(*fleet, seed=seed).upstream for seed in range(60)]
    assert set(chosen) == {"a", "b", "c"}
    assert min(chosen.count(name) for name in "abc") >= 10


def test_a_seeded_rng_replays() -> None:
    fleet = [up(name) for name in ("a", "b", "c")]
    first = [pick(*fleet, seed=seed).upstream for seed in range(20)]
    assert first == [pick(*fleet, seed=seed).upstream for seed in range(20)]


def test_a_near_tie_goes_to_fewer_requests_in_flight_in_total() -> None:
    # cold 10 s against cold 10.9 s: within 10%; b carries less traffic in all
    a = up("a", loaded={OTHER: LATER}, in_flight={OTHER: 3}, load={M: 10.0})
    b = up("b", in_flight={"phi4:latest": 1}, load={M: 10.9})
    assert {pick(a, b, seed=seed).upstream for seed in range(20)} == {"b"}


@pytest.mark.parametrize(
    ("cheap", "dear", "tied"),
    [
        (10.0, 10.99, True),  # within 10%
        (10.0, 11.01, False),
        (0.0, 0.049, True),  # within 50 ms
        (0.0, 0.051, False),
        (0.3, 0.349, True),  # 50 ms is wider than 10% of 0.3 s
    ],
)
def test_near_tie_is_ten_percent_or_fifty_ms(cheap: float, dear: float, tied: bool) -> None:
    a = up("a", loaded={OTHER: LATER}, in_flight={OTHER: 1}, load={M: cheap})
    b = up("b", load={M: dear})  # fewer in flight: wins only when tied
    assert pick(a, b).upstream == ("b" if tied else "a")


# --- properties ----------------------------------------------------------------------------

MODELS = ("a:latest", "b:latest", "c:7b", "d:latest")
NAMES = ("u0", "u1", "u2", "u3", "u4")
T = TypeVar("T")


def some(values: st.SearchStrategy[T]) -> st.SearchStrategy[dict[str, T]]:
    """A mapping over a few of MODELS."""
    return st.dictionaries(st.sampled_from(MODELS), values, max_size=len(MODELS))


# Built once: building strategies inside a draw is most of the run time.
HEALTHY = st.sampled_from((True, True, True, False))
LISTS = st.lists(st.integers(0, 3), min_size=len(MODELS), max_size=len(MODELS))
LOADED = some(st.one_of(st.none(), st.floats(NOW - 600, NOW + 600)))
LOADING = some(st.floats(NOW - 120, NOW))
IN_FLIGHT = some(st.integers(0, 12))
SLOTS = st.one_of(st.none(), st.integers(1, 4))
MAX_LOADED = st.integers(0, 3)
SECONDS = some(st.floats(0.0, 120.0))
NEXT_PROBE = st.one_of(st.none(), st.floats(NOW - 60, NOW + 60))


@st.composite
def views(draw: st.DrawFn, name: str) -> UpstreamView:
    lists = draw(LISTS)  # most upstreams list most models, so most draws make a choice
    return UpstreamView(
        name=name,
        healthy=draw(HEALTHY),
        models=frozenset(m for m, listed in zip(MODELS, lists, strict=True) if listed),
        loaded=draw(LOADED),
        loading=draw(LOADING),
        in_flight=draw(IN_FLIGHT),
        slots=draw(SLOTS),
        max_loaded=draw(MAX_LOADED),
        service_seconds=draw(SECONDS),
        load_seconds=draw(SECONDS),
        next_probe=draw(NEXT_PROBE),
    )


@st.composite
def fleets(draw: st.DrawFn) -> list[UpstreamView]:
    size = draw(st.integers(0, len(NAMES)))
    return [draw(views(name)) for name in NAMES[:size]]


def _resident_all_busy(view: UpstreamView) -> bool:
    """At max_loaded, every resident model with requests in flight (rule 3), independently."""
    resident = {m for m, exp in view.loaded.items() if exp is None or exp > NOW} | set(view.loading)
    busy = all(view.in_flight.get(m, 0) > 0 or m in view.loading for m in resident)
    return 0 < view.max_loaded <= len(resident) and busy


def _solo(model: str, fleet: list[UpstreamView], name: str) -> Choice:
    """The choice when every upstream but ``name`` was already tried: its own cost."""
    others = frozenset(view.name for view in fleet if view.name != name)
    result = choose(model, fleet, NOW, random.Random(0), others)
    assert isinstance(result, Choice)
    return result


@settings(max_examples=400, deadline=None)
@given(
    fleet=fleets(),
    model=st.sampled_from((*MODELS, "A", "e:latest")),
    exclude=st.one_of(st.just(frozenset[str]()), st.frozensets(st.sampled_from(NAMES))),
    seed=st.integers(0, 2**32),
)
def test_random_fleets(
    fleet: list[UpstreamView], model: str, exclude: frozenset[str], seed: int
) -> None:
    key = model_key(model)
    result: Result = choose(model, fleet, NOW, random.Random(seed), exclude)
    listing = [view for view in fleet if key in view.models]
    healthy = [view for view in listing if view.healthy]
    eligible = [view for view in healthy if view.name not in exclude]

    assert isinstance(result, NotListed) == (not listing)
    assert isinstance(result, OnlyUnhealthy) == (bool(listing) and not healthy)
    assert isinstance(result, AllTried) == (bool(healthy) and not eligible)
    if isinstance(result, OnlyUnhealthy):
        assert result.retry_after >= 1
        assert set(result.upstreams) == {view.name for view in listing}
    if not isinstance(result, Choice):
        return

    chosen = next(view for view in fleet if view.name == result.upstream)
    assert key in chosen.models
    assert chosen.healthy
    assert chosen.name not in exclude
    assert math.isfinite(result.cost)
    assert result.cost >= 0.0
    assert (result.decision is Decision.ONLY) == (len(eligible) == 1)
    assert result.state is not Decision.ONLY

    # The reported cost is the upstream's own (it does not depend on the others).
    assert _solo(model, fleet, chosen.name).cost == result.cost
    # Rule 3: a cold load on a full upstream whose models are all busy only when every
    # eligible upstream would be one.
    if result.state is Decision.COLD and _resident_all_busy(chosen):
        for view in eligible:
            solo = _solo(model, fleet, view.name)
            assert solo.state is Decision.COLD
            assert _resident_all_busy(view)
    # Rule 4: no upstream where the model is hot or loading is cheaper beyond a near-tie.
    for view in eligible:
        solo = _solo(model, fleet, view.name)
        if solo.state is not Decision.COLD:
            margin = max(0.05, 0.10 * solo.cost)
            assert result.cost <= solo.cost + margin + 1e-9

"""Micro-benchmark of fleet routing: ``python bench/routing.py [--repeat R] [--json FILE]``.

Times what a fleet proxy adds to each request that names a model, on fleets of 3 and 20
upstreams that all list it and hold it loaded (the steady state of run.py ``--fleet``):

- the route step, ``Dispatch.place_now("POST", route_for("/api/generate"), "llama3.2",
  headers)`` (proxy.py calls it once a request, and awaits ``Dispatch.place`` only when it
  says the tags are to be refreshed first), and its parts: ``Fleet.views()`` (the
  snapshot), the pure ``router.choose(...)`` on that snapshot, ``model_key``;
- the bookkeeping around the upstream request: ``Fleet.sent`` + ``Fleet.count_decision``
  (proxy.py ``_send``) and the record step ``Dispatch.ended`` (proxy.py ``_record``), together
  (the fleet's counts stay where they are) and ``ended`` alone;
- ``Node.base`` (the upstream's address as text, computed for every request sent);
- the sum a request pays: place_now + sent + count_decision + ended;
- ``choose`` where it works harder: the model listed by one upstream of 20 only, and listed
  by all 20 but loaded on none, each full (``max_loaded`` 1) with an idle model to evict.

Every upstream has the proxy's requests in flight for the model (64 connections spread over
the fleet, as in run.py's scenario 2: 21-22 each on 3, 3-4 each on 20) and moving averages of
service and load times, as after a few requests. timeit loops sized to about 0.2 s, the cases
interleaved (every other pass reversed), median of ``--repeat`` (9), µs a call (bench/keys.py's
``measure``). Pin it to a core of its own: ``taskset -c 0 python bench/routing.py``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from keys import CLIENT_HEAD, head, measure, render
from yarl import URL

from ollama_meter.exchange import Exchange
from ollama_meter.fleet_settings import RoutingSettings, UpstreamSettings
from ollama_meter.gateway.dispatch import Dispatch, Target
from ollama_meter.gateway.fleet import Fleet
from ollama_meter.gateway.router import Choice, choose, model_key
from ollama_meter.ollama import Usage, route_for

MODEL = "llama3.2"
KEY = model_key(MODEL)  # llama3.2:latest
CONNECTIONS = 64
#: What the fake upstream reports for a small generate (bench/upstream.py GENERATE_BODY).
USAGE = Usage(34, 3, 0.052318, 0.043104, 0.03841275, "stop")


def drive(coroutine: Coroutine[Any, Any, Target]) -> Target:
    """The value of a coroutine that finishes without suspending (place, model listed)."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        result: Target = stop.value
        return result
    coroutine.close()
    raise RuntimeError("it suspended: the model is not listed")


def fleet_of(
    size: int,
    listed_by: int | None = None,
    loaded: bool = True,
    max_loaded: int = 0,
    in_flight: int | None = None,
) -> Fleet:
    """A fleet of ``size`` upstreams as after its first polls and some traffic: healthy, the
    first ``listed_by`` (all) listing the model (with two others), loaded there for an hour
    (``loaded``; else another model is, the one a cold load would evict), ``in_flight``
    requests for it on each (64 connections spread over them)."""
    upstreams = [
        UpstreamSettings(f"u{n}", URL(f"http://127.0.0.1:{11434 + n}"), max_loaded=max_loaded)
        for n in range(1, size + 1)
    ]
    fleet = Fleet(upstreams, probe_timeout=2.0)
    now = time.time()
    listed_by = size if listed_by is None else listed_by
    others = ["bench-001:latest", "bench-002:latest"]
    for number, node in enumerate(fleet.nodes):
        node.answered = True
        node.models = frozenset([KEY, *others] if number < listed_by else others)
        resident = KEY if loaded and number < listed_by else others[0]
        node.loaded = {resident: now + 3600.0}
        busy = CONNECTIONS // size + (number < CONNECTIONS % size)
        count = busy if in_flight is None else in_flight
        if count:
            node.in_flight_by[KEY] = count
        node.in_flight = count
        node.service[KEY], node.load[KEY] = 0.095, 0.038
        node.service[others[0]] = 0.5
    return fleet


def dispatch_of(fleet: Fleet) -> Dispatch:
    return Dispatch(fleet, RoutingSettings(), random.Random(11))


def exchange(target: Target) -> Exchange:
    """What the record step gets: a small generate answered 200 with usage."""
    x = Exchange("POST", "/api/generate", 0.0, inference=True)
    x.status, x.first_byte, x.finished, x.model = 200, 0.0005, 0.001, MODEL
    x.usage, x.target = USAGE, target
    return x


def cases() -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (statement, its globals)."""
    route = route_for("/api/generate")
    headers = head(None)
    assert len(headers) == len(CLIENT_HEAD)
    table: dict[str, tuple[str, dict[str, Any]]] = {}
    for size in (3, 20):
        fleet = fleet_of(size)
        dispatch = dispatch_of(fleet)
        target = drive(dispatch.place("POST", route, MODEL, headers))
        assert target.decision in ("hot", "queued_hot"), target
        # The record step alone, on a fleet of its own (its in-flight counts drift down).
        alone = dispatch_of(fleet_of(size))
        alone_target = Target(alone.fleet.nodes[0], target.decision, KEY)
        g: dict[str, Any] = {
            "drive": drive,
            "place": dispatch.place,
            "place_now": dispatch.place_now,
            "route": route,
            "model": MODEL,
            "key": KEY,
            "headers": headers,
            "fleet": fleet,
            "views": fleet.views,
            "choose": choose,
            "views_now": fleet.views(),
            "now": time.time(),
            "rng": random.Random(7),
            "model_key": model_key,
            "node": target.node,
            "decision": target.decision,
            "sent": fleet.sent,
            "count": fleet.count_decision,
            "ended": dispatch.ended,
            "x": exchange(target),
            "ended_alone": alone.ended,
            "x_alone": exchange(alone_target),
        }
        assert isinstance(choose(KEY, g["views_now"], g["now"], g["rng"]), Choice)
        n = f"({size} upstreams)"
        table |= {
            f"route step: Dispatch.place_now {n}": (
                'place_now("POST", route, model, headers)',
                g,
            ),
            f"  Fleet.views() {n}": ("views()", g),
            f"  router.choose(key, views, now, rng) {n}": (
                "choose(key, views_now, now, rng)",
                g,
            ),
            f"send + record: Fleet.sent, count_decision, Dispatch.ended {n}": (
                "sent(node, key); count(node, decision); ended(x)",
                g,
            ),
            f"  Dispatch.ended alone {n}": ("ended_alone(x_alone)", g),
            f"per request: place_now + sent + count_decision + ended {n}": (
                't = place_now("POST", route, model, headers); x.target = t;'
                " sent(t.node, t.key); count(t.node, t.decision); ended(x)",
                g,
            ),
        }
    node = fleet_of(3).nodes[0]
    base = "Node.base (str of the upstream's URL, each request sent)"
    table[base] = ("node.base", {"node": node})
    table["model_key(model)"] = ("model_key(model)", {"model_key": model_key, "model": MODEL})
    now = time.time()
    for name, fleet in {
        "listed by 1 of 20": fleet_of(20, listed_by=1),
        "loaded on none of 20, each full (max_loaded 1), an idle model to evict": fleet_of(
            20, loaded=False, max_loaded=1, in_flight=0
        ),
    }.items():
        views = fleet.views()
        found = choose(KEY, views, now, random.Random(7))
        assert isinstance(found, Choice), found
        table[f"router.choose, {name}"] = (
            "choose(key, views_now, now, rng)",
            {
                "choose": choose,
                "key": KEY,
                "views_now": views,
                "now": now,
                "rng": random.Random(7),
            },
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9, help="repeats of each case (9)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    results = measure(cases(), args.repeat)
    print(render(results, "python " + " ".join(["bench/routing.py", *sys.argv[1:]])))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

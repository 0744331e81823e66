"""Where a request goes in a fleet: the route step, as proxy.py calls it.

Rules (the fleet issue's routing policy):
1. ``X-Ollama-Meter-Upstream: NAME`` pins a request to that upstream (an unknown name is 400
   and names the known ones); the header is never forwarded.
2. Model management (pull, push, create, copy, delete, blobs) goes where it is pinned, else to
   ``[routing] admin_upstream``, else to the one upstream there is; with several and neither,
   it is refused (400) rather than sent somewhere arbitrary. A blob and the create that uses
   it therefore land on the same upstream.
3. A request that names a model goes where router.py says. Nobody lists it: the tags are
   refreshed once (concurrent misses share it), then 404 with the text Ollama gives on that
   route. Only unhealthy upstreams list it: 503 + Retry-After.
4. Anything else goes to a healthy upstream: ``/api/version`` and ``/`` to the first one (in
   the configured order); the account routes and unknown ones to the admin upstream when it
   is healthy; the rest (a body the proxy could not read) to the one with the fewest
   requests in flight.
5. No healthy upstream at all: 503 + Retry-After, never a hang.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final, NoReturn

from multidict import CIMultiDictProxy

from .. import exchange as ex
from ..exchange import Exchange
from ..fleet_settings import RoutingSettings
from ..inbound import Refusal
from ..ollama import Route, canonical_model
from .fleet import Fleet, Node
from .policy import RouteClass, route_class
from .router import AllTried, Choice, NotListed, OnlyUnhealthy, Result, choose, model_key

PIN_HEADER: Final = "X-Ollama-Meter-Upstream"
_BLOBS: Final = "/api/blobs/{digest}"
#: Seconds between tag refreshes that a request for a model nobody lists may cause (a client
#: naming made-up models must not make the proxy poll the fleet once a request).
MISS_REFRESH_GAP: Final = 5.0
#: Failures before any answer: what the breaker counts.
_TRANSPORT: Final = frozenset({ex.UPSTREAM_UNREACHABLE, ex.UPSTREAM_TIMEOUT, ex.UPSTREAM_CLOSED})
_RETRY_AFTER: Final = {"Retry-After": "2"}
#: The reason of a 503 for want of an upstream (rejected_total's, with limits on).
NO_UPSTREAM: Final = "no_upstream"

#: Ollama's 404 text for a model it does not have, by route.
_PULL_FIRST: Final = frozenset({"/api/embed", "/api/embeddings", "/v1/embeddings"})
_CANONICAL: Final = frozenset({"/api/show", "/v1/models/{model}"})


def not_found(template: str, model: str) -> str:
    """The text Ollama itself answers a missing model with on this route."""
    if template in _PULL_FIRST:
        return f'model "{model}" not found, try pulling it first'
    if template in _CANONICAL:
        return f"model '{canonical_model(model)}' not found"
    return f"model '{model}' not found"


@dataclass(slots=True)  # not frozen: one is built per request, and frozen fields cost
class Target:
    node: Node
    #: routing_decisions_total's label: hot, queued_hot, loading, cold, only, pinned, retry,
    #: or None (no model, not a decision).
    decision: str | None
    #: The model as the fleet tracks it there (model_key): inference on a model it lists.
    key: str | None
    #: The model the request names (model_key), tracked or not.
    model: str | None = None


class Dispatch:
    def __init__(
        self, fleet: Fleet, routing: RoutingSettings, rng: random.Random | None = None
    ) -> None:
        self.fleet = fleet
        self._admin = routing.admin_upstream
        self._rng = rng or random.Random()

    def pinned(self, headers: CIMultiDictProxy[str]) -> Node | None:
        name = headers.get(PIN_HEADER)
        if name is None:
            return None
        node = self.fleet.by_name.get(name.strip())
        if node is None:
            known = ", ".join(self.fleet.by_name)
            raise Refusal(400, f"ollama-meter: no upstream named {name[:64]!r} (known: {known})")
        return node

    def place_now(
        self,
        method: str,
        route: Route,
        model: str | None,
        headers: CIMultiDictProxy[str],
        exclude: frozenset[str] = frozenset(),
    ) -> Target | None:
        """``place`` without waiting: where to send this request, or a Refusal; None when
        nobody lists its model and the tags are to be refreshed first (``place`` does that).
        Called on every request: no coroutine, and the route class only where it decides."""
        key = model_key(model) if model else None
        node = self.pinned(headers) if PIN_HEADER in headers else None
        # (An inference route is never model management, so only other routes ask.)
        if node is None and not route.inference:
            cls = route_class(method, route.template)
            if cls is RouteClass.MODEL_ADMIN or route.template == _BLOBS:
                # HEAD /api/blobs too: the CLI skips an upload the server it asks already has.
                node = self._admin_node()
        if node is not None:
            # Only inference on a model it lists is tracked there (a name from a body is
            # unbounded, and a pull loads nothing).
            tracked = key if route.inference and key in node.models else None
            return Target(node, "pinned", tracked, key)
        if model is None or key is None:
            return Target(self._any(route_class(method, route.template), exclude), None, None)
        fleet = self.fleet
        now = fleet.now()
        found = choose(key, fleet.views(now), now, self._rng, exclude)
        if isinstance(found, Choice):
            return self._chosen(found, route, key, exclude)
        if isinstance(found, NotListed) and not exclude:
            return None
        return self._refused(found, route, model)

    async def place(
        self,
        method: str,
        route: Route,
        model: str | None,
        headers: CIMultiDictProxy[str],
        exclude: frozenset[str] = frozenset(),
    ) -> Target:
        """Where to send this request (rules 1-5), or a Refusal."""
        target = self.place_now(method, route, model, headers, exclude)
        if target is not None:
            return target
        # Nobody lists it (so there is a model, and it is not pinned): the tags once more.
        assert model is not None
        await self.fleet.refresh_tags(min_gap=MISS_REFRESH_GAP)
        key = model_key(model)
        now = self.fleet.now()
        found = choose(key, self.fleet.views(now), now, self._rng, exclude)
        if isinstance(found, Choice):
            return self._chosen(found, route, key, exclude)
        return self._refused(found, route, model)

    def _chosen(self, found: Choice, route: Route, key: str, exclude: frozenset[str]) -> Target:
        # (The member's own attribute: ``.value`` is a descriptor call, and a table by
        # member hashes it in Python.)
        decision = "retry" if exclude else found.decision._value_
        # Only inference loads a model: a show or a model lookup is not tracked as one.
        node = self.fleet.by_name[found.upstream]
        return Target(node, decision, key if route.inference else None, key)

    def _refused(self, found: Result, route: Route, model: str) -> NoReturn:
        if isinstance(found, NotListed):
            if any(not node.tags_known for node in self.fleet.healthy()):
                raise Refusal(
                    503,
                    "ollama-meter: an upstream's model list is not known yet",
                    _RETRY_AFTER,
                    NO_UPSTREAM,
                )
            raise Refusal(404, not_found(route.template, model))
        if isinstance(found, OnlyUnhealthy):
            raise Refusal(
                503,
                f"ollama-meter: every upstream that has {model[:100]!r} is down",
                {"Retry-After": str(found.retry_after)},
                NO_UPSTREAM,
            )
        assert isinstance(found, AllTried)
        raise Refusal(
            503, "ollama-meter: every upstream that has it failed", _RETRY_AFTER, NO_UPSTREAM
        )

    def again(self, first: Target, route: Route, model: str) -> Target:
        """The route step run again for a request waiting in the admit step: where it would
        go now (no tag refresh: its model was listed when it came). A pinned request stays."""
        key = first.model
        if first.decision == "pinned" or key is None:
            return first
        now = self.fleet.now()
        found = choose(key, self.fleet.views(now), now, self._rng)
        if isinstance(found, Choice):
            node = self.fleet.by_name[found.upstream]
            return Target(node, found.decision._value_, key if route.inference else None, key)
        if isinstance(found, NotListed):
            raise Refusal(404, not_found(route.template, model))
        retry = found.retry_after if isinstance(found, OnlyUnhealthy) else 2
        raise Refusal(
            503,
            f"ollama-meter: every upstream that has {model[:100]!r} is down",
            {"Retry-After": str(retry)},
            NO_UPSTREAM,
        )

    def ended(self, x: Exchange) -> None:
        """The record step: the fleet learns how the request went (fleet.py rule 3), and a
        model-management call that changed something refreshes the tags."""
        target = x.target
        if target is None or not x.dispatched:
            return  # never sent (refused or left while queued): it did not end there either
        failed = x.first_byte is None and x.error in _TRANSPORT
        usage = x.usage
        self.fleet.ended(
            target.node,
            target.key,
            cold=x.cold,
            loading=x.loading,
            status=x.status,
            usage=usage,
            transport_failed=failed,
            label=x.model,
        )
        if (
            not 200 <= x.status < 300
            or target.decision != "pinned"  # model management always is (rule 2)
            or route_class(x.method, x.endpoint) is not RouteClass.MODEL_ADMIN
        ):
            return
        if x.endpoint == "/api/delete" and target.model is not None:
            # Gone at once: the next request for it must not be sent there.
            target.node.models = target.node.models - {target.model}
        self.fleet.refresh_soon()

    def _admin_node(self) -> Node:
        if self._admin is not None:
            return self.fleet.by_name[self._admin]
        if len(self.fleet.nodes) == 1:
            return self.fleet.nodes[0]
        known = ", ".join(self.fleet.by_name)
        raise Refusal(
            400,
            "ollama-meter: model management needs an upstream: send "
            f"{PIN_HEADER}: NAME (known: {known}), or set [routing] admin_upstream",
        )

    def _any(self, cls: RouteClass, exclude: frozenset[str] = frozenset()) -> Node:
        healthy = [node for node in self.fleet.healthy() if node.name not in exclude]
        if not healthy:
            raise Refusal(503, "ollama-meter: no upstream is answering", _RETRY_AFTER, NO_UPSTREAM)
        if cls is RouteClass.PUBLIC:
            return healthy[0]  # /api/version and /: the first healthy server's, every time
        if cls in (RouteClass.ACCOUNT, RouteClass.OTHER) and self._admin is not None:
            admin = self.fleet.by_name[self._admin]
            if admin in healthy:
                return admin
        return min(healthy, key=lambda node: node.in_flight)

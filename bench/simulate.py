"""Routing policies on a simulated fleet: ``python bench/simulate.py [--seeds N] [--minutes M]
[--rate R] [--max-loaded A,B,C]``.

A seeded discrete-event simulation, no sockets, no clock: time is a number in an event heap.
The same workload (Poisson arrivals, models by Zipf popularity, a random number of tokens per
request) is replayed against the same fleet under each policy, and the table compares the time
to first token (TTFT: arrival at the proxy to the first generated token), the loads and the
evictions.

Each simulated Ollama does what its scheduler does, in the ways that matter to routing:

- a model runner runs ``slots`` requests at once (OLLAMA_NUM_PARALLEL); the others wait for a
  slot, without bound;
- requests go through one FIFO of pending requests. A request for a loaded (or loading) model
  joins its runner. One for a model not in memory starts a load (seconds) if fewer than
  ``max_loaded`` models are resident; else the least recently used idle model is unloaded at
  once; else (every resident model busy) the least recently used one is marked to unload when
  idle, and the whole FIFO waits for that, requests for hot models behind it included;
- an idle model unloads after ``keep_alive`` (300 s);
- a request reports, when done, ``load_duration`` (from its arrival to its runner being ready,
  as Ollama measures it) and its slot time (prompt evaluation plus per-token generation).

The proxy's side is what ollama-meter keeps: its own requests in flight per (upstream, model),
the loaded models from a poll of /api/ps every 5 s (which lists models still loading, as
Ollama's does) plus its own traffic since (a first byte means loaded), "loading" for a request
sent while cold until its first byte (a poll does not turn it hot), the model that such a
request evicts dropped at once (``router.expected_victim``, until the next poll), and moving
averages of slot time and of the load_duration of requests sent while cold, learnt from
completed requests. Every policy sees that same snapshot:

- ``round-robin``: the next upstream in turn;
- ``least-connections``: the fewest requests in flight (all models), ties in turn;
- ``warm first``: in turn among the upstreams where the model is hot, else round-robin;
- ``cost``: ``ollama_meter.gateway.router.choose``.

Not modelled: GPU memory (``max_loaded`` stands for it), compute shared between the models of
one GPU, network time, failures, clients other than the proxy.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import itertools
import random
import statistics
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from ollama_meter.gateway.router import Choice, UpstreamView, choose, expected_victim

KEEP_ALIVE: Final = 300.0  # seconds an idle model stays loaded (Ollama's default)
POLL: Final = 5.0  # seconds between two /api/ps polls of an upstream
ALPHA: Final = 0.2  # weight of a new sample in a moving average
ZIPF_S: Final = 1.0  # popularity of the model of rank k: 1 / k**s
MEAN_TOKENS: Final = 200.0  # generated tokens a request, exponentially distributed
PROMPT_SECONDS: Final = 0.15  # prompt evaluation before the first token, at speed 1


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    load_seconds: float  # from disk to ready
    token_seconds: float  # per generated token, at speed 1


@dataclass(frozen=True, slots=True)
class ServerSpec:
    name: str
    slots: int
    max_loaded: int
    speed: float = 1.0  # multiplies prompt and token times (a slower GPU is > 1)


#: In order of popularity (Zipf rank 1 first).
MODELS: Final = (
    ModelSpec("llama3.2:3b", 3.0, 0.012),
    ModelSpec("qwen3:8b", 6.0, 0.025),
    ModelSpec("gemma3:12b", 9.0, 0.035),
    ModelSpec("mistral:7b", 5.0, 0.022),
    ModelSpec("phi4:14b", 12.0, 0.040),
)
ALL_MODELS: Final = frozenset(model.name for model in MODELS)
SERVERS: Final = (
    ServerSpec("gpu-a", slots=4, max_loaded=2),
    ServerSpec("gpu-b", slots=2, max_loaded=2),
    ServerSpec("gpu-c", slots=1, max_loaded=1, speed=1.5),
)


# --- the event loop ------------------------------------------------------------------------


class Clock:
    """A heap of (time, sequence, action); ``run`` pops them in order."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), action))

    def run(self, until: Callable[[], bool]) -> None:
        while self._heap and not until():
            self.now, _, action = heapq.heappop(self._heap)
            action()


@dataclass(slots=True)
class Request:
    model: str
    arrival: float
    tokens: int
    upstream: int = -1
    sent_cold: bool = False  # the proxy saw the model cold there when it sent this


# --- a simulated Ollama --------------------------------------------------------------------


@dataclass(slots=True)
class Runner:
    model: str
    loading: bool
    last_used: float
    draining: bool = False  # the victim of an eviction: unloads when idle
    ready_at: float = 0.0
    idle_since: float = 0.0
    busy: int = 0
    waiting: deque[Request] = field(default_factory=deque)


class Ollama:
    """One server's scheduler: runners with slots, one pending FIFO, LRU eviction."""

    def __init__(self, spec: ServerSpec, clock: Clock, proxy: Proxy) -> None:
        self.spec = spec
        self._clock = clock
        self._proxy = proxy
        self._runners: dict[str, Runner] = {}
        self._pending: deque[Request] = deque()
        self._draining: Runner | None = None  # the FIFO waits for this victim to go idle
        self._models = {model.name: model for model in MODELS}
        self.loads = 0
        self.evictions = 0
        self.busy_evictions = 0  # victims that were in use: their unload was waited for

    def submit(self, request: Request) -> None:
        self._pending.append(request)
        self._schedule()

    def ps(self) -> dict[str, float | None]:
        """/api/ps: the models in memory, loading ones included, and when they expire."""
        now = self._clock.now
        return {
            runner.model: runner.idle_since + KEEP_ALIVE if self._idle(runner) else now + KEEP_ALIVE
            for runner in self._runners.values()
        }

    def _schedule(self) -> None:
        while self._pending and self._draining is None:
            request = self._pending[0]
            runner = self._runners.get(request.model)
            if runner is not None:
                self._pending.popleft()
                runner.waiting.append(request)
                self._start(runner)
                continue
            if self.spec.max_loaded and len(self._runners) >= self.spec.max_loaded:
                self.evictions += 1
                idle = [r for r in self._runners.values() if self._idle(r)]
                if idle:
                    del self._runners[min(idle, key=lambda r: r.last_used).model]
                    continue
                victim = min(self._runners.values(), key=lambda r: (r.loading, r.last_used))
                victim.draining = True
                self._draining = victim
                self.busy_evictions += 1
                return
            self._pending.popleft()
            self._load(request.model).waiting.append(request)

    def _idle(self, runner: Runner) -> bool:
        return not runner.loading and runner.busy == 0 and not runner.waiting

    def _load(self, model: str) -> Runner:
        runner = Runner(model, loading=True, last_used=self._clock.now)
        self._runners[model] = runner
        assert not self.spec.max_loaded or len(self._runners) <= self.spec.max_loaded
        self.loads += 1
        ready = self._clock.now + self._models[model].load_seconds
        self._clock.at(ready, functools.partial(self._ready, runner))
        return runner

    def _ready(self, runner: Runner) -> None:
        runner.loading = False
        runner.ready_at = self._clock.now
        self._start(runner)

    def _start(self, runner: Runner) -> None:
        if runner.loading:
            return
        now = self._clock.now
        while runner.busy < self.spec.slots and runner.waiting:
            request = runner.waiting.popleft()
            runner.busy += 1
            runner.last_used = now
            prompt = PROMPT_SECONDS * self.spec.speed
            token = self._models[request.model].token_seconds * self.spec.speed
            slot = prompt + request.tokens * token
            load = max(0.0, runner.ready_at - request.arrival)
            self._clock.at(now + prompt, functools.partial(self._proxy.first_byte, request))
            self._clock.at(now + slot, functools.partial(self._finish, request, slot, load))

    def _finish(self, request: Request, slot_seconds: float, load_duration: float) -> None:
        runner = self._runners[request.model]
        runner.busy -= 1
        runner.last_used = self._clock.now
        self._proxy.done(request, slot_seconds, load_duration)
        self._start(runner)
        if runner.busy or runner.waiting:
            return
        if runner is self._draining:
            del self._runners[runner.model]
            self._draining = None
            self._schedule()
            return
        runner.idle_since = self._clock.now
        self._clock.at(self._clock.now + KEEP_ALIVE, functools.partial(self._expire, runner))

    def _expire(self, runner: Runner) -> None:
        if (
            self._runners.get(runner.model) is runner
            and self._idle(runner)
            and runner.idle_since + KEEP_ALIVE <= self._clock.now
        ):
            del self._runners[runner.model]
            self._schedule()


# --- the proxy and its snapshot ------------------------------------------------------------


@dataclass(slots=True)
class Known:
    """What the proxy keeps about one upstream."""

    spec: ServerSpec
    in_flight: Counter[str] = field(default_factory=Counter)
    loaded: dict[str, float | None] = field(default_factory=dict)
    loading: dict[str, float] = field(default_factory=dict)
    service: dict[str, float] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)

    def hot(self, model: str, now: float) -> bool:
        if model not in self.loaded:
            return False
        expires = self.loaded[model]
        return expires is None or expires > now

    def view(self) -> UpstreamView:
        return UpstreamView(
            name=self.spec.name,
            healthy=True,
            models=ALL_MODELS,
            loaded=self.loaded,
            loading=self.loading,
            in_flight=self.in_flight,
            slots=self.spec.slots,
            max_loaded=self.spec.max_loaded,
            service_seconds=self.service,
            load_seconds=self.load,
        )


def _average(averages: dict[str, float], model: str, sample: float) -> None:
    old = averages.get(model)
    averages[model] = sample if old is None else old + ALPHA * (sample - old)


Policy = Callable[["Proxy", str], int]


class Proxy:
    """Sends each request where its policy says, and learns from the answers."""

    def __init__(
        self, clock: Clock, servers: Sequence[ServerSpec], policy: Policy, seed: int
    ) -> None:
        self.clock = clock
        self.policy = policy
        self.rng = random.Random(seed)
        self.known = [Known(spec) for spec in servers]
        self.servers = [Ollama(spec, clock, self) for spec in servers]
        self.ttft: list[float] = []
        self.done_count = 0
        for index in range(len(servers)):  # polls spread over the interval
            clock.at(POLL * index / len(servers), functools.partial(self._poll, index))

    def send(self, request: Request) -> None:
        now = self.clock.now
        index = self.policy(self, request.model)
        known = self.known[index]
        request.upstream = index
        if not known.hot(request.model, now):
            request.sent_cold = True
            if request.model not in known.loading:  # a load starts: what goes is gone
                victim = expected_victim(known.view(), now)
                if victim is not None:
                    del known.loaded[victim]
            known.loading.setdefault(request.model, now)
        known.in_flight[request.model] += 1
        self.servers[index].submit(request)

    def first_byte(self, request: Request) -> None:
        now = self.clock.now
        self.ttft.append(now - request.arrival)
        known = self.known[request.upstream]
        known.loading.pop(request.model, None)
        known.loaded[request.model] = now + KEEP_ALIVE

    def done(self, request: Request, slot_seconds: float, load_duration: float) -> None:
        self.done_count += 1
        known = self.known[request.upstream]
        known.in_flight[request.model] -= 1
        if not known.in_flight[request.model]:
            del known.in_flight[request.model]
        known.loaded[request.model] = self.clock.now + KEEP_ALIVE
        _average(known.service, request.model, slot_seconds)
        if request.sent_cold:
            _average(known.load, request.model, load_duration)

    def _poll(self, index: int) -> None:
        known = self.known[index]
        # A model the proxy's own cold request is waiting for stays "loading" until it answers.
        ps = self.servers[index].ps()
        known.loaded = {model: at for model, at in ps.items() if model not in known.loading}
        self.clock.at(self.clock.now + POLL, functools.partial(self._poll, index))


# --- policies ------------------------------------------------------------------------------


def round_robin() -> Policy:
    turn = itertools.count()

    def policy(proxy: Proxy, model: str) -> int:
        return next(turn) % len(proxy.known)

    return policy


def least_connections() -> Policy:
    turn = itertools.count()

    def policy(proxy: Proxy, model: str) -> int:
        start, size = next(turn), len(proxy.known)
        order = [(start + offset) % size for offset in range(size)]
        return min(order, key=lambda i: sum(proxy.known[i].in_flight.values()))

    return policy


def warm_first() -> Policy:
    turn = itertools.count()

    def policy(proxy: Proxy, model: str) -> int:
        now = proxy.clock.now
        hot = [i for i, known in enumerate(proxy.known) if known.hot(model, now)]
        candidates = hot or list(range(len(proxy.known)))
        return candidates[next(turn) % len(candidates)]

    return policy


def cost() -> Policy:
    def policy(proxy: Proxy, model: str) -> int:
        views = [known.view() for known in proxy.known]
        choice = choose(model, views, proxy.clock.now, proxy.rng)
        assert isinstance(choice, Choice)  # every simulated upstream is healthy, lists all
        return next(i for i, view in enumerate(views) if view.name == choice.upstream)

    return policy


POLICIES: Final[dict[str, Callable[[], Policy]]] = {
    "round-robin": round_robin,
    "least-connections": least_connections,
    "warm first": warm_first,
    "cost (router.choose)": cost,
}


# --- runs ----------------------------------------------------------------------------------


def workload(seed: int, rate: float, seconds: float) -> list[tuple[float, str, int]]:
    """(arrival, model, tokens) of every request: Poisson arrivals, Zipf models."""
    rng = random.Random(seed)
    weights = [1.0 / rank**ZIPF_S for rank in range(1, len(MODELS) + 1)]
    names = [model.name for model in MODELS]
    arrivals: list[tuple[float, str, int]] = []
    now = rng.expovariate(rate)
    while now < seconds:
        model = rng.choices(names, weights)[0]
        tokens = max(1, round(rng.expovariate(1.0 / MEAN_TOKENS)))
        arrivals.append((now, model, tokens))
        now += rng.expovariate(rate)
    return arrivals


@dataclass(slots=True)
class Tally:
    ttft: list[float] = field(default_factory=list)
    requests: int = 0
    loads: int = 0
    evictions: int = 0
    busy_evictions: int = 0


def run(
    servers: Sequence[ServerSpec],
    policy: Policy,
    seed: int,
    arrivals: Sequence[tuple[float, str, int]],
    tally: Tally,
) -> None:
    """Replay ``arrivals`` until every request is done."""
    clock = Clock()
    proxy = Proxy(clock, servers, policy, seed)
    for arrival, model, tokens in arrivals:
        clock.at(arrival, functools.partial(proxy.send, Request(model, arrival, tokens)))
    clock.run(until=lambda: proxy.done_count == len(arrivals))
    assert len(proxy.ttft) == len(arrivals)
    tally.ttft += proxy.ttft
    tally.requests += len(arrivals)
    for server in proxy.servers:
        tally.loads += server.loads
        tally.evictions += server.evictions
        tally.busy_evictions += server.busy_evictions


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def table(servers: Sequence[ServerSpec], seeds: int, minutes: float, rate: float) -> str:
    """The markdown table comparing every policy on the same ``seeds`` workloads."""
    tallies = {name: Tally() for name in POLICIES}
    for seed in range(seeds):
        arrivals = workload(seed, rate, minutes * 60.0)
        for name, make in POLICIES.items():
            run(servers, make(), seed, arrivals, tallies[name])
    lines = [
        "| policy | p50 TTFT | p90 TTFT | p99 TTFT | mean TTFT | loads / run | evictions / run "
        "| of a busy model |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, tally in tallies.items():
        p50, p90, p99 = (percentile(tally.ttft, q) for q in (0.50, 0.90, 0.99))
        lines.append(
            f"| {name} | {p50:.2f} s | {p90:.2f} s | {p99:.2f} s "
            f"| {statistics.fmean(tally.ttft):.2f} s "
            f"| {tally.loads / seeds:.1f} | {tally.evictions / seeds:.1f} "
            f"| {tally.busy_evictions / seeds:.1f} |"
        )
    requests = next(iter(tallies.values())).requests
    fleet = ", ".join(
        f"{s.name} (slots {s.slots}, max_loaded {s.max_loaded}, speed {s.speed:g})" for s in servers
    )
    lines += [
        "",
        f"{seeds} runs (seeds 0-{seeds - 1}) of {minutes:g} simulated minutes at {rate:g} "
        f"requests/s, {requests / seeds:.0f} requests a run; fleet: {fleet}.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Routing policies on a simulated fleet.")
    parser.add_argument("--seeds", type=int, default=20, help="workloads to replay (0..N-1)")
    parser.add_argument("--minutes", type=float, default=60.0, help="simulated minutes a run")
    parser.add_argument("--rate", type=float, default=0.5, help="requests per second (Poisson)")
    parser.add_argument(
        "--max-loaded",
        default=",".join(str(spec.max_loaded) for spec in SERVERS),
        help="max_loaded of each upstream, comma-separated",
    )
    args = parser.parse_args(argv)
    limits = [int(part) for part in args.max_loaded.split(",")]
    if len(limits) != len(SERVERS):
        parser.error(f"--max-loaded: {len(SERVERS)} values, one per upstream")
    servers = [
        ServerSpec(spec.name, spec.slots, limit, spec.speed)
        for spec, limit in zip(SERVERS, limits, strict=True)
    ]
    started = time.perf_counter()
    print(table(servers, args.seeds, args.minutes, args.rate))
    print(f"({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

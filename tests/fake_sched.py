"""Ollama's scheduler in miniature, for the fake fleet (tests/fake_fleet.py): which models a
fake upstream holds, which it has loaded, and who waits for what. No HTTP here.

Rules, each as Ollama's scheduler has it (server/sched.go, v0.33):

1. Placement is serial. One request at a time is placed, as Ollama's pending loop takes one
   request at a time: a loaded model is assigned at once; a model that is still loading is
   waited for *while placing*, so requests behind it wait too (Ollama blocks on the runner's
   lock); a cold model is loaded if fewer than ``max_loaded`` are resident (0: no limit).
2. At ``max_loaded``, a victim is chosen: an idle model (no request of it placed and
   unfinished), least recently used first, else the least recently used model. Placement
   waits until the victim is idle, unloads it (an *eviction*) and tries again. Ollama picks
   the idle one with the shortest keep-alive, then by name; with the equal keep-alives of a
   test that is arbitrary, and LRU is what a router would predict.
3. The load itself runs outside the placement (Ollama runs it in a goroutine): two cold models
   can load at once. A load takes ``load_delay`` and passes the ``hold_loads`` gates.
4. Once placed, a request waits for one of its model's ``slots`` (a semaphore: unbounded wait,
   as Ollama's runner queues; OLLAMA_NUM_PARALLEL), then runs.
5. Residency ends by eviction, by keep-alive (lazily: an idle model past its expiry is gone
   the next time anyone looks; keep_alive 0 unloads it when it goes idle), or by ``unload()``.
   A busy model never expires.

Time: every delay is a nominal length in seconds, slept for ``delay * time_scale``. Durations
the fake reports are the real elapsed ones with each injected delay counted at its nominal
length, so ``time_scale=0`` gives fast tests with the numbers of a slow GPU. (A request that
waited for another's load reports the real wait only.) ``clock`` (Unix seconds) dates
``expires_at`` and ``created_at`` and decides expiry; pass your own to move time.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from .fake_answers import _canonical

#: What Ollama holds a model for after its last request (OLLAMA_KEEP_ALIVE's default).
KEEP_ALIVE: Final = 300.0
#: Go's longest duration, what a negative keep_alive means ("forever").
FOREVER: Final = 9223372036.854775807
#: Ollama's default num_ctx, the context_length of a model loaded without one.
CONTEXT_LENGTH: Final = 4096


def model_key(name: str) -> str:
    """The identity Ollama gives a model name: ``x`` is ``x:latest``, case-insensitive."""
    return _canonical(name).casefold()


_GO_DURATION: Final = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
_UNITS: Final = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_of(value: object, default: float) -> float:
    """Seconds from a request's keep_alive (a number of seconds, or a Go duration such as
    "5m" or "1h30m"); negative means forever. Absent or unreadable: ``default``."""
    if isinstance(value, bool) or value is None:
        return default
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        return default
    text, sign = value.strip(), 1.0
    if text.startswith(("-", "+")):
        sign, text = (-1.0 if text[0] == "-" else 1.0), text[1:]
    if text == "0":
        return 0.0
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return default
    return sign * sum(float(number) * _UNITS[unit] for number, unit in parts)


class PerModel:
    """Counts per model: ``counts["llama3.2"]`` is ``counts["llama3.2:latest"]`` (0 if none)."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def add(self, name: str, amount: int = 1) -> None:
        key = model_key(name)
        self._counts[key] = self._counts.get(key, 0) + amount

    def raise_to(self, name: str, value: int) -> None:
        key = model_key(name)
        self._counts[key] = max(self._counts.get(key, 0), value)

    def __getitem__(self, name: str) -> int:
        return self._counts.get(model_key(name), 0)

    def total(self) -> int:
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        """By model key (``llama3.2:latest``, casefolded)."""
        return dict(self._counts)

    def __repr__(self) -> str:
        return f"PerModel({self._counts!r})"


@dataclass(eq=False)
class Runner:
    """A model an upstream has loaded (or is loading): Ollama's runnerRef."""

    name: str  # as /api/tags lists it
    context_length: int
    slots: asyncio.Semaphore
    keep_alive: float
    loading: bool = True
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    #: Requests placed on it and not finished (waiting for a slot, or running).
    refs: int = 0
    running: int = 0
    #: For LRU: a tick of the scheduler, bumped at every placement and release.
    used: int = 0
    #: Clock time it unloads at if still idle; None until it first goes idle (Ollama then
    #: reports now + keep-alive, as its PsHandler does for the zero time).
    expires: float | None = None


class _Hold:
    def __init__(self, models: Iterable[str], after: int) -> None:
        self.keys = frozenset(model_key(m) for m in models)
        self.after = after
        self.event = asyncio.Event()

    def applies(self, name: str, index: int) -> bool:
        if self.event.is_set() or self.after != index:
            return False
        return not self.keys or model_key(name) in self.keys


class Holds:
    """Gates a test sets to let a stage go on: ``hold(models, after)`` returns an Event; until
    it is set, matching requests stop there (no models: every model)."""

    def __init__(self) -> None:
        self._holds: list[_Hold] = []

    def hold(self, models: Iterable[str], after: int = 0) -> asyncio.Event:
        gate = _Hold(models, after)
        self._holds.append(gate)
        return gate.event

    async def pass_(self, name: str, index: int = 0) -> None:
        for gate in [g for g in self._holds if g.applies(name, index)]:
            await gate.event.wait()
        self._holds = [g for g in self._holds if not g.event.is_set()]


class Scheduler:
    """Residency and placement of one fake upstream (the rules above)."""

    def __init__(
        self,
        models: Iterable[str],
        loaded: Iterable[str],
        *,
        slots: int,
        max_loaded: int,
        keep_alive: float,
        context_length: int,
        clock: Callable[[], float],
    ) -> None:
        if slots < 1 or max_loaded < 0:
            raise ValueError("slots must be >= 1 and max_loaded >= 0")
        self.models: dict[str, str] = {model_key(m): _canonical(m) for m in models}
        self.slots, self.max_loaded = slots, max_loaded
        self.keep_alive, self.context_length = keep_alive, context_length
        self.clock = clock
        self._pulse = asyncio.Event()
        self.resident: dict[str, Runner] = {}
        self.loads, self.evictions, self.unloads = PerModel(), PerModel(), PerModel()
        #: The most requests of a model running at once, and of models resident at once.
        self.peak, self.peak_loaded = PerModel(), 0
        self.load_holds = Holds()
        self._placing = asyncio.Lock()
        #: Requests not placed yet: waiting behind the one being placed (Ollama's queue),
        #: and that one (waiting for a load or an eviction).
        self.queued = 0
        self.placing = 0
        self._tick = 0
        for name in loaded:
            if self.holds(name) is None:
                raise ValueError(f"{name!r} is loaded but not among the models it holds")
            runner = self._add(self.models[model_key(name)], keep_alive, context_length)
            runner.loading = False
            runner.ready.set()
            runner.expires = clock() + (FOREVER if keep_alive < 0 else keep_alive)

    def holds(self, name: str) -> str | None:
        """The name /api/tags gives the model, if this upstream has it."""
        return self.models.get(model_key(name))

    def queue_full(self, max_queue: int | None) -> bool:
        return max_queue is not None and self._placing.locked() and self.queued >= max_queue

    def running(self, name: str) -> int:
        runner = self.resident.get(model_key(name))
        return runner.running if runner else 0

    def in_flight(self, name: str) -> int:
        runner = self.resident.get(model_key(name))
        return runner.refs if runner else 0

    def sweep(self) -> None:
        now = self.clock()
        for key, runner in list(self.resident.items()):
            idle = not runner.refs and not runner.loading
            if idle and runner.expires is not None and runner.expires <= now:
                self._unload(key, self.unloads)

    async def place(self, name: str, keep_alive: float, num_ctx: int | None) -> tuple[Runner, bool]:
        """Assign a runner of the model (rules 1-2); True: the caller must ``load`` it."""
        key = model_key(name)
        self.queued += 1
        self.placing += 1
        self.changed()
        acquired = False
        try:
            async with self._placing:
                self.queued -= 1
                acquired = True
                return await self._place(key, keep_alive, num_ctx)
        finally:
            self.queued -= 0 if acquired else 1
            self.placing -= 1
            self.changed()

    async def _place(self, key: str, keep_alive: float, num_ctx: int | None) -> tuple[Runner, bool]:
        while True:
            self.sweep()
            runner = self.resident.get(key)
            if runner is not None and runner.loading:
                await runner.ready.wait()  # a failed load is gone: go round again
                continue
            if runner is not None:
                self._use(runner, keep_alive)
                return runner, False
            if self.max_loaded and len(self.resident) >= self.max_loaded:
                await self._evict_one()
                continue
            runner = self._add(self.models[key], keep_alive, num_ctx or self.context_length)
            self.loads.add(runner.name)
            self._use(runner, keep_alive)
            return runner, True

    async def _evict_one(self) -> None:
        by_age = sorted(self.resident.values(), key=lambda r: r.used)
        victim = next((r for r in by_age if not r.refs), by_age[0])
        key, full = model_key(victim.name), len(self.resident)
        # Anything that frees a place (the victim going idle, another unload) ends the wait.
        await self.wait_until(lambda: not victim.refs or len(self.resident) < full)
        if self.resident.get(key) is victim and not victim.refs and len(self.resident) == full:
            self._unload(key, self.evictions)

    async def load(self, runner: Runner, delay: float) -> None:
        """Rule 3: the cold load of a runner ``place`` added. A cancelled load is undone."""
        loaded = False
        try:
            await self.load_holds.pass_(runner.name)
            if delay > 0:
                await asyncio.sleep(delay)
            loaded = True
        finally:
            if not loaded and self.resident.get(model_key(runner.name)) is runner:
                del self.resident[model_key(runner.name)]
            runner.loading = not loaded  # a dropped runner stays "loading": never idles
            runner.ready.set()
            self.changed()

    def start(self, runner: Runner) -> None:
        runner.running += 1
        self.peak.raise_to(runner.name, runner.running)
        self.changed()

    def stop(self, runner: Runner) -> None:
        runner.running -= 1
        self.changed()

    def release(self, runner: Runner) -> None:
        """A placed request finished (or left): maybe the runner is idle now."""
        runner.refs -= 1
        self._tick += 1
        runner.used = self._tick
        if not runner.refs and not runner.loading:
            keep = runner.keep_alive
            runner.expires = self.clock() + (FOREVER if keep < 0 else keep)
            if keep == 0 and self.resident.get(model_key(runner.name)) is runner:
                self._unload(model_key(runner.name), self.unloads)
        self.changed()

    def unload(self, name: str) -> bool:
        """Unload now if idle, else once idle (keep_alive 0); False if not resident."""
        runner = self.resident.get(model_key(name))
        if runner is None:
            return False
        runner.keep_alive = 0
        if not runner.refs and not runner.loading:
            self._unload(model_key(name), self.unloads)
        return True

    def changed(self) -> None:
        """Wake everyone waiting in ``wait_until`` to look again."""
        self._pulse.set()
        self._pulse = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate()`` holds, checked after every change (no polling)."""
        while not predicate():
            await self._pulse.wait()

    def _add(self, name: str, keep_alive: float, context_length: int) -> Runner:
        runner = Runner(name, context_length, asyncio.Semaphore(self.slots), keep_alive)
        self.resident[model_key(name)] = runner
        self.peak_loaded = max(self.peak_loaded, len(self.resident))
        self.changed()
        return runner

    def _use(self, runner: Runner, keep_alive: float) -> None:
        runner.refs += 1
        runner.keep_alive = keep_alive  # Ollama: the latest request's keep-alive counts
        self._tick += 1
        runner.used = self._tick

    def _unload(self, key: str, counter: PerModel) -> None:
        runner = self.resident.pop(key)
        counter.add(runner.name)
        self.changed()


def go_time(seconds: float) -> str:
    """A Unix time as Go's time.Time marshals it in UTC: RFC 3339, nanoseconds, zeros trimmed."""
    nanos = math.floor(seconds * 1e9) if math.isfinite(seconds) else 0
    whole, frac = divmod(nanos, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    digits = f"{frac:09d}".rstrip("0")
    return f"{stamp}.{digits}Z" if digits else f"{stamp}Z"

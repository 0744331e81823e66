"""The admit step: slots per (upstream, model), and the bounded, fair queue in front of them.

Rules (the limits issue, item 4):
1. At most ``slots`` requests per (upstream, model) are at Ollama at once, for an upstream
   whose ``slots`` is configured; an upstream without is never gated (a guess never
   throttles).
2. A request whose chosen upstream has a free slot takes it at once. Otherwise it waits, in
   the queue of its key. Each slot released re-runs the router (``choose``) for the waiting
   requests, each key in turn (its first request that can go now: one waiting for a full
   model never holds back one of the same key whose model has a free slot), so a request
   takes whichever upstream frees first, or another one the router now prefers (a cold load
   judged cheaper than the wait). Keys are served round-robin: a key that starts waiting
   goes first, and a key just served goes last (and stays there, queue empty or not, until
   nobody waits), so a key that queued 100 requests delays one that queued 1 by at most one
   slot turnover, and a key that sends each request as the last one gets its slot is served
   in turn like any other.
3. Bounded: ``max_queue`` waiting in all (0: none), ``max_queued_per_key`` of one key;
   past either, 503 at once. A wait past ``max_queue_wait`` is a 503 too. Both carry
   ``Retry-After`` estimated from the queue ahead, the mean time a slot is held and the
   slots, clamped to 1-60 s.
4. A request that leaves while waiting (its client went away) is removed at once and never
   reaches Ollama. A slot is always released, exactly once, whatever happened: its holder
   (the request's record step; ``move`` for a retry) gives it back and lets go of it, and a
   release never raises (a router that fails while the waiting requests are looked at again
   fails the waiting request it was asked for).

Decision code only: ``choose`` is the router over the fleet's state, the clock a parameter.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Generic, Literal, TypeVar

from ..inbound import Refusal

QUEUE_FULL: Final = "queue_full"
QUEUE_TIMEOUT: Final = "queue_timeout"
NO_UPSTREAM: Final = "no_upstream"
#: A slot's hold time assumed before any request has ended (seconds).
DEFAULT_SERVICE: Final = 5.0
_SMOOTHING: Final = 0.2

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class Pair:
    """The slots of one (upstream, model): how many are taken, and how long one is held."""

    in_use: int = 0
    service: float = DEFAULT_SERVICE
    ended: int = 0


#: A request's place at an (upstream, model) whose upstream is gated: that pair, and when the
#: place was taken (a tuple: one is made a request). Its holder gives it back with
#: ``release`` once, and lets go of it (rule 4).
Slot = tuple[Pair, float]


@dataclass(slots=True)
class _Waiter(Generic[T]):
    key: str
    choose: Callable[[], T]
    future: asyncio.Future[tuple[T, Slot | None]]
    arrived: float


@dataclass(slots=True)
class Admitted(Generic[T]):
    target: T
    slot: Slot | None
    waited: float = 0.0
    queued: bool = False


class Admission(Generic[T]):
    """Rules 1-4. ``where(target)`` names a target's (upstream, model), or None when the
    request runs no model there (not gated)."""

    def __init__(
        self,
        slots: dict[str, int],
        where: Callable[[T], tuple[str, str] | None],
        max_queue: int,
        max_queue_wait: float,
        max_queued_per_key: int,
        clock: Callable[[], float],
        refused: Callable[[str, str | None], None] = lambda reason, key: None,
    ) -> None:
        self.slots = slots
        self._where = where
        self.max_queue = max_queue
        self.max_queue_wait = max_queue_wait
        self.max_queued_per_key = max_queued_per_key
        self._clock = clock
        self._refused = refused
        self._pairs: dict[tuple[str, str], Pair] = {}
        #: Waiting requests by key, in the order keys are served (rule 2).
        self._queues: OrderedDict[str, deque[_Waiter[T]]] = OrderedDict()
        self.depth = 0

    # -- state, for metrics -----------------------------------------------------------------

    def slots_in_use(self) -> Iterable[tuple[str, str, int]]:
        for (upstream, model), pair in self._pairs.items():
            yield upstream, model, pair.in_use

    def slots_configured(self) -> Iterable[tuple[str, int]]:
        return self.slots.items()

    # -- the step ---------------------------------------------------------------------------

    def take_now(self, target: T) -> Slot | Literal[False] | None:
        """A free slot at ``target``, taken (None: not gated there), or False when it is
        full and the request must ``admit`` (wait). The start of ``admit``, as a plain call:
        most requests find a slot free."""
        where = self._where(target)
        if where is None:
            return None
        limit = self.slots.get(where[0])
        if limit is None:
            return None
        pair = self._pairs.get(where)
        if pair is None:
            pair = self._pairs[where] = Pair()
        elif pair.in_use >= limit:
            return False
        pair.in_use += 1
        return pair, self._clock()

    async def admit(self, key: str, target: T, choose: Callable[[], T]) -> Admitted[T]:
        """A target with a slot (or one not gated), or a 503 Refusal (rules 2-4).
        ``target`` is the router's first choice; ``choose`` runs it again."""
        arrived = self._clock()
        slot = self.take_now(target)
        if slot is not False:
            return Admitted(target, slot)
        queue = self._queues.get(key)
        if self.depth >= self.max_queue or (
            queue is not None and len(queue) >= self.max_queued_per_key
        ):
            raise self._refusal(QUEUE_FULL, key, target, "the queue is full")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(key, choose, loop.create_future(), arrived)
        if queue is None:
            queue = self._queues[key] = deque()
            self._queues.move_to_end(key, last=False)  # a key that starts waiting goes first
        queue.append(waiter)  # (a key served while others wait keeps its turn: rule 2)
        self.depth += 1
        future = waiter.future
        try:
            async with asyncio.timeout(self.max_queue_wait):
                await asyncio.shield(future)
        except (TimeoutError, asyncio.CancelledError) as exc:
            self._drop(waiter)
            given = future.done() and not future.cancelled() and future.exception() is None
            if isinstance(exc, asyncio.CancelledError):
                if given:
                    self.release(future.result()[1])  # it came as the client left
                raise
            if not given:
                raise self._refusal(
                    QUEUE_TIMEOUT, key, target, f"no slot within {self.max_queue_wait:g} s"
                ) from None
        target, slot = future.result()  # or the Refusal the router gave when looked at again
        return Admitted(target, slot, self._clock() - arrived, True)

    def move(self, slot: Slot, target: T) -> Slot | Literal[False] | None:
        """A retry elsewhere: a slot at ``target`` instead of ``slot`` (None: not gated
        there), or False, keeping ``slot``, when ``target`` is full (a retry never takes an
        upstream past its slots)."""
        taken = self.take_now(target)  # first: the release below
        if taken is False:
            return False
        self.release(slot)  # may hand slots to waiters, and must not hand them this one
        return taken

    def _drop(self, waiter: _Waiter[T]) -> None:
        queue = self._queues.get(waiter.key)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        self._left()
        if not waiter.future.done():
            waiter.future.cancel()

    def release(self, slot: Slot | None) -> None:
        """A slot back, and the waiting requests looked at again. Called once a slot, by its
        holder, which then lets go of it (rule 4)."""
        if slot is None:
            return
        pair, taken = slot
        pair.in_use -= 1
        held = self._clock() - taken
        pair.service += _SMOOTHING * (held - pair.service) if pair.ended else held - pair.service
        pair.ended += 1
        if self.depth:
            self.pump()

    def pump(self) -> None:
        """Give free slots to waiting requests, keys in turn (rule 2). In a key's turn its
        first request that can go now goes: one waiting for a full model does not hold back
        one behind it whose model has a free slot."""
        progress = True
        while progress and self._queues:
            progress = False
            for key in list(self._queues):
                queue = self._queues.get(key)
                if queue and self._serve(key, queue):
                    progress = True

    def _serve(self, key: str, queue: deque[_Waiter[T]]) -> bool:
        """One of ``key``'s waiting requests given its slot (or its refusal), if any can be."""
        for index, waiter in enumerate(queue):
            try:
                target = waiter.choose()
            except Refusal as refusal:
                if refusal.reason == NO_UPSTREAM:  # not the 404 of a model gone meanwhile
                    self._refused(NO_UPSTREAM, key)
                self._pop(key, queue, index)
                waiter.future.set_exception(refusal)
                return True
            except Exception as error:  # a fault of the router fails this request alone,
                self._pop(key, queue, index)  # never the release that looked at it (rule 4)
                waiter.future.set_exception(error)
                return True
            slot = self.take_now(target)
            if slot is False:
                continue
            self._pop(key, queue, index)
            waiter.future.set_result((target, slot))
            if key in self._queues:
                self._queues.move_to_end(key)  # served: last in turn, even with none left
            return True
        return False

    def _pop(self, key: str, queue: deque[_Waiter[T]], index: int = 0) -> None:
        del queue[index]
        self._left()

    def _left(self) -> None:
        """One request fewer waiting. A key whose queue runs empty keeps its place in the
        turn while others wait (were it forgotten, a key that sends its next request as soon
        as the last one has a slot would be new, so first, at every turnover); the turn is
        forgotten when nobody waits."""
        self.depth -= 1
        if not self.depth:
            self._queues.clear()

    # -- refusals ---------------------------------------------------------------------------

    def retry_after(self, target: T) -> int:
        """Seconds until a request arriving now would likely have a slot (rule 3)."""
        where = self._where(target)
        slots = self.slots.get(where[0], 1) if where else 1
        pair = self._pairs.get(where) if where else None
        service = pair.service if pair is not None else DEFAULT_SERVICE
        turns = (self.depth + 1) / max(1, slots)
        return min(60, max(1, math.ceil(turns * service)))

    def _refusal(self, reason: str, key: str, target: T, what: str) -> Refusal:
        self._refused(reason, key)
        return Refusal(
            503,
            f"ollama-meter: {what}; retry later",
            {"Retry-After": str(self.retry_after(target))},
            reason=reason,
        )

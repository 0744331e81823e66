"""The rpm and tpm windows of a key, kept by the ``limits`` library (its moving window).

Rules:
1. rpm: at most ``rpm`` requests of a key admitted in any 60 s (``MovingWindowRateLimiter``,
   one entry a request). A request is counted when it is admitted, not when it is refused.
2. tpm: the tokens Ollama reported for a key's requests that ended in the last 60 s, one
   window entry a token (how ``limits`` weighs a hit). A request is admitted while that sum
   is below ``tpm``; its own tokens are added when it ends, whatever the sum is then (so a
   window overshoots by the last requests' tokens, and the key waits until enough of them age
   out). The debit asks the storage for room for exactly what is live plus what it adds, so
   the storage trims nothing that still counts and keeps nothing that has aged out.
3. Both storages answer the same questions: the library's Redis storage looks only at the
   newest ``limit`` entries of a window, and ``LimitsMemory`` (its memory storage) is made to
   do the same, so "when does this window drop below the limit" is the age of the
   ``limit``-th newest entry in both.
4. The memory storage's sweep (its own ``__expire_events``: a thread hop per key, then a copy
   of each window without its expired entries) starts at most every ``EXPIRY_EVERY`` seconds.
   The library starts it again from every call that finds the last one done, which under load
   is every turn of the loop, and costs more the fuller the windows are. The sweep only frees
   memory: every answer compares the entries' own times with the clock, swept or not.
5. Time is the storage's ``time.time()`` (the Redis storage sends its own clock's time with
   each call): Retry-After compares the window's times with the ``clock`` given here, which
   must be that clock (tests shift both).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, MovingWindowSupport, Storage
from limits.aio.storage import memory as _memory
from limits.aio.strategies import MovingWindowRateLimiter

WINDOW: Final = 60
_NAMESPACE: Final = "ollama-meter"
#: Looked at to count a whole window (the Redis storage's search stops at its ``limit``).
_ALL: Final = 1 << 31
_DEBIT_TRIES: Final = 3
#: Least seconds between two starts of the memory storage's sweep (rule 4).
EXPIRY_EVERY: Final = 1.0


@dataclass(frozen=True, slots=True)
class Window:
    """A window as a refusal reports it."""

    limit: int
    #: What is left before the limit (never negative).
    remaining: int
    #: Seconds until a request would be admitted (0: now).
    wait: float


def storage_time() -> float:
    """The clock of the library's storages (``time.time``, looked up where they look it up,
    so that a test that shifts theirs shifts this one too)."""
    return float(_memory.time.time())  # type: ignore[attr-defined]


class LimitsMemory(MemoryStorage):
    """The library's memory storage, counting as its Redis storage does (rule 3), sweeping at
    most every ``EXPIRY_EVERY`` seconds (rule 4)."""

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions)
        self._next_sweep = 0.0
        #: How many times the library was asked to start its sweep (tests).
        self.sweeps = 0

    async def _MemoryStorage__schedule_expiry(self) -> None:
        # The library's calls of its private ``__schedule_expiry`` land here (its mangled name).
        now = storage_time()
        if now < self._next_sweep:
            return
        self._next_sweep = now + EXPIRY_EVERY
        self.sweeps += 1
        await super()._MemoryStorage__schedule_expiry()  # type: ignore[misc]

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = storage_time()
        events = self.events.get(key)
        if not events:
            return now, 0
        newest = min(len(events), limit)
        live = bisect.bisect_left(events, -(now - expiry), hi=newest, key=lambda e: -e.atime)
        if live == 0:
            return now, 0
        return events[live - 1].atime, live


class Windows:
    """A key's request and token windows in one storage (memory, or Redis for a fleet)."""

    def __init__(self, storage: Storage, clock: Callable[[], float] = storage_time) -> None:
        self.storage = storage
        self._moving: MovingWindowSupport = storage  # type: ignore[assignment]
        self._requests = MovingWindowRateLimiter(storage)
        self._clock = clock
        self._items: dict[int, RateLimitItemPerMinute] = {}

    def _item(self, rpm: int) -> RateLimitItemPerMinute:
        item = self._items.get(rpm)
        if item is None:
            item = self._items[rpm] = RateLimitItemPerMinute(rpm, namespace=_NAMESPACE)
        return item

    async def requests(self, key: str, rpm: int) -> Window:
        """The key's request window: room for one more (wait 0), or when there will be."""
        item = self._item(rpm)
        start, used = await self._moving.get_moving_window(item.key_for(key), rpm, WINDOW)
        if used < rpm:
            return Window(rpm, rpm - used, 0.0)
        return Window(rpm, 0, max(0.0, start + WINDOW - self._clock()))

    async def count_request(self, key: str, rpm: int) -> bool:
        """Admit one request into the window; False if another took the last room first."""
        return await self._requests.hit(self._item(rpm), key)

    async def tokens(self, key: str, tpm: int) -> Window:
        """The key's token window: below ``tpm`` (wait 0), or when it will be."""
        start, used = await self._moving.get_moving_window(_tokens_key(key), tpm, WINDOW)
        if used < tpm:
            return Window(tpm, tpm - used, 0.0)
        return Window(tpm, 0, max(0.0, start + WINDOW - self._clock()))

    async def debit(self, key: str, tokens: int) -> bool:
        """Add a finished request's tokens to the key's token window (rule 2)."""
        if tokens <= 0:
            return True
        name = _tokens_key(key)
        for _ in range(_DEBIT_TRIES):
            _, live = await self._moving.get_moving_window(name, _ALL, WINDOW)
            if await self._moving.acquire_entry(name, live + tokens, WINDOW, tokens):
                return True
        return False  # other debits kept landing in between: rare, and only ever under-counts


def _tokens_key(key: str) -> str:
    return f"LIMITER/{_NAMESPACE}/tpm/{key}"

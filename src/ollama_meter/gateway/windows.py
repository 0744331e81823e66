"""The rpm and tpm windows of a key, kept by the ``limits`` library (its moving window).

Rules:
1. rpm: at most ``rpm`` requests of a key admitted in any 60 s (``MovingWindowRateLimiter``,
   a hit of one unit a request). A request is counted when it is admitted, not when it is
   refused.
2. tpm: the tokens Ollama reported for a key's requests that ended in the last 60 s, a hit of
   one unit a token (how ``limits`` weighs a hit). A request is admitted while that sum is
   below ``tpm``; its own tokens are added when it ends, whatever the sum is then (so a window
   overshoots by the last requests' tokens, and the key waits until enough of them age out).
   The debit asks the storage for room for exactly what is live plus what it adds, so that
   the Redis storage, which keeps only the newest ``limit`` units of a window, trims nothing
   that still counts.
3. Both storages answer the same questions: the library's Redis storage looks only at the
   newest ``limit`` units of a window, and ``LimitsMemory`` does the same, so "when does this
   window drop below the limit" is the age of the ``limit``-th newest unit in both.
4. ``LimitsMemory`` gives the answers of the library's memory storage (``MemoryStorage``)
   with rule 3 on top, and no others: ``acquire_entry`` as it is; ``get_moving_window``
   counting at most the newest ``limit`` units, and ``(now, 0)`` for a window with none live
   (where the library gives the time of the oldest entry it still holds, live or not).
   tests/test_windows_equivalence.py runs random calls against both.
5. What differs is the layout. The library keeps a window as a list, newest first, one
   element a unit, and puts each hit at the front: a copy of the whole window a hit, and a
   debit of N tokens N elements. Here a window is kept oldest first, one entry a hit with its
   weight, as two lists side by side: when each entry arrived, and the running total of units
   up to it. A hit is an append; "how many units arrived after t" and "when did the k-th
   newest unit arrive" are a bisect each.
6. Memory: an entry older than the longest expiry any call on its key has given counts for
   no later call (the clock only moves forward; every call on a window gives the same
   expiry, ``WINDOW``, so that is its expiry). Each call on a key drops those from the old
   end of its window: a call that reads the window (``moving_now``, ``live_now``) all of
   them, so that it counts from the front; a call that adds to it (``acquire_now``,
   ``add_now``), which answers the same with them there, once the oldest is ``DROP_LAG``
   past its expiry, so that a busy window drops a second of entries at a time rather than
   one or two a call; the windows of keys nobody calls are swept at most every
   ``SWEEP_EVERY`` seconds, from another key's call, and dropped once empty. Nothing awaits
   between reading and writing a window, so no call needs a lock, a thread or a task.
7. Time is the storage's ``time.time()`` (the Redis storage sends its own clock's time with
   each call): Retry-After compares the window's times with the ``clock`` given here, which
   must be that clock (tests shift both).
8. In one process the windows are asked without awaiting: ``LimitsMemory`` answers each
   question of the library's interface by a plain call as well (``acquire_now``,
   ``moving_now``; ``live_now`` and ``add_now`` for the token window), which
   ``MemoryWindows`` asks, and the limit step too, by the window names it keeps for each
   key. A coroutine a question was most of what the limit step cost a request; the answers
   are the same.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
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
#: Most seconds between two sweeps of the windows nobody calls (rule 6).
SWEEP_EVERY: Final = 10.0
#: A window moves its live entries down to the start of its lists once at least this many
#: have aged out, and at least as many as are live: each move is paid for by as many drops,
#: so an append and a drop stay O(1), amortised.
_SLACK: Final = 64
#: Entries a drop steps over one by one before it bisects.
_STEPS: Final = 8
#: Seconds past its expiry an entry may stay, for the calls that add to a window (rule 6).
DROP_LAG: Final = 1.0


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


class _Moving:
    """One key's window, oldest first (rule 5). Entry ``i``, for ``head <= i``, arrived at
    ``times[i]`` and holds the units from ``ends[i - 1]`` (``base`` for the entry at
    ``head``) up to ``ends[i]``; the entries before ``head`` have aged out."""

    __slots__ = ("base", "ends", "expiry", "head", "times")

    def __init__(self) -> None:
        # Arrays, not lists: an entry is 16 bytes, and no object lives for its minute.
        self.times = array("d")
        #: Units since the window was made, up to and including each entry.
        self.ends = array("q")
        self.head = 0
        #: Units of the entries that have aged out.
        self.base = 0
        #: The longest expiry a call on this key has given (rule 6).
        self.expiry = 0

    def held(self) -> int:
        """Units held, live or not yet dropped."""
        ends = self.ends
        return (ends[-1] if ends else self.base) - self.base

    def drop_before(self, cutoff: float) -> None:
        """Let go of the entries that arrived before ``cutoff``."""
        times = self.times
        head = self.head
        end = len(times)
        if head == end or times[head] >= cutoff:
            return
        # A window that is asked often drops an entry or two a call: a step at a time
        # finds those sooner than a bisect over the whole window does.
        stop = head + _STEPS  # (min and max parse keywords: a call costs more than this)
        if stop > end:
            stop = end
        head += 1
        while head < stop and times[head] < cutoff:
            head += 1
        if head == stop and stop < end:
            head = bisect_left(times, cutoff, head)
        self.base = self.ends[head - 1]
        if head == end:
            del times[:]
            del self.ends[:]
            head = 0
        elif head >= _SLACK and 2 * head >= end:
            del times[:head]
            del self.ends[:head]
            head = 0
        self.head = head

    def after(self, cutoff: float) -> int:
        """Units that arrived after ``cutoff``."""
        ends = self.ends
        if not ends:
            return 0
        head = self.head
        if self.times[head] > cutoff:  # all of them (the window was just dropped to it)
            return ends[-1] - self.base
        first = bisect_right(self.times, cutoff, head)
        return ends[-1] - (ends[first - 1] if first > head else self.base)

    def time_of(self, k: int) -> float:
        """When the ``k``-th newest unit arrived (``1 <= k <= held()``)."""
        return self.times[bisect_right(self.ends, self.ends[-1] - k, self.head)]

    def add(self, now: float, amount: int) -> None:
        ends = self.ends
        self.times.append(now)
        ends.append((ends[-1] if ends else self.base) + amount)


class LimitsMemory(MemoryStorage):
    """The library's memory storage with the moving windows of rule 5, which answer as its
    own with rule 3 (rule 4). Its fixed and sliding window counters are the library's,
    inherited unchanged (nothing here uses them)."""

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions)
        self._windows: dict[str, _Moving] = {}
        self._next_sweep = 0.0
        #: How many sweeps ran (tests).
        self.sweeps = 0

    def entries(self) -> int:
        """Entries held by every moving window, live or not yet dropped (tests; memory)."""
        return sum(len(w.times) - w.head for w in self._windows.values())

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_EVERY
        self.sweeps += 1
        windows = self._windows
        for key, window in list(windows.items()):
            window.drop_before(now - window.expiry)
            if not window.held():
                del windows[key]

    def _window(
        self, key: str, expiry: int, now: float, make: bool, lag: float = 0.0
    ) -> _Moving | None:
        """The key's window (made when ``make``; None if it has none) with what has aged out
        for every call on it dropped, once the oldest entry is ``lag`` past that, and the
        others swept when that is due (rule 6)."""
        if now >= self._next_sweep:
            self._sweep(now)
        window = self._windows.get(key)
        if window is None:
            if not make:
                return None
            window = self._windows[key] = _Moving()
        if expiry > window.expiry:
            window.expiry = expiry
        times = window.times
        cutoff = now - window.expiry
        if window.head < len(times) and times[window.head] < cutoff - lag:
            window.drop_before(cutoff)
        return window

    def acquire_now(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """``acquire_entry``, answered without awaiting (rule 8)."""
        if amount > limit:
            return False
        now = storage_time()
        # Made even when the hit is refused, as the library's storage makes its list.
        window = self._window(key, expiry, now, True, DROP_LAG)
        assert window is not None
        ends = window.ends
        # The library's test: the unit that would be the limit-th newest after the hit.
        k = limit - amount + 1
        last = ends[-1] if ends else window.base
        if last - window.base >= k and window.time_of(k) >= now - expiry:
            return False
        if amount > 0:
            window.times.append(now)
            ends.append(last + amount)
        return True

    def moving_now(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """``get_moving_window``, answered without awaiting (rule 8)."""
        now = storage_time()
        window = self._window(key, expiry, now, False)
        if window is None:
            return now, 0
        live = min(window.after(now - expiry), limit)
        if live <= 0:
            return now, 0
        return window.time_of(live), live

    def live_now(self, key: str, limit: int, expiry: int) -> int:
        """The count of ``moving_now`` alone (no bisect for when its oldest unit arrived)."""
        now = storage_time()
        window = self._window(key, expiry, now, False)
        if window is None:
            return 0
        live = window.after(now - expiry)
        return limit if live > limit else live  # (never negative: a count of units)

    def add_now(self, key: str, amount: int, expiry: int) -> None:
        """``amount`` units into the window whatever it holds: what ``acquire_entry`` with
        ``limit`` = the live units + ``amount`` does (that always has room), in one call."""
        if amount <= 0:
            return
        now = storage_time()
        window = self._window(key, expiry, now, True, DROP_LAG)
        assert window is not None
        window.add(now, amount)

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return self.acquire_now(key, limit, expiry, amount)

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        return self.moving_now(key, limit, expiry)

    async def clear(self, key: str) -> None:
        self._windows.pop(key, None)
        await super().clear(key)

    async def reset(self) -> int | None:
        windows = len(self._windows)
        self._windows.clear()
        return max(windows, await super().reset() or 0)


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


class MemoryWindows(Windows):
    """The windows of one process (``LimitsMemory``), asked without awaiting (rule 8): the
    same answers as ``Windows`` over that storage, by plain calls. The limit step asks
    ``memory`` itself, by the window names ``names`` gives, which it keeps for each key."""

    def __init__(
        self, storage: LimitsMemory | None = None, clock: Callable[[], float] = storage_time
    ) -> None:
        memory = LimitsMemory() if storage is None else storage
        super().__init__(memory, clock)
        self.memory = memory

    def names(self, key: str, rpm: int) -> tuple[str, str]:
        """The names of the key's request window (for ``rpm``) and token window."""
        return self._item(rpm).key_for(key), _tokens_key(key)

    def requests_now(self, key: str, rpm: int) -> Window:
        start, used = self.memory.moving_now(self._item(rpm).key_for(key), rpm, WINDOW)
        if used < rpm:
            return Window(rpm, rpm - used, 0.0)
        return Window(rpm, 0, max(0.0, start + WINDOW - self._clock()))

    def count_request_now(self, key: str, rpm: int) -> bool:
        return self.memory.acquire_now(self._item(rpm).key_for(key), rpm, WINDOW)

    def tokens_now(self, key: str, tpm: int) -> Window:
        start, used = self.memory.moving_now(_tokens_key(key), tpm, WINDOW)
        if used < tpm:
            return Window(tpm, tpm - used, 0.0)
        return Window(tpm, 0, max(0.0, start + WINDOW - self._clock()))

    def debit_now(self, key: str, tokens: int) -> None:
        self.memory.add_now(_tokens_key(key), tokens, WINDOW)

    async def requests(self, key: str, rpm: int) -> Window:
        return self.requests_now(key, rpm)

    async def count_request(self, key: str, rpm: int) -> bool:
        return self.count_request_now(key, rpm)

    async def tokens(self, key: str, tpm: int) -> Window:
        return self.tokens_now(key, tpm)

    async def debit(self, key: str, tokens: int) -> bool:
        self.debit_now(key, tokens)
        return True


def _tokens_key(key: str) -> str:
    return f"LIMITER/{_NAMESPACE}/tpm/{key}"

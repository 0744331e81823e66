"""LimitsMemory against the ``limits`` library's own memory storage (windows.py, rule 4).

The library's ``MemoryStorage`` is the specification: random calls go to it and to
LimitsMemory on one clock, and every answer must be the same (booleans, counts, times), with
rule 3 on top. Rule 3 is where LimitsMemory has always departed from the library: its
``get_moving_window`` counts at most the newest ``limit`` units, and gives ``(now, 0)`` for
a window with none live. The reference below is the library's storage with only that
question answered by rule 3 (a plain loop over the library's own list), and every answer
of the library's unchanged question is held to it as well, so the departure is exactly
those two cases.

The clock: a grid of 1/8 s from 2**30 s, so that every sum and difference of times is exact
and both storages see the same floats. It only moves forward, as the library assumes. Each
key has one expiry for all its calls, as a limit item's key names its window.

The library's sweep (its ``__expire_events``) runs only where a step says so: a task it
starts itself needs the loop, and nothing here yields to it. It drops an entry when its
expiry is at or before the clock, while its ``acquire_entry`` still counts that entry at that
very instant; a sweep step at such an instant is left out (the library never promises to
sweep at a given moment), so that what the sweep does is only what it is for: free memory.
The count ``reset`` returns is not compared (the library counts the keys its sweep has not
dropped yet, LimitsMemory the windows its own has not); every answer after a reset is.
"""

from __future__ import annotations

import asyncio
import types
from unittest import mock

from hypothesis import example, given, settings
from hypothesis import strategies as st
from limits.aio.storage import MemoryStorage, memory

from ollama_meter.gateway.windows import DROP_LAG, SWEEP_EVERY, LimitsMemory

KEYS = ("a", "b", "c")
EXPIRIES = (1, 2, 5, 60)
#: The clock's grid and start: every time, sum and difference an exact float.
TICK = 1 / 8
START = float(2**30)

Op = tuple[str, int, int, int]

#: What a step does, as often as it is listed: mostly hits and looks on a clock that moves by
#: fractions of a second; often onto the edge of a key's window (an entry arrived exactly
#: its expiry ago, which the library counts in ``acquire_entry``, ``>=``, and not in
#: ``get_moving_window``, ``>``); now and then a leap past every window, the library's
#: sweep, a clear, a reset. A debit adds units whatever the window holds.
KINDS = (
    *["acquire"] * 6,
    *["window"] * 4,
    *["debit"] * 2,
    *["advance"] * 3,
    *["edge"] * 2,
    "leap",
    "sweep",
    "clear",
    "reset",
)
#: The limits a look asks with (the debit's ``_ALL`` among them).
LOOK_LIMITS = (0, 1, 2, 3, 4, 5, 8, 13, 1 << 31)
#: A step: what, on which key, and two numbers: for a hit its limit and amount (above the
#: limit too: refused before anything), for a look its limit (an index in LOOK_LIMITS), for
#: a move of the clock its ticks.
STEPS = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(0, 2), st.integers(0, 8), st.integers(0, 9)),
    min_size=10,
    max_size=200,
)


def by_rule_3(
    stock: MemoryStorage, key: str, limit: int, expiry: int, now: float
) -> tuple[float, int]:
    """The library's list, newest first, read by rule 3: the live units among the newest
    ``limit``, and when the oldest of those arrived; ``(now, 0)`` if none is live."""
    events = stock.events.get(key, [])
    live = 0
    for entry in events[: max(0, limit)]:
        if entry.atime <= now - expiry:
            break
        live += 1
    return (events[live - 1].atime, live) if live else (now, 0)


async def run(ops: list[Op], expiries: list[int]) -> list[object]:
    stock, ours = MemoryStorage(), LimitsMemory()
    now = [START]
    answers: list[object] = []
    clock = types.SimpleNamespace(time=lambda: now[0])
    with mock.patch.object(memory, "time", clock):
        for op, index, a, b in ops:
            key = KEYS[index]
            expiry = expiries[index]
            if op == "acquire":
                theirs = await stock.acquire_entry(key, a, expiry, b)
                mine = await ours.acquire_entry(key, a, expiry, b)
                assert mine == theirs, (op, key, a, b, now[0])
                answers.append(mine)
            elif op == "window":
                limit = LOOK_LIMITS[a]
                expected = by_rule_3(stock, key, limit, expiry, now[0])
                plain = await stock.get_moving_window(key, limit, expiry)
                mine_window = await ours.get_moving_window(key, limit, expiry)
                assert mine_window == expected, (op, key, limit, now[0])
                assert ours.live_now(key, limit, expiry) == expected[1]
                # The library's own answer, where rule 3 leaves it as it is.
                if 0 < plain[1] <= limit:
                    assert plain == expected
                elif plain[1] > limit:
                    assert expected[1] == limit
                else:
                    assert expected == (now[0], 0)
                answers.append(mine_window)
            elif op == "debit":
                # The library's way to add units whatever the window holds: room for exactly
                # the ones its hit counts (arrived at or after ``expiry`` ago) and these.
                events = stock.events.get(key, [])
                live = sum(1 for e in events if e.atime >= now[0] - expiry)
                assert await stock.acquire_entry(key, live + b, expiry, b) or b == 0
                ours.add_now(key, b, expiry)
            elif op == "advance":
                now[0] += b * TICK
            elif op == "edge":
                # Onto the edge of the key's window: the a-th newest unit arrived exactly
                # ``expiry`` ago (if the clock has not gone past that already).
                events = stock.events.get(key, [])
                if events:
                    now[0] = max(now[0], events[min(a, len(events) - 1)].atime + expiry)
            elif op == "leap":
                now[0] += 61 + b
            elif op == "sweep":
                held = [e.expiry for events in stock.events.values() for e in events]
                if now[0] not in held:  # the library's own scheduling, then its task
                    await stock._MemoryStorage__schedule_expiry()  # type: ignore[attr-defined]
                    if stock.timer is not None:
                        await stock.timer
            elif op == "clear":
                await stock.clear(key)
                await ours.clear(key)
            else:
                await stock.reset()
                await ours.reset()
                assert ours.entries() == 0
            if op == "window" or (op == "acquire" and b <= a):
                # Rule 6: a call on a key (past the library's first refusal, amount > limit,
                # which looks at nothing) leaves no entry in its window that has aged out:
                # none at all when it reads the window, none past DROP_LAG when it adds.
                window = ours._windows.get(key)
                lag = 0.0 if op == "window" else DROP_LAG
                if window is not None and window.held():
                    assert window.times[window.head] >= now[0] - expiry - lag
    return answers


@settings(max_examples=250, deadline=None)
@example(  # an older entry dropped and one exactly on the edge kept, by the same call
    ops=[
        ("acquire", 0, 2, 1),
        ("advance", 0, 0, 1),
        ("acquire", 0, 2, 1),
        ("edge", 0, 0, 0),
        ("acquire", 0, 2, 2),
        ("window", 0, 2, 0),
    ],
    expiries=[5, 5, 5],
)
@given(
    ops=STEPS,
    expiries=st.lists(st.sampled_from(EXPIRIES), min_size=len(KEYS), max_size=len(KEYS)),
)
def test_every_answer_is_the_librarys(ops: list[Op], expiries: list[int]) -> None:
    asyncio.run(run(ops, expiries))


def steps(n: int, advance: int) -> list[Op]:
    """A busy key: ``n`` rounds of a look, a hit of 3 units and a move of the clock."""
    ops: list[Op] = []
    for i in range(n):
        ops.append(("window", i % 3, 6, 0))  # limit 8
        ops.append(("acquire", i % 3, 8, 1 + i % 4))
        ops.append(("advance", 0, 0, advance))
    return ops


def test_busy_windows_fill_refuse_and_drain() -> None:
    """A fixed run that reaches every case (not left to the draw): full windows refuse, the
    count is capped by rule 3, and windows drain as the clock moves."""
    answers = asyncio.run(run(steps(300, 3), [5, 5, 60]))
    assert True in answers
    assert False in answers
    counts = [a[1] for a in answers if isinstance(a, tuple)]
    assert 8 in counts
    assert 0 in counts


async def test_a_debit_is_one_entry_of_its_weight() -> None:
    storage = LimitsMemory()
    assert await storage.acquire_entry("k", 1_000_000, 60, 999_999)
    assert storage.entries() == 1
    assert (await storage.get_moving_window("k", 1_000_000, 60))[1] == 999_999
    assert not await storage.acquire_entry("k", 1_000_000, 60, 2)
    assert await storage.acquire_entry("k", 1_000_000, 60, 1)
    assert storage.entries() == 2
    assert await storage.reset() == 1  # the library's count: windows (and counters) held
    assert storage.entries() == 0


async def test_aged_out_entries_go_at_the_keys_next_call_or_the_sweep() -> None:
    now = [START]
    with mock.patch.object(memory, "time", types.SimpleNamespace(time=lambda: now[0])):
        storage = LimitsMemory()
        for _ in range(1000):
            assert await storage.acquire_entry("busy", 10**6, 60)
            assert await storage.acquire_entry("idle", 10**6, 60)
            now[0] += 0.001
        assert storage.entries() == 2000
        now[0] = START + 55  # a call sweeps: nothing has aged out yet
        assert (await storage.get_moving_window("busy", 10**6, 60))[1] == 1000
        sweeps = storage.sweeps
        now[0] = START + 62  # everything has, and the next sweep is not due
        assert await storage.acquire_entry("busy", 10**6, 60)
        assert storage.sweeps == sweeps
        window = storage._windows["busy"]
        assert (len(window.times), window.head) == (1, 0)  # busy's call dropped its own
        assert storage.entries() == 1001  # idle's wait for the sweep
        now[0] = START + 55 + SWEEP_EVERY
        assert (await storage.get_moving_window("busy", 10, 60))[1] == 1
        assert storage.sweeps == sweeps + 1
        assert "idle" not in storage._windows
        assert storage.entries() == 1


async def test_a_window_moves_its_live_entries_down_once_enough_have_aged_out() -> None:
    """Dropped entries are first only passed over; the lists are cut once there are as many
    of them as live ones (and at least 64), so each entry is moved O(1) times."""
    now = [START]
    with mock.patch.object(memory, "time", types.SimpleNamespace(time=lambda: now[0])):
        storage = LimitsMemory()
        for _ in range(10_000):
            assert await storage.acquire_entry("k", 10**6, 60)
            now[0] += 0.01  # 100 a second: 6,000 live at a time
            window = storage._windows["k"]
            assert window.head <= max(64, len(window.times) - window.head)
            assert window.times[window.head] >= now[0] - 60 - 0.01 - DROP_LAG
        assert 5_900 <= storage.entries() <= 6_101  # and a second of them, DROP_LAG past
        assert len(window.times) <= 12_202

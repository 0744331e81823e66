"""The status page's rings against a plain reading: keep every record, sum what is in range."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ollama_meter.status.recorder import Ring, derive, quantile

# (steps forward, value) pairs: a ring of 8 steps with a window of 3, moved on by 0 to 20
# steps between records (past the ring's length too), read after each one.
_MOVES = st.lists(st.tuples(st.integers(0, 20), st.integers(1, 9)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(_MOVES, st.integers(0, 5))
def test_a_ring_sums_exactly_the_steps_in_range(moves: list[tuple[int, int]], start: int) -> None:
    ring = Ring(points=8, size=2, window=3)
    kept: list[tuple[int, int]] = []
    step = start
    for forward, value in moves:
        step += forward
        slot = ring.at(step)
        slot[0] += 1
        slot[1] += value
        kept.append((step, value))
        for read in (step, step + 1, step + 4):  # a reader may be later than the last record
            in_ring = [v for s, v in kept if read - 8 < s <= read]
            in_window = [v for s, v in kept if read - 3 < s <= read]
            assert ring.total(read) == [len(in_ring), sum(in_ring)]
            assert ring.last(read) == [len(in_window), sum(in_window)]
        step = ring.newest  # (the ring has moved on to the last read)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 5)), min_size=1, max_size=40))
def test_a_history_is_each_step_on_its_own(moves: list[tuple[int, int]]) -> None:
    ring = Ring(points=6, size=22, window=2)
    kept: dict[int, int] = {}
    step = 0
    for forward, count in moves:
        step += forward
        ring.at(step)[0] += count
        kept[step] = kept.get(step, 0) + count
        history = ring.history(step, 5.0)
        assert [p.requests_per_second for p in history] == [
            round(kept.get(s, 0) / 5.0, 4) for s in range(step - 5, step + 1)
        ]


def test_a_step_back_in_time_counts_in_the_newest() -> None:
    ring = Ring(points=4, size=1, window=2)
    ring.at(10)[0] += 1
    ring.at(9)[0] += 1  # the wall clock stepped back a little
    assert ring.newest == 10
    assert ring.total(10) == [2]


def test_a_longer_step_back_starts_the_ring_again() -> None:
    """Else every step until the clock is back at the newest would pile into that one."""
    ring = Ring(points=4, size=22, window=2)  # (a model's slot: history derives it)
    ring.at(10)[0] += 1
    assert ring.history(10, 1.0)[-1].requests_per_second == 1.0
    ring.at(20)[0] += 1  # forward past the ring's length: started again
    ring.at(7)[0] += 1  # and back: started again at 7
    assert ring.newest == 7
    assert ring.total(7)[0] == 1
    ring.at(8)[0] += 2
    assert ring.last(8)[0] == 3
    assert [p.requests_per_second for p in ring.history(8, 1.0)] == [0.0, 0.0, 1.0, 2.0]


def test_quantiles_interpolate_inside_their_bucket() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert quantile(0.5, [0, 0, 0, 0], bounds) is None
    assert quantile(0.5, [0, 10, 0, 0], bounds) == 1.5  # half way into (1, 2]
    assert quantile(0.25, [10, 10, 0, 0], bounds) == 0.5
    assert quantile(0.95, [0, 0, 0, 5], bounds) == 4.0  # +Inf: the highest finite bound
    slot = [4, 0, 12, 2_000_000, 12] + [0] * 17
    point = derive(slot, 60.0)
    assert point.completion_tokens_per_second == 0.2
    assert point.generation_tokens_per_second == 6.0  # 12 tokens in 2 s of Ollama's eval
    assert point.ttft_p50_seconds is None  # no streamed request among them

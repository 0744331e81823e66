"""The status page's memory of recent traffic: what the record step saw, in fixed rings.

Rules:
1. Per model (the metrics' model label, so the set is bounded by ``--max-models``) and for all
   models together, a ring of ``POINTS`` steps of ``STEP`` seconds (15 minutes): requests,
   prompt and completion tokens, Ollama's ``eval_duration`` with the completion tokens it
   covers, and a histogram of time to first token (streamed inference only, the buckets of
   ``time_to_first_token_seconds``). A slot is reset when a request lands in it for a new step,
   so memory is fixed per model and nothing expires on a timer.
2. Per key (the key label the metrics use, ``anonymous`` for clients without one), a ring of
   ``KEY_POINTS`` one-minute steps: requests, tokens, and refusals (answers the proxy gave
   itself with a status of 400 or more).
3. The last ``PROBLEMS`` errors and refusals, as fixed fields: route template, model label,
   key label, upstream name, a fixed reason word and the status. Never a path, a header or a
   byte of a prompt or a completion.
4. ``record`` runs on the event loop once per request and does no more than a few dict and
   list updates; everything derived (rates, percentiles, sorting) is worked out when a reader
   asks (``snapshot.py``), and a closed step's derived values are kept, since it never changes.
5. Time is a wall clock passed in (Unix seconds): the page plots against it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from operator import add, sub
from typing import Final, NamedTuple

from ..exchange import Exchange
from ..metrics import TTFT_BUCKETS

STEP: Final = 5
POINTS: Final = 180  # 15 minutes
WINDOW_STEPS: Final = 12  # the "now" values: the last 60 s
KEY_STEP: Final = 60
KEY_POINTS: Final = 60  # an hour
PROBLEMS: Final = 20
#: Rates and times are rounded to this many decimals (0.1 ms; a histogram's quantile is an
#: estimate to begin with): a third of the size of the page's every answer is digits.
DECIMALS: Final = 4

# Slot layout of a model ring: counters, then the TTFT histogram (its last bucket is +Inf).
_REQUESTS, _PROMPT, _COMPLETION, _EVAL_SECONDS, _EVAL_TOKENS = range(5)
_TTFT: Final = 5
_SLOT_SIZE: Final = _TTFT + len(TTFT_BUCKETS) + 1
# Slot layout of a key ring.
_K_REQUESTS, _K_PROMPT, _K_COMPLETION, _K_REFUSALS = range(4)


class Problem(NamedTuple):
    time: float
    route: str
    model: str
    key: str | None
    upstream: str | None
    reason: str
    status: int


class Point(NamedTuple):
    """A step's (or a window's) derived values; None where it had nothing to measure."""

    requests_per_second: float
    completion_tokens_per_second: float
    ttft_p50_seconds: float | None
    ttft_p95_seconds: float | None
    generation_tokens_per_second: float | None


class Ring:
    """The last ``points`` steps of one model (or of all, or of a key), up to ``newest``.

    Slot ``step % points`` holds step ``step``, or None while nothing came in it (a quiet
    model costs no memory for its quiet steps). Moving to a later step empties the slots it
    passes, so every slot is one of the last ``points`` steps, and keeps two running sums of
    the closed steps: of the whole ring, and of the last ``window`` of them. Reading a total
    or a window is then one addition of the step under way, whatever the ring's length (the
    page reads every model's ring on every poll)."""

    __slots__ = (
        "_history", "_points", "closed", "closed_window", "newest", "size", "slots", "window"
    )  # fmt: skip

    def __init__(self, points: int = POINTS, size: int = _SLOT_SIZE, window: int = WINDOW_STEPS):
        self.newest = -1
        self.size = size
        self.slots: list[list[int] | None] = [None] * points
        self.window = window
        self.closed = [0] * size
        self.closed_window = [0] * size
        self._history: tuple[int, list[Point]] | None = None
        self._points: list[tuple[int, Point] | None] = [None] * points

    def at(self, step: int) -> list[int]:
        """The slot of ``step`` to add to, the ring moved on to it first. The step before the
        newest (the wall clock stepped back a little) counts in the newest; an earlier one
        (stepped back further) starts the ring again there, as a jump forward past its length
        does: else everything until the clock caught up would pile into one step, and read as
        many times the real rate."""
        index = self._now(step)
        slot = self.slots[index]
        if slot is None:
            slot = self.slots[index] = [0] * self.size
        return slot

    def _now(self, step: int) -> int:
        newest = self.newest
        if step > newest:
            self._move(newest, step)
            newest = step
        elif step < newest - 1:
            self._move(-1, step)
            newest = step
        return newest % len(self.slots)

    def _move(self, newest: int, step: int) -> None:
        slots, points = self.slots, len(self.slots)
        self.newest = step
        if newest < 0 or step - newest >= points:
            slots[:] = [None] * points
            self.closed = [0] * self.size
            self.closed_window = [0] * self.size
            # (After a step back, steps come again: what was worked out for them is not theirs.)
            self._history = None
            self._points = [None] * points
            return
        closed, closed_window, window = self.closed, self.closed_window, self.window
        for moment in range(newest + 1, step + 1):
            ending = slots[(moment - 1) % points]  # the step before closes
            if ending is not None:
                closed[:] = map(add, closed, ending)
                closed_window[:] = map(add, closed_window, ending)
            index = moment % points
            leaving = slots[index]  # the step ``points`` before leaves the ring
            if leaving is not None:
                closed[:] = map(sub, closed, leaving)
                slots[index] = None
            if window >= points:
                closed_window[:] = closed
                continue
            gone = slots[(moment - window) % points]  # and the step ``window`` before, the window
            if gone is not None:
                closed_window[:] = map(sub, closed_window, gone)

    def total(self, step: int) -> list[int]:
        """Sums over the whole ring, as of ``step``."""
        current = self.slots[self._now(step)]
        return list(self.closed if current is None else map(add, self.closed, current))

    def last(self, step: int) -> list[int]:
        """Sums over the last ``window`` steps, as of ``step``."""
        current = self.slots[self._now(step)]
        window = self.closed_window
        return list(window if current is None else map(add, window, current))

    def history(self, step: int, step_seconds: float) -> list[Point]:
        """One Point per step, oldest first, up to ``step``. A closed step's point is worked
        out once (it never changes again); the list of them is kept until the step changes,
        so a read in the same step works out only the last point."""
        current = self.slots[self._now(step)]
        cached = self._history
        if cached is None or cached[0] != step:
            slots, kept, points = self.slots, self._points, len(self.slots)
            closed = []
            for moment in range(step - points + 1, step):
                index = moment % points
                slot = slots[index]
                if slot is None:
                    closed.append(_EMPTY)
                    continue
                point = kept[index]
                if point is None or point[0] != moment:
                    point = kept[index] = (moment, derive(slot, step_seconds))
                closed.append(point[1])
            cached = self._history = (step, closed)
        return [*cached[1], _EMPTY if current is None else derive(current, step_seconds)]


#: A step without requests: none a second, and nothing to measure a time or a speed of.
_EMPTY: Final = Point(0.0, 0.0, None, None, None)


def derive(slot: list[int], seconds: float) -> Point:
    """A slot (or a merged window) as rates and percentiles."""
    requests = slot[_REQUESTS]
    if not requests:
        return _EMPTY
    histogram = slot[_TTFT:]
    eval_seconds = slot[_EVAL_SECONDS]  # microseconds
    p50, p95 = quantile(0.5, histogram), quantile(0.95, histogram)
    return Point(
        round(requests / seconds, DECIMALS),
        round(slot[_COMPLETION] / seconds, DECIMALS),
        None if p50 is None else round(p50, DECIMALS),
        None if p95 is None else round(p95, DECIMALS),
        round(slot[_EVAL_TOKENS] * 1e6 / eval_seconds, DECIMALS) if eval_seconds > 0 else None,
    )


def quantile(q: float, counts: list[int], bounds: tuple[float, ...] = TTFT_BUCKETS) -> float | None:
    """The q-quantile of a histogram with these upper bounds (and a last +Inf bucket), by
    linear interpolation inside the bucket that holds it, as Prometheus' histogram_quantile
    does; a quantile in the +Inf bucket is the highest finite bound."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index == len(bounds):
                return bounds[-1]
            lower = bounds[index - 1] if index else 0.0
            return lower + (bounds[index] - lower) * (rank - seen) / count
        seen += count
    return bounds[-1]


class Recorder:
    """What the record step hands the status page (rules 1-4)."""

    def __init__(
        self,
        key_label: Callable[[str | None], str],
        clock: Callable[[], float],
        keys_on: bool,
    ) -> None:
        self.models: dict[str, Ring] = {}
        self.total = Ring()
        self.keys: dict[str, Ring] = {}
        self.problems: deque[Problem] = deque(maxlen=PROBLEMS)
        self._key_label = key_label
        self._keys_on = keys_on
        self.clock = clock

    def record(self, x: Exchange) -> None:
        now = self.clock()
        step = int(now // STEP)
        ring = self.models.get(x.model)
        if ring is None:
            ring = self.models[x.model] = Ring()
        # (Ring.at, its common case inline: this runs once a request.)
        slot = ring.slots[step % POINTS] if ring.newest == step else None
        if slot is None:
            slot = ring.at(step)
        total = self.total.slots[step % POINTS] if self.total.newest == step else None
        if total is None:
            total = self.total.at(step)
        slot[_REQUESTS] += 1
        total[_REQUESTS] += 1
        prompt = completion = 0
        usage = x.usage
        if usage is not None:
            if usage.tokens_reported:
                prompt, completion = usage.prompt_tokens, usage.completion_tokens
                slot[_PROMPT] += prompt
                slot[_COMPLETION] += completion
                total[_PROMPT] += prompt
                total[_COMPLETION] += completion
            eval_seconds = usage.eval_seconds
            if eval_seconds > 0 and completion:
                # (In microseconds, so that a slot holds only ints.)
                micros = int(eval_seconds * 1e6)
                slot[_EVAL_SECONDS] += micros
                slot[_EVAL_TOKENS] += completion
                total[_EVAL_SECONDS] += micros
                total[_EVAL_TOKENS] += completion
        first_byte = x.first_byte
        if first_byte is not None and x.streamed and x.inference:
            bucket = _TTFT + bisect_left(TTFT_BUCKETS, first_byte - x.started)
            slot[bucket] += 1
            total[bucket] += 1
        key = self._key_label(x.key)
        keys = self.keys.get(key)
        if keys is None:
            keys = self.keys[key] = Ring(KEY_POINTS, 4, KEY_POINTS)
        minute = int(now // KEY_STEP)
        counts = keys.slots[minute % KEY_POINTS] if keys.newest == minute else None
        if counts is None:
            counts = keys.at(minute)
        counts[_K_REQUESTS] += 1
        if completion or prompt:
            counts[_K_PROMPT] += prompt
            counts[_K_COMPLETION] += completion
        if x.status >= 400 or x.error is not None:
            refused = x.refused
            if refused is not None:
                counts[_K_REFUSALS] += 1
            self.problems.appendleft(
                Problem(
                    now,
                    x.endpoint,
                    x.model,
                    key if self._keys_on else None,
                    None if x.target is None else x.target.node.name,
                    x.error or refused or f"http_{x.status}",
                    x.status,
                )
            )

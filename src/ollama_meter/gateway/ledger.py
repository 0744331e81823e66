"""The usage ledger's rollup in memory: every recorded request adds to one hourly row.

Rules:
1. A row is keyed by (hour, key, team, model, endpoint, upstream, status class) and holds
   requests, errors (one column per reason of exchange.ERROR_REASONS, and any status >= 400),
   prompt and completion tokens and the three durations: exactly what the metrics got
   (the Exchange's ``usage``, ``model`` label and ``error``).
2. ``add`` is the hot path: a tuple, one dictionary lookup and a few additions on the event
   loop's thread. No I/O, no lock: the writer (ledger_writer.py) takes the rows on the same
   thread and hands them to its store thread.
3. Bounded: at most ``max_rows`` rows are pending. Rows a failed flush gives back go before
   the new ones; past the bound, the oldest are dropped and counted, never silently lost.
4. The clock is a parameter (wall-clock seconds): the hour of a request is when it ended.

It knows nothing of SQL, threads or HTTP.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Final, NamedTuple

from ..exchange import ERROR_REASONS, Exchange
from .identity import ANONYMOUS
from .usage import status_class

#: The upstream label with one upstream (GATEWAY.md section 5).
DEFAULT_UPSTREAM: Final = "default"
HOUR: Final = 3600

#: The numbers of a row, in this order, after its key.
COUNTS: Final = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "prompt_eval_seconds",
    "eval_seconds",
    "load_seconds",
    *(f"errors_{reason}" for reason in ERROR_REASONS),
)
_REASON_COLUMN: Final = {reason: 7 + n for n, reason in enumerate(ERROR_REASONS)}


class RowKey(NamedTuple):
    hour: int  # Unix seconds at the start of the hour (UTC)
    key: str
    team: str
    model: str
    endpoint: str
    upstream: str
    status_class: str


#: A row: its key, and COUNTS' values (the request and token counts are whole numbers).
Row = tuple[RowKey, list[float]]


class Rollup:
    """The rows not yet in the store."""

    __slots__ = ("_clock", "_rows", "_unrouted", "dropped", "max_rows")

    def __init__(
        self, max_rows: int, clock: Callable[[], float] = time.time, fleet: bool = False
    ) -> None:
        self.max_rows = max_rows
        self._clock = clock
        # The upstream of a request that went to none: with one upstream it is that one
        # ("default"); in a fleet, a request refused before routing went nowhere ("").
        self._unrouted = "" if fleet else DEFAULT_UPSTREAM
        # Ordered: the oldest rows are the first to go when the bound is hit (popitem is O(1)).
        self._rows: OrderedDict[RowKey, list[float]] = OrderedDict()
        #: Rows dropped because the bound was hit (ledger_dropped_rows_total).
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, x: Exchange) -> None:
        target = x.target
        key = RowKey(
            int(self._clock()) // HOUR * HOUR,
            x.key or ANONYMOUS,
            x.team or "",
            x.model,
            x.endpoint,
            self._unrouted if target is None else target.node.name,
            status_class(x.status),
        )
        row = self._rows.get(key)
        if row is None:
            if len(self._rows) >= self.max_rows:
                self._drop(len(self._rows) - self.max_rows + 1)
            row = [0.0] * len(COUNTS)
            self._rows[key] = row
        row[0] += 1
        error = x.error
        if error is not None:
            row[1] += 1
            row[_REASON_COLUMN[error]] += 1
        elif x.status >= 400:
            row[1] += 1
        usage = x.usage
        if usage is not None:
            if usage.tokens_reported:
                row[2] += usage.prompt_tokens
                row[3] += usage.completion_tokens
            row[4] += usage.prompt_eval_seconds
            row[5] += usage.eval_seconds
            if usage.load_seconds is not None:
                row[6] += usage.load_seconds

    def take(self) -> list[Row]:
        """Every pending row, oldest first; the rollup starts empty. The rows are the
        rollup's own lists, handed over (cheap on the loop: no copy of the numbers)."""
        rows, self._rows = self._rows, OrderedDict()
        return list(rows.items())

    def give_back(self, rows: Iterable[Row]) -> None:
        """Rows a flush could not write: kept before the newer ones, within the bound."""
        newer, self._rows = self._rows, OrderedDict()
        for key, counts in rows:
            self._rows[key] = counts
        for key, counts in newer.items():
            kept = self._rows.get(key)
            if kept is None:
                self._rows[key] = counts
            else:
                self._rows[key] = [a + b for a, b in zip(kept, counts, strict=True)]
        excess = len(self._rows) - self.max_rows
        if excess > 0:
            self._drop(excess)

    def _drop(self, count: int) -> None:
        for _ in range(min(count, len(self._rows))):
            self._rows.popitem(last=False)
        self.dropped += count

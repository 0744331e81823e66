"""The ledger's writer: moves the rollup's rows to the store, off the event loop.

Rules:
1. Every ``interval`` seconds the rows in memory are taken on the event loop's thread and
   written by the store on the writer's one thread: the loop never waits on a disk or a
   network, and a request never waits on the writer.
2. A write that fails gives its rows back to the rollup (bounded there), is counted, logged
   once until a write succeeds again, and retried with a doubling delay (up to a minute):
   whether the store is down or became unusable while running (a newer replica migrated a
   shared schema), a flush never raises, so the timer never dies.
3. ``close`` (at shutdown, after the requests in flight were recorded) writes what is left:
   SIGTERM loses nothing that the store takes.
4. Rows older than ``keep`` are deleted at the first write and then once a day.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

from .ledger import HOUR, Rollup
from .ledger_store import LedgerError, Store, StoreDown

log = logging.getLogger(__name__)
T = TypeVar("T")

# A failing store is tried every minute at least: the alert OllamaMeterLedgerFlushFailing
# looks for failures in any 2 minutes.
_MAX_BACKOFF: Final = 60.0
_PRUNE_EVERY: Final = 86400.0


class LedgerWriter:
    def __init__(
        self,
        rollup: Rollup,
        store: Store,
        replica: str,
        interval: float,
        keep: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rollup = rollup
        self.store = store
        self.replica = replica
        self.interval = interval
        self._keep = keep
        self._clock = clock
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="ollama-meter-ledger")
        self._stop = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._failing = False
        self._next_prune = 0.0
        #: For the metrics (ledger_metrics.py).
        self.flushes = {"ok": 0, "error": 0}
        self.write_errors = 0
        self.last_flush = 0.0

    async def _in_thread(self, work: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)

    async def start(self) -> None:
        """Open the store (its schema migrated). A store that is down now is retried by
        the writes; one that cannot be used raises LedgerError."""
        try:
            await self._in_thread(self.store.open)
        except StoreDown as exc:
            self._failed(exc)

    async def run(self) -> None:
        """Flush every interval (longer after failures) until ``close``."""
        delay = self.interval
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                return
            ok = await self.flush()
            delay = self.interval if ok else min(max(delay, self.interval) * 2, _MAX_BACKOFF)

    async def flush(self) -> bool:
        """Write the pending rows; False if the store did not take them (they stay).

        One flush at a time: the last one (``close``) waits for the timer's to end, so that
        rows a failed flush gives back are in the last one, not left behind."""
        async with self._flushing:
            return await self._flush()

    async def _flush(self) -> bool:
        rows = self.rollup.take()
        if rows:
            try:
                await self._in_thread(self.store.add, rows, self.replica)
            except LedgerError as exc:  # down, or unusable since (a newer replica migrated it)
                self.rollup.give_back(rows)
                self.flushes["error"] += 1
                self._failed(exc)
                return False
            self.flushes["ok"] += 1
            self.last_flush = self._clock()
            log.debug("ledger: %d rows written to %s", len(rows), self.store.where)
            if self._failing:
                self._failing = False
                log.info(
                    "ledger: %s takes writes again (%d rows written)", self.store.where, len(rows)
                )
        await self._prune()
        return True

    async def _prune(self) -> None:
        now = self._clock()
        if now < self._next_prune:
            return
        self._next_prune = now + _PRUNE_EVERY
        before = int(now - self._keep) // HOUR * HOUR
        try:
            pruned = await self._in_thread(self.store.prune, before)
        except LedgerError as exc:
            self._next_prune = now  # again at the next flush
            self._failed(exc)
            return
        if pruned:
            log.info("ledger: %d rows older than the retention deleted", pruned)

    def _failed(self, exc: LedgerError) -> None:
        self.write_errors += 1
        if not self._failing:
            self._failing = True
            log.warning(
                "ledger: cannot write to %s (%s); rows are kept in memory (at most %d) and retried",
                self.store.where,
                exc,
                self.rollup.max_rows,
            )

    async def report(self, since: int, until: int, key: str | None, make: Callable[[Any], T]) -> T:
        """A report of the stored rows, read and made (summed, written) on the writer's
        thread: a year of hourly rows is seconds of work the event loop must not do."""
        result: T = await self._in_thread(lambda: make(self.store.rows(since, until, key)))
        return result

    async def close(self) -> None:
        """Stop the timer, write what is left, close the store."""
        self._stop.set()
        if not await self.flush():
            log.error(
                "ledger: %d rows could not be written to %s at shutdown",
                len(self.rollup),
                self.store.where,
            )
        await self._in_thread(self.store.close)
        self._thread.shutdown(wait=False)  # its last job is done: nothing to wait for

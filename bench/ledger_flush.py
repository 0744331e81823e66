"""How long the usage ledger takes to flush 10,000 rows to SQLite: ``python
bench/ledger_flush.py [--rows N] [--rounds N] [--dir DIR]``.

Each round writes ``rows`` distinct hourly rows (keys x models x routes) into a fresh file
(inserts), then the same rows again (upserts adding to them), timing the store's ``add`` as
the ledger's writer thread calls it: one transaction per flush; and once, what the event loop
does of a flush of that many rows (taking them out of the rollup). The file is in ``--dir`` (the
system's temporary directory by default: put it on the disk the ledger will use). Prints one
JSON line per round and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from ollama_meter.exchange import Exchange
from ollama_meter.gateway.ledger import Rollup, Row
from ollama_meter.gateway.ledger_store import SqliteStore
from ollama_meter.ollama import Usage

ROUTES = ("/api/chat", "/api/generate", "/v1/chat/completions", "/api/embed")


def rows(count: int) -> list[Row]:
    """``count`` distinct rows of one hour, as the rollup makes them."""
    rollup = Rollup(count, clock=lambda: 1_764_000_000.0)
    usage = Usage(120, 340, 0.05, 1.2, 0.01)
    n = 0
    while len(rollup) < count:
        key, model, route = n // 400, (n // 4) % 100, ROUTES[n % 4]
        x = Exchange("POST", route, 0.0, model=f"model-{model}", status=200, usage=usage)
        x.key, x.team = f"key-{key}", "team"
        rollup.add(x)
        n += 1
    return rollup.take()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    batch = rows(args.rows)
    # What the event loop does of a flush: take the rows out of the rollup.
    rollup = Rollup(args.rows)
    rollup.give_back(batch)
    started = time.perf_counter()
    rollup.take()
    take_s = time.perf_counter() - started
    inserts: list[float] = []
    upserts: list[float] = []
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory(dir=args.dir) as where:
            store = SqliteStore(Path(where) / "usage.sqlite")
            store.open()
            for times in (inserts, upserts):
                started = time.perf_counter()
                store.add(batch, "bench")
                times.append(time.perf_counter() - started)
            store.close()
        print(json.dumps({"round": round_ + 1, "insert_s": inserts[-1], "upsert_s": upserts[-1]}))
    print(
        json.dumps(
            {
                "rows": args.rows,
                "take_on_the_loop_s": take_s,
                "median_insert_s": statistics.median(inserts),
                "median_upsert_s": statistics.median(upserts),
                "max_s": max(inserts + upserts),
            }
        )
    )


if __name__ == "__main__":
    main()

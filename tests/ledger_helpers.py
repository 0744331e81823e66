"""Reading a ledger in tests: its stored rows summed per (key, model), straight from the store."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ollama_meter.gateway.ledger_report import summarise
from ollama_meter.gateway.ledger_store import SqliteStore, Store

ALL_TIME = (0, 2**40)


def totals(
    store: Store, by: tuple[str, ...] = ("key", "model")
) -> dict[tuple[str, ...], dict[str, float]]:
    """The report's rows of the whole ledger, keyed by their ``by`` values."""
    report = summarise(store.rows(*ALL_TIME, None), *ALL_TIME, by)
    return {tuple(row[n] for n in by): row for row in report.rows}


def sqlite_totals(
    path: Path, by: tuple[str, ...] = ("key", "model")
) -> dict[tuple[str, ...], dict[str, float]]:
    store = SqliteStore(path)
    store.open(create=False)
    try:
        return totals(store, by)
    finally:
        store.close()


def summed(rows: dict[tuple[str, ...], dict[str, float]], field: str) -> float:
    return sum(row[field] for row in rows.values())


def per(rows: dict[tuple[str, ...], dict[str, float]], field: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for group, row in rows.items():
        out[group] += row[field]
    return dict(out)

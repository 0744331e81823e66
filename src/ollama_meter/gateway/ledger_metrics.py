"""The ledger's own health as Prometheus metrics, read from the writer when scraped.

Registered only when the ledger is on: without it the exposition is the core's, byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .ledger_writer import LedgerWriter

_NS: Final = "ollama_meter_ledger"


class LedgerMetrics(Collector):
    def __init__(self, writer: LedgerWriter) -> None:
        self._writer = writer

    def collect(self) -> Iterable[Metric]:
        w = self._writer
        flushes = CounterMetricFamily(
            f"{_NS}_flushes",
            "Flushes of the usage ledger's rollups to its store, by result (ok, error), "
            "counted by the ledger's writer.",
            labels=["result"],
        )
        for result in ("ok", "error"):
            flushes.add_metric([result], w.flushes[result])
        yield flushes
        yield GaugeMetricFamily(
            f"{_NS}_pending_rows",
            "Hourly usage rows in memory not yet written to the ledger's store.",
            value=len(w.rollup),
        )
        yield CounterMetricFamily(
            f"{_NS}_write_errors",
            "Writes (flushes and retention deletes) the ledger's store did not take.",
            value=w.write_errors,
        )
        yield CounterMetricFamily(
            f"{_NS}_dropped_rows",
            "Usage rows dropped from memory because max_pending_rows was reached while the "
            "store did not take writes (their requests are missing from the ledger).",
            value=w.rollup.dropped,
        )
        yield GaugeMetricFamily(
            f"{_NS}_last_flush_timestamp_seconds",
            "Unix time of the ledger's last flush its store took (0: none yet).",
            value=w.last_flush,
        )

"""The fleet's metrics: each upstream's health and residency from the poller's latest
snapshot (never asking Ollama at scrape time), and the routing counters.

In fleet mode these replace the core's scrape-time upstream families (``upstream_up``,
``loaded_models``, ``model_*``), with an ``upstream`` label. Labels are bounded: ``upstream``
by the configured names, ``model`` by what the upstreams list or hold, ``decision`` and
``reason`` by fixed sets.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..ollama import parse_time
from .fleet import DECISIONS, RETRY_REASONS, Fleet

_NS: Final = "ollama_meter"


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class FleetMetrics:
    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        fleet = self._fleet
        up = GaugeMetricFamily(
            f"{_NS}_upstream_up",
            "1 if the upstream answered the poller's last GET /api/version, else 0.",
            labels=["upstream"],
        )
        breaker = GaugeMetricFamily(
            f"{_NS}_upstream_breaker_open",
            "1 while the upstream's circuit breaker is open (it is skipped), else 0.",
            labels=["upstream"],
        )
        polled = GaugeMetricFamily(
            f"{_NS}_upstream_last_poll_timestamp_seconds",
            "When the poller last asked the upstream (Unix time).",
            labels=["upstream"],
        )
        in_flight = GaugeMetricFamily(
            f"{_NS}_upstream_requests_in_flight",
            "Requests the proxy has sent to the upstream and not finished.",
            labels=["upstream"],
        )
        loaded = GaugeMetricFamily(
            f"{_NS}_loaded_models",
            "Models the upstream holds in memory, from its last GET /api/ps.",
            labels=["upstream"],
        )
        size = GaugeMetricFamily(
            f"{_NS}_model_size_bytes",
            "Memory a loaded model occupies (size in GET /api/ps), in bytes.",
            labels=["upstream", "model"],
        )
        vram = GaugeMetricFamily(
            f"{_NS}_model_vram_bytes",
            "Part of a loaded model in GPU memory (size_vram in GET /api/ps), in bytes.",
            labels=["upstream", "model"],
        )
        expiry = GaugeMetricFamily(
            f"{_NS}_model_expiry_timestamp_seconds",
            "When the upstream will unload a loaded model (expires_at in GET /api/ps).",
            labels=["upstream", "model"],
        )
        context = GaugeMetricFamily(
            f"{_NS}_model_context_length",
            "Context window a loaded model was loaded with (context_length in GET /api/ps).",
            labels=["upstream", "model"],
        )
        for node in fleet.nodes:
            name = node.name
            up.add_metric([name], 1 if node.answered else 0)
            breaker.add_metric([name], 1 if node.breaker.is_open else 0)
            if node.last_poll:
                polled.add_metric([name], node.last_poll)
            in_flight.add_metric([name], node.in_flight)
            loaded.add_metric([name], len(node.ps) if node.answered else 0)
            for entry in node.ps if node.answered else ():  # a dead one holds nothing known
                model = [name, str(entry.get("name"))]
                expires = parse_time(entry.get("expires_at"))
                for family, field in ((size, "size"), (vram, "size_vram")):
                    value = _number(entry.get(field))
                    if value is not None:
                        family.add_metric(model, value)
                if expires is not None:
                    expiry.add_metric(model, expires)
                length = _number(entry.get("context_length"))
                if length is not None:
                    context.add_metric(model, length)
        decisions = CounterMetricFamily(
            f"{_NS}_routing_decisions",
            f"Where requests were sent and why ({', '.join(DECISIONS)}).",
            labels=["upstream", "decision"],
        )
        created = fleet.created
        for key, count in fleet.decisions.items():
            decisions.add_metric(list(key), count, created=created[key])
        retries = CounterMetricFamily(
            f"{_NS}_upstream_retries",
            f"Attempts retried on another upstream, by why ({', '.join(RETRY_REASONS)}).",
            labels=["upstream", "reason"],
        )
        for key, count in fleet.retries.items():
            retries.add_metric(list(key), count, created=created[key])
        cold = CounterMetricFamily(
            f"{_NS}_cold_loads",
            "Requests sent to an upstream while their model was not loaded there, that "
            "then answered 2xx: loads the routing caused.",
            labels=["upstream", "model"],
        )
        for load, count in fleet.cold_loads.items():
            cold.add_metric(list(load), count, created=created[load])
        return [up, breaker, polled, in_flight, loaded, size, vram, expiry, context,
                decisions, retries, cold]  # fmt: skip

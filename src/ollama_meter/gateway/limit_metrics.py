"""The limits' and the queue's metrics (registered only when ``[limits]`` is set).

``rejected_total{reason,key}``, ``queue_depth``, ``queue_wait_seconds{model}``,
``slots_in_use{upstream,model}``, ``slots_configured{upstream}`` and, with Redis,
``redis_up``. ``key`` is bounded as the per-key families bound it (usage.py: the key's name,
``anonymous`` or ``other``); ``model`` is the core's bounded model label.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric

from ..metrics import Observations, histogram_family, le_values
from .identity import ANONYMOUS

REJECT_REASONS: Final = (
    "rate",
    "tokens",
    "key_concurrency",
    "queue_full",
    "queue_timeout",
    "no_upstream",
)
#: Up to 5 minutes: a queue wait is seconds, or the sign that something is very wrong.
WAIT_BUCKETS: Final = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_WAIT_LE: Final = le_values(WAIT_BUCKETS)
_NS: Final = "ollama_meter"


class SlotState(Protocol):
    def slots_in_use(self) -> Iterable[tuple[str, str, int]]: ...
    def slots_configured(self) -> Iterable[tuple[str, int]]: ...
    @property
    def depth(self) -> int: ...


class LimitMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        key_label: Callable[[str | None], str],
        redis: bool,
    ) -> None:
        self._key_label = key_label
        self.rejected = Counter(
            "rejected",
            "Requests refused by the limits or the queue, by reason (rate, tokens, "
            "key_concurrency: 429; queue_full, queue_timeout, no_upstream: 503) and API key "
            "(anonymous without one, other past max_key_labels).",
            ("reason", "key"),
            namespace=_NS,
            registry=registry,
        )
        #: queue_wait_seconds by model label (the label is bounded), kept as the core keeps
        #: its histograms (metrics.py, rule 4): observed once a request, so without
        #: prometheus_client's locks, which made its Histogram most of the admit step's cost.
        self._waits: dict[str, Observations] = {}
        self.redis_up: Gauge | None = None
        if redis:
            self.redis_up = Gauge(
                "redis_up",
                "1 while the shared rpm and tpm windows in Redis answer; 0 while this replica "
                "keeps them alone at limit / replicas.",
                namespace=_NS,
                registry=registry,
            )
        self._slots: SlotState | None = None
        registry.register(self)

    def watch(self, slots: SlotState) -> None:
        self._slots = slots

    def waited(self, model: str, seconds: float) -> None:
        """A request got its slot after ``seconds`` (0 when one was free)."""
        observed = self._waits.get(model)
        if observed is None:
            observed = self._waits[model] = Observations(len(WAIT_BUCKETS))
        observed.counts[bisect_left(WAIT_BUCKETS, seconds)] += 1
        observed.total += seconds

    def refused(self, reason: str, key: str | None) -> None:
        self.rejected.labels(reason, self._key_label(key)).inc()

    def redis_changed(self, up: bool) -> None:
        if self.redis_up is not None:
            self.redis_up.set(1 if up else 0)

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        yield histogram_family(
            f"{_NS}_queue_wait_seconds",
            "Time from arrival to a slot at a gated upstream, of the requests that got one "
            "(the proxy's queue; Ollama's own load time is load_duration_seconds).",
            ("model",),
            _WAIT_LE,
            (((model,), observed) for model, observed in self._waits.items()),
            created=True,  # as the Counter beside it: OpenMetrics' _created
        )
        slots = self._slots
        depth = GaugeMetricFamily(
            f"{_NS}_queue_depth", "Requests waiting for a slot, all upstreams together."
        )
        depth.add_metric([], 0 if slots is None else slots.depth)
        yield depth
        if slots is None:
            return
        in_use = GaugeMetricFamily(
            f"{_NS}_slots_in_use",
            "Requests at the upstream for the model, of those the proxy gates (slots set).",
            labels=("upstream", "model"),
        )
        for upstream, model, n in slots.slots_in_use():
            in_use.add_metric([upstream, model], n)
        yield in_use
        configured = GaugeMetricFamily(
            f"{_NS}_slots_configured",
            "Requests the upstream runs at once per model, as configured (slots).",
            labels=("upstream",),
        )
        for upstream, n in slots.slots_configured():
            configured.add_metric([upstream], n)
        yield configured


def anonymous_label(name: str | None) -> str:
    """The key label without access control: everyone is anonymous."""
    return ANONYMOUS if name is None else name

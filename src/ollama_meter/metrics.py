"""Every metric ollama-meter exposes, bound to an injected registry, and the /metrics handler.

This is the only module that imports prometheus_client. The metric set is a public contract
(dashboards and alerts are built on it): names, types and labels here are exactly those of the
core issue. Callers never spell a metric name; proxy.py hands over a finished ``Exchange``.

Rules:
1. Labels come only from bounded sets: ``endpoint`` from the route table, ``model`` from
   labels.ModelLabels, ``stream`` true/false, ``status`` the code the client got, ``reason``
   and ``done_reason`` fixed enums. Target labels (instance, job) belong to Prometheus.
2. A request is counted once, when it ends, so counts line up with durations and errors.
3. Facts that exist only at scrape time (is the upstream up, which models are loaded) are
   fetched by the /metrics handler just before rendering and exposed by a collector that
   builds fresh families from that snapshot; nothing polls on a timer.
4. Children of labelled metrics are cached per label tuple: the label sets are bounded, and
   ``labels()`` is the most expensive part of recording a request.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, Generic, Protocol, TypeVar

from aiohttp.typedefs import Handler
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .exchange import Exchange
from .ollama import LoadedModel

NAMESPACE: Final = "ollama_meter"

# LLM requests take from milliseconds (a cached embed) to many minutes (a long generation on
# a CPU): buckets reach 10 minutes, about 2-2.5x apart.
REQUEST_DURATION_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
# First token: prompt evaluation plus, on a cold start, the model load (seconds to minutes).
TTFT_BUCKETS: Final = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
# load_duration is queue wait + model load: ~0 when warm, seconds to minutes when cold.
LOAD_BUCKETS: Final = (
    0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
# Per output token: ~2 ms (small model, fast GPU) to ~1 s (large model on CPU).
TPOT_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0,
)  # fmt: skip

DONE_REASONS: Final = frozenset({"stop", "length", "load", "unload"})

_C = TypeVar("_C")
_C_co = TypeVar("_C_co", covariant=True)


class _Labelled(Protocol[_C_co]):
    def labels(self, *labelvalues: str) -> _C_co: ...


class _Children(Generic[_C]):
    """``metric.labels(*values)``, cached by label tuple (the label sets are bounded)."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: _Labelled[_C]) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], _C] = {}

    def __call__(self, *values: str) -> _C:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class _UpstreamCollector(Collector):
    """Families built at scrape time from the snapshot the /metrics handler just fetched."""

    def __init__(self) -> None:
        self.up = False
        self.models: Sequence[LoadedModel] = ()

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> list[Metric]:
        up = GaugeMetricFamily(
            f"{NAMESPACE}_upstream_up",
            "1 if Ollama answered GET /api/version during this scrape, else 0.",
            value=1 if self.up else 0,
        )
        loaded = GaugeMetricFamily(
            f"{NAMESPACE}_loaded_models",
            "Models Ollama holds in memory, from GET /api/ps during this scrape.",
            value=len(self.models),
        )
        size = GaugeMetricFamily(
            f"{NAMESPACE}_model_size_bytes",
            "Memory a loaded model occupies (size in GET /api/ps), in bytes.",
            labels=["model"],
        )
        vram = GaugeMetricFamily(
            f"{NAMESPACE}_model_vram_bytes",
            "Part of a loaded model in GPU memory (size_vram in GET /api/ps), in bytes.",
            labels=["model"],
        )
        expiry = GaugeMetricFamily(
            f"{NAMESPACE}_model_expiry_timestamp_seconds",
            "When Ollama will unload a loaded model (expires_at in GET /api/ps), Unix time.",
            labels=["model"],
        )
        context = GaugeMetricFamily(
            f"{NAMESPACE}_model_context_length",
            "Context window a loaded model was loaded with (context_length in GET /api/ps).",
            labels=["model"],
        )
        for model in self.models:
            size.add_metric([model.name], model.size_bytes)
            vram.add_metric([model.name], model.vram_bytes)
            if model.expires_at is not None:
                expiry.add_metric([model.name], model.expires_at)
            if model.context_length is not None:
                context.add_metric([model.name], model.context_length)
        return [up, loaded, size, vram, expiry, context]


class Metrics:
    """The metric set, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, version: str) -> None:
        # prometheus_client's *_created series (a switch for the whole process) would add one
        # gauge per counter and histogram series in the text format; Prometheus ignores them.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream

        def counter(name: str, doc: str, labels: Sequence[str]) -> Counter:
            return Counter(name, doc, labels, namespace=NAMESPACE, registry=registry)

        def histogram(
            name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]
        ) -> Histogram:
            return Histogram(
                name, doc, labels, namespace=NAMESPACE, registry=registry, buckets=buckets
            )

        ems = ("endpoint", "model", "stream")
        em = ("endpoint", "model")
        self._requests = _Children(
            counter(
                "requests_total",
                "Requests proxied, counted when they end, by the status the client got "
                "(499: the client went away first).",
                (*ems, "status"),
            )
        )
        self._duration = _Children(
            histogram(
                "request_duration_seconds",
                "Time from a request's arrival at the proxy to the last response byte sent.",
                ems,
                REQUEST_DURATION_BUCKETS,
            )
        )
        self._ttft = _Children(
            histogram(
                "time_to_first_token_seconds",
                "Streamed responses: time from a request's arrival at the proxy to the first "
                "body chunk from Ollama.",
                em,
                TTFT_BUCKETS,
            )
        )
        self._in_flight = _Children(
            Gauge(
                "requests_in_flight",
                "Requests the proxy is handling now.",
                em,
                namespace=NAMESPACE,
                registry=registry,
            )
        )
        self._request_bytes = _Children(
            counter("request_bytes_total", "Request body bytes received from clients.", ems)
        )
        self._response_bytes = _Children(
            counter("response_bytes_total", "Response body bytes received from Ollama.", ems)
        )
        self._prompt_tokens = _Children(
            counter(
                "prompt_tokens_total",
                "Prompt tokens Ollama reported (prompt_eval_count, or usage.prompt_tokens on /v1).",
                ems,
            )
        )
        self._completion_tokens = _Children(
            counter(
                "completion_tokens_total",
                "Generated tokens Ollama reported (eval_count, or usage.completion_tokens on /v1).",
                ems,
            )
        )
        self._prompt_eval_seconds = _Children(
            counter(
                "prompt_eval_seconds_total",
                "Prompt evaluation time Ollama reported (prompt_eval_duration).",
                em,
            )
        )
        self._eval_seconds = _Children(
            counter("eval_seconds_total", "Generation time Ollama reported (eval_duration).", em)
        )
        self._load = _Children(
            histogram(
                "load_duration_seconds",
                "load_duration Ollama reported: queue wait plus model load (cold starts).",
                ("model",),
                LOAD_BUCKETS,
            )
        )
        self._tpot = _Children(
            histogram(
                "time_per_output_token_seconds",
                "Generation time per output token Ollama reported (eval_duration / eval_count).",
                ("model",),
                TPOT_BUCKETS,
            )
        )
        self._done = _Children(
            counter(
                "done_total",
                "Final replies by done_reason (or /v1 finish_reason): stop, length, load, "
                "unload, other.",
                (*em, "done_reason"),
            )
        )
        self._errors = _Children(
            counter(
                "request_errors_total",
                "Requests that failed in transit, by reason (upstream_unreachable, "
                "upstream_timeout, upstream_closed, stream_error, client_disconnect, shutdown).",
                (*em, "reason"),
            )
        )
        build_info = Gauge(
            "build_info",
            "Always 1; the version label is the running ollama-meter version.",
            ("version",),
            namespace=NAMESPACE,
            registry=registry,
        )
        build_info.labels(version).set(1)
        self._upstream = _UpstreamCollector()
        registry.register(self._upstream)

    def request_started(self, x: Exchange) -> None:
        self._in_flight(x.endpoint, x.model).inc()
        x.in_flight = True

    def request_finished(self, x: Exchange) -> None:
        """Record a finished exchange. Called exactly once per request."""
        if x.recorded:
            return
        x.recorded = True
        endpoint, model = x.endpoint, x.model
        stream = "true" if x.stream else "false"
        if x.in_flight:
            self._in_flight(endpoint, model).dec()
        self._requests(endpoint, model, stream, str(x.status)).inc()
        self._duration(endpoint, model, stream).observe(x.duration)
        if x.request_bytes:
            self._request_bytes(endpoint, model, stream).inc(x.request_bytes)
        if x.response_bytes:
            self._response_bytes(endpoint, model, stream).inc(x.response_bytes)
        if x.streamed and x.first_byte is not None:
            self._ttft(endpoint, model).observe(x.first_byte - x.started)
        if x.error is not None:
            self._errors(endpoint, model, x.error).inc()
        usage = x.usage
        if usage is None:
            return
        if usage.tokens_reported:
            self._prompt_tokens(endpoint, model, stream).inc(usage.prompt_tokens)
            self._completion_tokens(endpoint, model, stream).inc(usage.completion_tokens)
        if usage.prompt_eval_seconds:
            self._prompt_eval_seconds(endpoint, model).inc(usage.prompt_eval_seconds)
        if usage.eval_seconds:
            self._eval_seconds(endpoint, model).inc(usage.eval_seconds)
            if usage.completion_tokens:
                self._tpot(model).observe(usage.eval_seconds / usage.completion_tokens)
        if usage.load_seconds is not None:
            self._load(model).observe(usage.load_seconds)
        if usage.done_reason is not None:
            reason = usage.done_reason if usage.done_reason in DONE_REASONS else "other"
            self._done(endpoint, model, reason).inc()

    def set_upstream(self, up: bool, models: Sequence[LoadedModel]) -> None:
        """The scrape-time snapshot the next collect() exposes."""
        self._upstream.up = up
        self._upstream.models = models


def build_registry() -> CollectorRegistry:
    """The production registry: our metrics plus the process and platform collectors."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def exposition_handler(registry: CollectorRegistry) -> Handler:
    """prometheus_client's aiohttp handler (content negotiation, OpenMetrics, gzip)."""
    return make_aiohttp_handler(registry)

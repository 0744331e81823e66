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
   fetched by the /metrics handler just before rendering and exposed from that snapshot;
   nothing polls on a timer.
4. Request metrics are plain numbers in dicts keyed by label tuples, updated without locks, and
   turned into prometheus_client metric families when scraped (a custom collector).
   prometheus_client's Counter and Histogram take a threading.Lock on every increment; at
   about 16 increments a request that was the largest single cost of metering (measured in
   bench/). It is safe here because every update and every scrape run on the event loop's
   thread: the aiohttp exposition handler renders inline, never in another thread.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from .exchange import ERROR_REASONS, Exchange
from .ollama import LoadedModel
from .responses import OwnResponse

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
#: Why a stream carried no usage: how it ended (ERROR_REASONS), or
#: not_requested (a /v1 stream without include_usage), too_large (its final record was longer
#: than --max-response-tail), not_reported (it ended well and still had none).
USAGE_MISSING_REASONS: Final = (*ERROR_REASONS, "not_requested", "too_large", "not_reported")

EMS: Final = ("endpoint", "model", "stream")
EM: Final = ("endpoint", "model")


class Observations:
    """Observations of one histogram series (rule 4): a count per bucket (not cumulative), a
    sum, and when the series was created (Unix seconds, for OpenMetrics' ``_created``). To
    observe ``value`` with bounds ``buckets``: ``counts[bisect_left(buckets, value)] += 1``
    (the first bound >= value: Prometheus buckets are "le") and ``total += value``."""

    __slots__ = ("counts", "created", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)  # the last one is +Inf
        self.total = 0.0
        self.created = time.time()


def le_values(buckets: Sequence[float]) -> list[str]:
    """The "le" label values of ``buckets`` and +Inf, spelt as prometheus_client spells them."""
    return [floatToGoString(b) for b in buckets] + ["+Inf"]  # type: ignore[no-untyped-call]


def histogram_family(
    name: str,
    doc: str,
    labels: Sequence[str],
    le: Sequence[str],
    series: Iterable[tuple[Sequence[str], Observations]],
    created: bool = False,
) -> HistogramMetricFamily:
    """A histogram family of ``series`` (label values, observations), for a collector; with
    ``created``, each series' ``_created`` sample too (as prometheus_client's Histogram has)."""
    family = HistogramMetricFamily(name, doc, labels=labels)
    for key, observed in series:
        running = 0
        cumulative = []
        for bound, count in zip(le, observed.counts, strict=True):
            running += count
            cumulative.append((bound, running))
        family.add_metric(key, cumulative, observed.total)
        if created:
            pairs = dict(zip(labels, key, strict=True))
            family.samples.append(Sample(f"{name}_created", pairs, observed.created))
    return family


class _Series:
    """The values of one counter by label values, and when each series was created (Unix
    seconds, for OpenMetrics' ``_created``)."""

    __slots__ = ("created", "values")

    def __init__(self) -> None:
        self.values: dict[tuple[str, ...], float] = {}
        self.created: dict[tuple[str, ...], float] = {}


# eq=False: specs are dict keys on the hot path, and identity hashing is a C call where a
# generated __hash__ over every field is Python code (5 lookups a request).
@dataclass(frozen=True, slots=True, eq=False)
class _Spec:
    name: str  # without the namespace; counters include _total
    doc: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()  # histograms only


REQUESTS: Final = _Spec(
    "requests_total",
    "Requests proxied, counted when they end, by the status the client got "
    "(499: the client went away first).",
    (*EMS, "status"),
)
DURATION: Final = _Spec(
    "request_duration_seconds",
    "Time from a request's arrival at the proxy to the last response byte sent.",
    EMS,
    REQUEST_DURATION_BUCKETS,
)
TTFT: Final = _Spec(
    "time_to_first_token_seconds",
    "Streamed inference responses (not pulls or creates): time from a request's arrival at "
    "the proxy to the first body chunk from Ollama.",
    EM,
    TTFT_BUCKETS,
)
IN_FLIGHT: Final = _Spec("requests_in_flight", "Requests the proxy is handling now.", EM)
REQUEST_BYTES: Final = _Spec(
    "request_bytes_total", "Request body bytes received from clients.", EMS
)
RESPONSE_BYTES: Final = _Spec(
    "response_bytes_total", "Response body bytes received from Ollama.", EMS
)
PROMPT_TOKENS: Final = _Spec(
    "prompt_tokens_total",
    "Prompt tokens Ollama reported (prompt_eval_count, or usage.prompt_tokens on /v1).",
    EMS,
)
COMPLETION_TOKENS: Final = _Spec(
    "completion_tokens_total",
    "Generated tokens Ollama reported (eval_count, or usage.completion_tokens on /v1).",
    EMS,
)
PROMPT_EVAL_SECONDS: Final = _Spec(
    "prompt_eval_seconds_total",
    "Prompt evaluation time Ollama reported (prompt_eval_duration).",
    EM,
)
EVAL_SECONDS: Final = _Spec(
    "eval_seconds_total", "Generation time Ollama reported (eval_duration).", EM
)
LOAD: Final = _Spec(
    "load_duration_seconds",
    "load_duration Ollama reported: queue wait plus model load (cold starts).",
    ("model",),
    LOAD_BUCKETS,
)
TPOT: Final = _Spec(
    "time_per_output_token_seconds",
    "Generation time per output token Ollama reported (eval_duration / eval_count).",
    ("model",),
    TPOT_BUCKETS,
)
DONE: Final = _Spec(
    "done_total",
    "Final replies by done_reason (or /v1 finish_reason): stop, length, load, unload, other.",
    (*EM, "done_reason"),
)
ERRORS: Final = _Spec(
    "request_errors_total",
    f"Requests that failed in transit, by reason ({', '.join(ERROR_REASONS)}).",
    (*EM, "reason"),
)
USAGE_MISSING: Final = _Spec(
    "usage_missing_total",
    "Inference streams that ended without a usage report, so their tokens are counted nowhere, "
    f"by reason ({', '.join(USAGE_MISSING_REASONS)}).",
    (*EM, "reason"),
)
UNMETERED_CHUNKS: Final = _Spec(
    "unmetered_chunks_total",
    "An approximation: the NDJSON lines or SSE data lines that streams counted in "
    "usage_missing_total delivered. A chunk is often one token, but not always (thinking and "
    "tool-call parsers release several at once).",
    EM,
)
COUNTERS: Final = (
    REQUESTS,
    REQUEST_BYTES,
    RESPONSE_BYTES,
    PROMPT_TOKENS,
    COMPLETION_TOKENS,
    PROMPT_EVAL_SECONDS,
    EVAL_SECONDS,
    DONE,
    ERRORS,
    USAGE_MISSING,
    UNMETERED_CHUNKS,
)
HISTOGRAMS: Final = (DURATION, TTFT, LOAD, TPOT)
_LE: Final[dict[_Spec, list[str]]] = {spec: le_values(spec.buckets) for spec in HISTOGRAMS}

Key = tuple[str, ...]


class Metrics(Collector):
    """The metric set: request metrics updated per exchange, and the scrape-time snapshot."""

    def __init__(self, version: str) -> None:
        self._version = version
        self._label_text: dict[Key, str] = {}  # escaped label strings, one per series
        self._counters: dict[_Spec, _Series] = {spec: _Series() for spec in COUNTERS}
        self._histograms: dict[_Spec, dict[Key, Observations]] = {spec: {} for spec in HISTOGRAMS}
        self._in_flight: dict[Key, int] = {}
        self._up = False
        self._models: Sequence[LoadedModel] = ()
        #: False in fleet mode: gateway/fleet_metrics.py exposes these per upstream.
        self.upstream_families = True

    # --- recording: on the event loop, once per request -----------------------------------

    def request_started(self, x: Exchange) -> None:
        key = (x.endpoint, x.model)
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        x.in_flight = True

    def in_flight_by_model(self) -> dict[str, int]:
        """Requests in flight per model label, all endpoints together (the status page)."""
        out: dict[str, int] = {}
        for (_, model), count in self._in_flight.items():
            if count:
                out[model] = out.get(model, 0) + count
        return out

    def request_finished(self, x: Exchange) -> None:
        """Record a finished exchange. Called exactly once per request."""
        if x.recorded:
            return
        x.recorded = True
        em = (x.endpoint, x.model)
        ems = (x.endpoint, x.model, "true" if x.stream else "false")
        counters = self._counters
        if x.in_flight:
            self._in_flight[em] -= 1
        _add(counters[REQUESTS], (*ems, str(x.status)), 1)
        self._observe(DURATION, ems, x.duration)
        if x.request_bytes:
            _add(counters[REQUEST_BYTES], ems, x.request_bytes)
        if x.response_bytes:
            _add(counters[RESPONSE_BYTES], ems, x.response_bytes)
        usage = x.usage
        if x.streamed and x.inference:
            if x.first_byte is not None:
                self._observe(TTFT, em, x.first_byte - x.started)
            if usage is None or not usage.tokens_reported:
                _add(counters[USAGE_MISSING], (*em, _missing_reason(x)), 1)
                if x.records:
                    _add(counters[UNMETERED_CHUNKS], em, x.records)
        if x.error is not None:
            _add(counters[ERRORS], (*em, x.error), 1)
        if usage is None:
            return
        if usage.tokens_reported:
            _add(counters[PROMPT_TOKENS], ems, usage.prompt_tokens)
            _add(counters[COMPLETION_TOKENS], ems, usage.completion_tokens)
        if usage.prompt_eval_seconds:
            _add(counters[PROMPT_EVAL_SECONDS], em, usage.prompt_eval_seconds)
        if usage.eval_seconds:
            _add(counters[EVAL_SECONDS], em, usage.eval_seconds)
            if usage.completion_tokens:
                self._observe(TPOT, (x.model,), usage.eval_seconds / usage.completion_tokens)
        if usage.load_seconds is not None:
            self._observe(LOAD, (x.model,), usage.load_seconds)
        if usage.done_reason is not None:
            reason = usage.done_reason if usage.done_reason in DONE_REASONS else "other"
            _add(counters[DONE], (*em, reason), 1)

    def _observe(self, spec: _Spec, key: Key, value: float) -> None:
        series = self._histograms[spec]
        histogram = series.get(key)
        if histogram is None:
            histogram = series[key] = Observations(len(spec.buckets))
        # bisect_left finds the first bound >= value: Prometheus buckets are "le".
        histogram.counts[bisect_left(spec.buckets, value)] += 1
        histogram.total += value

    def set_upstream(self, up: bool, models: Sequence[LoadedModel]) -> None:
        """The scrape-time snapshot the next collect() exposes."""
        self._up = up
        self._models = models

    # --- exposition ----------------------------------------------------------------------

    def render(self, openmetrics: bool = False) -> str:
        """Every family in the Prometheus text format (0.0.4), in one pass; with
        ``openmetrics``, in OpenMetrics 1.0 instead, with the ``_created`` time of every
        counter and histogram series (so Prometheus can tell a new series' first increase),
        and without the closing ``# EOF`` (the caller appends the registry's families).

        The same samples as ``collect()`` (a test holds the two equal), written directly: going
        through prometheus_client's Metric objects and generate_latest costs about 10 us a
        sample, 0.6 s for the 75,000 samples of 100 models x every endpoint (bench/, scenario
        5), all of it on the event loop that is also proxying. Label strings are escaped once
        per series and kept (the label sets are bounded).
        """
        out: list[str] = []
        write = out.append
        label = self._labels_of
        head = _om_head if openmetrics else _head
        write(head(f"{NAMESPACE}_build_info", "gauge", _BUILD_INFO_DOC))
        write(f'{NAMESPACE}_build_info{{version="{_escape(self._version)}"}} 1\n')
        for spec in COUNTERS:
            name = f"{NAMESPACE}_{spec.name}"
            series = self._counters[spec]
            if openmetrics:
                base = name.removesuffix("_total")
                write(head(base, "counter", spec.doc))
                created = series.created
                for key, value in series.values.items():
                    labels = label(spec, key)
                    write(f"{name}{{{labels}}} {_number(value)}\n")
                    write(f"{base}_created{{{labels}}} {_number(created[key])}\n")
            else:
                write(head(name, "counter", spec.doc))
                for key, value in series.values.items():
                    write(f"{name}{{{label(spec, key)}}} {_number(value)}\n")
        name = f"{NAMESPACE}_{IN_FLIGHT.name}"
        write(head(name, "gauge", IN_FLIGHT.doc))
        for key, count in self._in_flight.items():
            write(f"{name}{{{label(IN_FLIGHT, key)}}} {count}\n")
        for spec in HISTOGRAMS:
            name = f"{NAMESPACE}_{spec.name}"
            write(head(name, "histogram", spec.doc))
            bounds = _LE[spec]
            for key, observed in self._histograms[spec].items():
                labels = label(spec, key)
                running = 0
                for bound, count in zip(bounds, observed.counts, strict=True):
                    running += count
                    write(f'{name}_bucket{{{labels},le="{bound}"}} {running}\n')
                write(f"{name}_count{{{labels}}} {running}\n")
                write(f"{name}_sum{{{labels}}} {_number(observed.total)}\n")
                if openmetrics:
                    write(f"{name}_created{{{labels}}} {_number(observed.created)}\n")
        for family in self._upstream_families() if self.upstream_families else ():
            write(head(family.name, family.type, family.documentation))
            for sample in family.samples:
                pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in sample.labels.items())
                write(f"{sample.name}{{{pairs}}} {_number(sample.value)}\n")
        return "".join(out)

    def _labels_of(self, spec: _Spec, key: Key) -> str:
        cache_key = (spec.name, *key)
        text = self._label_text.get(cache_key)
        if text is None:
            text = self._label_text[cache_key] = ",".join(
                f'{name}="{_escape(value)}"' for name, value in zip(spec.labels, key, strict=True)
            )
        return text

    # --- exposition through prometheus_client's Collector interface (tools and tests) -----

    def describe(self) -> Iterable[Metric]:
        upstream = self._upstream_families(empty=True) if self.upstream_families else []
        return self._request_families(empty=True) + upstream

    def collect(self) -> Iterable[Metric]:
        upstream = self._upstream_families() if self.upstream_families else []
        return self._request_families() + upstream

    def _request_families(self, empty: bool = False) -> list[Metric]:
        families: list[Metric] = []
        info = GaugeMetricFamily(f"{NAMESPACE}_build_info", _BUILD_INFO_DOC, labels=["version"])
        if not empty:
            info.add_metric([self._version], 1)
        families.append(info)
        for spec in COUNTERS:
            counter = CounterMetricFamily(f"{NAMESPACE}_{spec.name}", spec.doc, labels=spec.labels)
            if not empty:
                for key, value in self._counters[spec].values.items():
                    counter.add_metric(key, value)
            families.append(counter)
        gauge = GaugeMetricFamily(
            f"{NAMESPACE}_{IN_FLIGHT.name}", IN_FLIGHT.doc, labels=IN_FLIGHT.labels
        )
        if not empty:
            for key, count in self._in_flight.items():
                gauge.add_metric(key, count)
        families.append(gauge)
        for spec in HISTOGRAMS:
            observed = () if empty else self._histograms[spec].items()
            name = f"{NAMESPACE}_{spec.name}"
            families.append(histogram_family(name, spec.doc, spec.labels, _LE[spec], observed))
        return families

    def _upstream_families(self, empty: bool = False) -> list[Metric]:
        up = GaugeMetricFamily(
            f"{NAMESPACE}_upstream_up",
            "1 if Ollama answered GET /api/version during this scrape, else 0.",
            value=None if empty else (1 if self._up else 0),
        )
        loaded = GaugeMetricFamily(
            f"{NAMESPACE}_loaded_models",
            "Models Ollama holds in memory, from GET /api/ps during this scrape.",
            value=None if empty else len(self._models),
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
        for model in () if empty else self._models:
            size.add_metric([model.name], model.size_bytes)
            vram.add_metric([model.name], model.vram_bytes)
            if model.expires_at is not None:
                expiry.add_metric([model.name], model.expires_at)
            if model.context_length is not None:
                context.add_metric([model.name], model.context_length)
        return [up, loaded, size, vram, expiry, context]


def _missing_reason(x: Exchange) -> str:
    if x.error is not None:
        return x.error
    if x.usage_oversized:
        return "too_large"
    return "not_requested" if x.usage is not None else "not_reported"


def _add(series: _Series, key: Key, amount: float) -> None:
    values = series.values
    value = values.get(key)
    if value is None:  # a new series: the clock is read only then
        series.created[key] = time.time()
        values[key] = amount
    else:
        values[key] = value + amount


_BUILD_INFO_DOC: Final = "Always 1; the version label is the running ollama-meter version."


def _head(name: str, kind: str, doc: str) -> str:
    # In the text format a counter's HELP and TYPE carry its _total name.
    shown = f"{name}_total" if kind == "counter" and not name.endswith("_total") else name
    help_text = doc.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {shown} {help_text}\n# TYPE {shown} {kind}\n"


def _om_head(name: str, kind: str, doc: str) -> str:
    # OpenMetrics names a counter family without _total, and escapes quotes in HELP too.
    help_text = doc.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(value) if type(value) is int else repr(float(value))


def build_registry() -> CollectorRegistry:
    """The production registry: our metrics plus the process and platform collectors."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


TEXT_FORMAT: Final = "text/plain; version=0.0.4; charset=utf-8"


def exposition_handler(metrics: Metrics, registry: CollectorRegistry) -> Handler:
    """GET /metrics: our families (Metrics.render) and the registry's (process, platform), in
    OpenMetrics when the scraper asks for it (Prometheus does), else in the text format."""

    async def handler(request: web.Request) -> web.StreamResponse:
        encoder, content_type = choose_encoder(request.headers.get(hdrs.ACCEPT, ""))
        if content_type.startswith("application/openmetrics-text"):
            text = metrics.render(openmetrics=True) + encoder(registry).decode()
        else:
            content_type = TEXT_FORMAT
            text = metrics.render() + generate_latest(registry).decode()
        response = OwnResponse(text=text, headers={hdrs.CONTENT_TYPE: content_type})
        response.enable_compression()  # gzip when Prometheus asks for it (it does)
        return response

    return handler

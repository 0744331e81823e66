"""Per-key usage and the access layer's own health, as Prometheus metrics.

These families exist only with access control on (the core's metric set is unchanged
without it), and stay apart from the core's endpoint x model x stream x status matrix.

Rules:
1. ``key`` is a key's configured name, never its id, hash or secret; ``anonymous`` without
   one. At most ``max_key_labels`` names get their own series, in the order they are first
   seen; the rest are ``other``. ``team`` is bounded the same way. A reload frees the places
   of keys no longer in the file (their series stay).
2. ``model`` is the core's bounded model label (labels.ModelLabels).
3. Updated once per request, from the record step, as plain numbers in dicts turned into
   metric families when scraped (a custom collector, as metrics.py does for the core's, and
   for the same reason: prometheus_client's Counter takes a lock on every increment, which at
   three a request cost a tenth of the proxy's throughput; bench/README.md). Safe because
   requests and scrapes run on the event loop's thread. What is counted elsewhere or rarely
   (the audit writer's thread, reloads) uses prometheus_client's own types.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, Metric

from ..exchange import STATUS_CLIENT_CLOSED, Exchange
from .identity import ANONYMOUS

OTHER: Final = "other"
AUTH_FAILURE_REASONS: Final = (
    "missing",
    "invalid",
    "disabled",
    "expired",
    "forbidden_route",
    "forbidden_model",
)
_NS: Final = "ollama_meter"


class _Bounded:
    """At most ``limit`` distinct values, then ``other``."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def keep_only(self, values: set[str]) -> None:
        """Forget the values not in ``values`` (keys removed from the file): their series
        stay, but their places go to the keys now in force."""
        self._seen &= values

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


def status_class(status: int) -> str:
    if status == STATUS_CLIENT_CLOSED:
        return "499"
    return f"{status // 100}xx"


class _Counts:
    """One counter family as plain numbers: label values -> (value, created)."""

    __slots__ = ("doc", "labels", "name", "values")

    def __init__(self, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.name = f"{_NS}_{name}"
        self.doc = doc
        self.labels = labels
        self.values: dict[tuple[str, ...], list[float]] = {}

    def add(self, key: tuple[str, ...], amount: float) -> None:
        found = self.values.get(key)
        if found is None:
            self.values[key] = [amount, time.time()]
        else:
            found[0] += amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for key, (value, created) in self.values.items():
            family.add_metric(key, value, created=created)
        return family


class KeyUsage:
    def __init__(self, registry: CollectorRegistry, max_key_labels: int) -> None:
        self._keys = _Bounded(max_key_labels)
        self._teams = _Bounded(max_key_labels)
        self.requests = _Counts(
            "key_requests",
            "Requests by API key (anonymous: without one; other: past max_key_labels), by "
            "the class of the status the client got (499: it went away first).",
            ("key", "team", "status_class"),
        )
        self.prompt_tokens = _Counts(
            "key_prompt_tokens",
            "Prompt tokens Ollama reported, by API key and model.",
            ("key", "team", "model"),
        )
        self.completion_tokens = _Counts(
            "key_completion_tokens",
            "Generated tokens Ollama reported, by API key and model.",
            ("key", "team", "model"),
        )
        self.auth_failures = _Counts(
            "auth_failures",
            f"Requests refused by access control, by reason ({', '.join(AUTH_FAILURE_REASONS)}).",
            ("reason",),
        )
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.add((reason,), 0)
        self._families = (self.requests, self.prompt_tokens, self.completion_tokens)
        registry.register(self)
        self.keys_configured = Gauge(
            "keys_configured",
            "API keys in the keys file now in force (disabled and expired ones included).",
            namespace=_NS,
            registry=registry,
        )
        self.reloads = Counter(
            "config_reloads",
            "Reloads of the keys file, by result (error: the previous keys stay in force).",
            ["result"],
            namespace=_NS,
            registry=registry,
        )
        for result in ("ok", "error"):
            self.reloads.labels(result)
        self.last_reload_ok = Gauge(
            "config_last_reload_successful",
            "1 if the last load of the keys file succeeded (the keys in force are the file's), "
            "0 if it failed (the keys loaded before stay in force).",
            namespace=_NS,
            registry=registry,
        )
        self.last_reload_ok.set(1)  # the proxy does not start on a file that does not load
        self.audit_errors = Counter(
            "audit_write_errors",
            "Audit lines that could not be written (or were dropped while the writer was behind).",
            namespace=_NS,
            registry=registry,
        )

    def describe(self) -> Iterable[Metric]:
        return [c.family() for c in (*self._families, self.auth_failures)]

    def collect(self) -> Iterable[Metric]:
        return [c.family() for c in (*self._families, self.auth_failures)]

    def in_force(self, names: set[str], teams: set[str]) -> None:
        """The keys file was (re)loaded with these key names and teams."""
        self._keys.keep_only(names)
        self._teams.keep_only(teams)

    def refused(self, reason: str) -> None:
        self.auth_failures.add((reason,), 1)

    def label(self, name: str | None, team: str | None) -> tuple[str, str]:
        """The (key, team) label values of a key name (None: anonymous)."""
        if name is None:
            return ANONYMOUS, ""
        key = self._keys(name)
        if key == OTHER:
            return OTHER, OTHER if team else ""
        return key, self._teams(team) if team else ""

    def finished(self, x: Exchange) -> None:
        key, team = self.label(x.key, x.team)
        self.requests.add((key, team, status_class(x.status)), 1)
        usage = x.usage
        if usage is not None and usage.tokens_reported:
            self.prompt_tokens.add((key, team, x.model), usage.prompt_tokens)
            self.completion_tokens.add((key, team, x.model), usage.completion_tokens)

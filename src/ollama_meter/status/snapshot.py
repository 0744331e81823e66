"""``/-/status.json`` (docs/status.md): the proxy's state as one plain object, version 1.

Pure: every input is an argument (the recorder's rings, the fleet's nodes or the one
upstream's probe, the admission counts, the ledger's last answer, the clock), so the
structure test and the cost benchmark build it without sockets. Nothing here waits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

from yarl import URL

from ..gateway.fleet import Node
from ..gateway.queueing import SINGLE
from ..gateway.router import model_key
from ..ollama import LoadedModel, loaded_model, parse_version
from .recorder import (
    DECIMALS,
    KEY_POINTS,
    KEY_STEP,
    POINTS,
    STEP,
    WINDOW_STEPS,
    Point,
    Recorder,
    Ring,
    derive,
)

VERSION: Final = 1
#: Models whose history the object carries (the busiest); the rest have their numbers only.
HISTORY_MODELS: Final = 10
TOP_KEYS: Final = 20
DASHBOARD: Final = "grafana/dashboards/ollama-meter.json"


@dataclass(frozen=True, slots=True)
class Meter:
    """What is fixed for the life of the process."""

    version: str
    started_at: float
    mode: str  # core or fleet
    access_control: bool
    limits: bool
    ledger: bool
    metrics_link: str | None
    config: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class Single:
    """The one upstream of the core, as its last probe saw it."""

    url: str
    up: bool
    version: str | None
    loaded: Sequence[LoadedModel]
    in_flight: Mapping[str, int]  # per model_key
    last_poll: float | None


@dataclass(frozen=True, slots=True)
class Queue:
    depth: int
    max: int | None
    max_wait_seconds: float | None
    slots: Mapping[str, int]  # per upstream name, when gated
    in_use: Mapping[tuple[str, str], int]  # per (upstream, model_key)
    in_use_by: Mapping[str, int]  # per upstream name, all models


@dataclass(frozen=True, slots=True)
class Today:
    since: float
    as_of: float | None
    items: Sequence[Mapping[str, Any]]


def build(
    meter: Meter,
    recorder: Recorder,
    upstreams: list[dict[str, Any]],
    queue: Queue,
    today: Today | None,
    now: float,
) -> dict[str, Any]:
    return {
        "version": VERSION,
        "generated_at": now,
        "meter": {
            "version": meter.version,
            "started_at": meter.started_at,
            "uptime_seconds": max(0.0, now - meter.started_at),
            "mode": meter.mode,
            "access_control": meter.access_control,
            "limits": meter.limits,
            "ledger": meter.ledger,
            "links": {"metrics": meter.metrics_link, "dashboard": DASHBOARD},
        },
        "config": dict(meter.config),
        "fleet": {
            "queue": {
                "depth": queue.depth,
                "max": queue.max,
                "max_wait_seconds": queue.max_wait_seconds,
            },
            "upstreams": upstreams,
        },
        "models": models(recorder, now),
        "keys": keys(recorder, now, today),
        "problems": [problem._asdict() for problem in recorder.problems],
    }


# --- fleet -------------------------------------------------------------------------------


def fleet_upstreams(nodes: Iterable[Node], queue: Queue, now: float) -> list[dict[str, Any]]:
    out = []
    for node in nodes:
        settings = node.settings
        out.append(
            _upstream(
                node.name,
                _printable(settings.url),
                node.answered,
                "open" if node.breaker.is_open else "closed",
                _version(node.version),
                node.in_flight,
                settings.max_loaded or None,
                node.last_poll or None,
                node.last_error,
                _loaded(node.ps) if node.answered else [],  # (down: not known)
                node.in_flight_by,
                queue,
                now,
            )
        )
    return out


# A poll replaces a node's ps list and version body (never changes them in place): what was
# parsed from them is kept until the next poll brings new ones.
_PARSED: Final = 64


@lru_cache(maxsize=_PARSED)
def _printable(url: URL) -> str:
    return str(url.with_user(None))


@lru_cache(maxsize=_PARSED)
def _version(body: bytes | None) -> str | None:
    return parse_version(body)


_loaded_of: dict[int, tuple[list[dict[str, Any]], list[LoadedModel]]] = {}


def _loaded(ps: list[dict[str, Any]]) -> list[LoadedModel]:
    kept = _loaded_of.get(id(ps))
    if kept is not None and kept[0] is ps:
        return kept[1]
    if len(_loaded_of) >= _PARSED:
        _loaded_of.clear()
    loaded = [m for m in map(loaded_model, ps) if m is not None]
    _loaded_of[id(ps)] = (ps, loaded)
    return loaded


def single_upstream(single: Single, queue: Queue, now: float) -> list[dict[str, Any]]:
    return [
        _upstream(
            SINGLE,
            single.url,
            single.up,
            None,
            single.version,
            sum(single.in_flight.values()),
            None,
            single.last_poll,
            None if single.up else "no answer to /api/version",
            single.loaded,
            single.in_flight,
            queue,
            now,
        )
    ]


def _upstream(
    name: str,
    url: str,
    up: bool,
    breaker: str | None,
    version: str | None,
    in_flight: int,
    max_loaded: int | None,
    last_poll: float | None,
    last_error: str | None,
    loaded: Sequence[LoadedModel],
    in_flight_by: Mapping[str, int],
    queue: Queue,
    now: float,
) -> dict[str, Any]:
    in_use = queue.in_use
    models = []
    for model in loaded:
        key = model_key(model.name)
        models.append(
            {
                "name": model.name,
                "size_bytes": model.size_bytes,
                "vram_bytes": model.vram_bytes,
                "expires_at": model.expires_at,
                "context_length": model.context_length,
                "in_flight": in_flight_by.get(key, 0),
                "slots_in_use": in_use.get((name, key), 0),
            }
        )
    return {
        "name": name,
        "url": url,
        "up": up,
        "breaker": breaker,
        "version": version,
        "in_flight": in_flight,
        "slots": queue.slots.get(name),
        "slots_in_use": queue.in_use_by.get(name, 0),
        "max_loaded": max_loaded,
        "last_poll": last_poll,
        "last_error": last_error,
        "models": models,
    }


# --- models and keys ---------------------------------------------------------------------


def models(recorder: Recorder, now: float) -> dict[str, Any]:
    step = int(now // STEP)
    # The window is the last WINDOW_STEPS - 1 steps and the part of this one gone by: rates
    # over the time it really covers (55-60 s), not always over 60.
    seconds = round((WINDOW_STEPS - 1) * STEP + (now - step * STEP), 3)
    rows = []
    for name, ring in recorder.models.items():
        requests = ring.total(step)[0]
        if requests:
            window = ring.last(step)
            rows.append((window[2], requests, name, ring, window))
    rows.sort(key=lambda row: (-row[0], -row[1], row[2]))
    items = [
        _model(name, requests, window, ring if n < HISTORY_MODELS else None, step, seconds)
        for n, (_, requests, name, ring, window) in enumerate(rows)
    ]
    total = recorder.total
    return {
        "window_seconds": seconds,
        "step_seconds": STEP,
        "points": POINTS,
        "history_end": (step + 1) * STEP,
        "total": _model(
            None,
            total.total(step)[0],
            total.last(step),
            total,
            step,
            seconds,
        ),
        "items": items,
    }


def _model(
    name: str | None,
    requests: int,
    window: list[int],
    ring: Ring | None,
    step: int,
    seconds: float,
) -> dict[str, Any]:
    now = derive(window, seconds)
    return {
        "name": name,
        "requests": requests,
        "requests_per_second": round(window[0] / seconds, DECIMALS),
        "prompt_tokens_per_second": round(window[1] / seconds, DECIMALS),
        "completion_tokens_per_second": round(window[2] / seconds, DECIMALS),
        "ttft_p50_seconds": now.ttft_p50_seconds,
        "ttft_p95_seconds": now.ttft_p95_seconds,
        "generation_tokens_per_second": now.generation_tokens_per_second,
        "history": None if ring is None else _history(ring.history(step, STEP)),
    }


def _history(points: list[Point]) -> dict[str, list[float | None]]:
    columns = zip(*points, strict=True)
    return {field: list(column) for field, column in zip(Point._fields, columns, strict=True)}


def keys(recorder: Recorder, now: float, today: Today | None) -> dict[str, Any]:
    step = int(now // KEY_STEP)
    rows = []
    for key, ring in recorder.keys.items():
        hour = ring.total(step)
        if hour[0]:
            rows.append((hour[1] + hour[2], hour[0], key, hour))
    rows.sort(key=lambda row: (-row[0], -row[1], row[2]))
    return {
        "window_seconds": KEY_POINTS * KEY_STEP,
        "items": [
            {
                "key": key,
                "requests": hour[0],
                "prompt_tokens": hour[1],
                "completion_tokens": hour[2],
                "refusals": hour[3],
            }
            for _, _, key, hour in rows[:TOP_KEYS]
        ],
        "today": None
        if today is None
        else {"since": today.since, "as_of": today.as_of, "items": list(today.items)},
    }

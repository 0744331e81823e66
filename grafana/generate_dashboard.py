"""Writes grafana/dashboards/ollama-meter.json: ``python grafana/generate_dashboard.py``.

The dashboard is kept as code so that a change is a readable diff; tests/test_operator_kit.py
fails when the committed JSON and this script disagree. Queries use ollama-meter's metric
contract and the recording rules of prometheus/rules/ollama-meter.yml (for the heavy histogram
quantiles). Variables: datasource, instance, model, endpoint. The Fleet row reads the
families fleet mode adds ([[upstream]] tables), the Keys row those access control adds
([access] keys_file), the Ledger row those of the usage ledger ([ledger]).

In fleet mode the upstream families (upstream_up, loaded_models, model_*) carry an
``upstream`` label; without a fleet they have none. Panels outside the Fleet row aggregate
over it (``max without (upstream)``, ``sum without (upstream)``), so they read the same in both
modes; Fleet panels select ``upstream!=""``, so they are empty without a fleet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

OUT: Final = Path(__file__).parent / "dashboards" / "ollama-meter.json"
DATASOURCE: Final = {"type": "prometheus", "uid": "${datasource}"}

# Label filters by what a series carries.
F_INST: Final = 'instance=~"$instance"'
F_MODEL: Final = f'{F_INST}, model=~"$model"'
F_ALL: Final = f'{F_MODEL}, endpoint=~"$endpoint"'
RATE: Final = "$__rate_interval"


def rate_by(by: str, metric: str, filters: str = F_ALL) -> str:
    """``sum by (by) (rate(metric{filters}[$__rate_interval]))``; ``by=""``: one sum."""
    head = f"sum by ({by}) " if by else "sum"
    return f"{head}(rate({metric}{{{filters}}}[{RATE}]))"


TOKENS_PER_S: Final = "suffix: tok/s"
LOADS_PER_MIN: Final = "suffix: loads/min"
# A client that went away first (pressing Stop) is a cancellation, never a failure.
NOT_CANCELLED: Final = 'reason!="client_disconnect"'
# Routes that manage models rather than run them.
MODEL_MANAGEMENT: Final = 'endpoint=~"/api/(pull|push|create|delete|copy|blobs/.*)"'
# Grafana's default thresholds turn a stat red from 80: one colour for a count, red for any
# failure.
COUNT: Final = [(None, "blue")]
ANY_IS_BAD: Final = [(None, "green"), (1, "red")]
# Per-key families exist only with access control on ([access] keys_file).
WITH_KEYS: Final = "With API keys on ([access] keys_file); empty without them."
WITH_LEDGER: Final = "With the usage ledger on ([ledger] or --ledger); empty without it."
WITH_LIMITS: Final = (
    "With limits or slots on ([limits], --slots, [[upstream]] slots); empty without them."
)
# Families of fleet mode, or the upstream label it adds, exist only with [[upstream]] tables.
WITH_FLEET: Final = "In fleet mode ([[upstream]] tables); empty without them."
F_FLEET: Final = f'{F_INST}, upstream!=""'
# Keeps only the process_* series of ollama-meter targets, whatever their job is called.
OF_METER: Final = f" * on (job, instance) group_left () ollama_meter_build_info{{{F_INST}}}"

Panel = dict[str, Any]


def states(zero: tuple[str, str], one: tuple[str, str]) -> list[dict[str, Any]]:
    """Value mappings of a 0/1 gauge: (text, colour) for each."""
    options = {
        value: {"text": text, "color": color} for value, (text, color) in (("0", zero), ("1", one))
    }
    return [{"type": "value", "options": options}]


UP_DOWN: Final = states(("DOWN", "red"), ("UP", "green"))
OPEN_CLOSED: Final = states(("closed", "green"), ("OPEN", "red"))


def target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref}


def panel(
    title: str,
    description: str,
    unit: str,
    targets: list[tuple[str, str]],
    *,
    kind: str = "timeseries",
    width: int = 8,
    options: dict[str, Any] | None = None,
    mappings: list[dict[str, Any]] | None = None,
    thresholds: list[tuple[float | None, str]] | None = None,
) -> Panel:
    defaults: dict[str, Any] = {"unit": unit}
    if mappings:
        defaults["mappings"] = mappings
    if thresholds:
        steps = [{"value": value, "color": color} for value, color in thresholds]
        defaults["thresholds"] = {"mode": "absolute", "steps": steps}
    if kind == "timeseries":
        defaults["custom"] = {"fillOpacity": 10, "showPoints": "never", "spanNulls": True}
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options or {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)
        ],
        "gridPos": {"w": width, "h": 8},
    }


def quantiles(recorded: str, filters: str, by: str = "") -> list[tuple[str, str]]:
    """p50/p95/p99 from a recorded bucket rate (prometheus/rules/ollama-meter.yml)."""
    group = f"{by}, le" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) ({recorded}{{{filters}}}))",
            f"{prefix}p{int(q * 100)}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


def stat(title: str, description: str, unit: str, expr: str, legend: str, **kw: Any) -> Panel:
    options = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value",
        "graphMode": "none",
        "textMode": kw.pop("text_mode", "auto"),
    }
    return panel(title, description, unit, [(expr, legend)], kind="stat", options=options, **kw)


def rows() -> list[tuple[str, list[Panel]]]:
    return [
        (
            "Traffic: how much, for which models, and how much fails?",
            [
                panel(
                    "Requests by model",
                    "Requests per second through ollama-meter, by model.",
                    "reqps",
                    [
                        (
                            rate_by("model", "ollama_meter_requests_total"),
                            "{{model}}",
                        )
                    ],
                ),
                panel(
                    "Requests by endpoint",
                    "Requests per second by Ollama route.",
                    "reqps",
                    [
                        (
                            rate_by("endpoint", "ollama_meter_requests_total"),
                            "{{endpoint}}",
                        )
                    ],
                ),
                panel(
                    "Requests by status",
                    "Status the client received; 499 means the client went away first.",
                    "reqps",
                    [
                        (
                            rate_by("status", "ollama_meter_requests_total"),
                            "{{status}}",
                        )
                    ],
                ),
                panel(
                    "In flight",
                    "Requests being handled now, by model.",
                    "short",
                    [(f"sum by (model) (ollama_meter_requests_in_flight{{{F_ALL}}})", "{{model}}")],
                    width=12,
                ),
                panel(
                    "Error ratio by reason",
                    "Share of requests that failed in transit, by reason. Cancellations "
                    "(client_disconnect) are not failures: they have a panel of their own.",
                    "percentunit",
                    [
                        (
                            rate_by(
                                "reason",
                                "ollama_meter_request_errors_total",
                                f"{F_ALL}, {NOT_CANCELLED}",
                            )
                            + " / scalar("
                            + rate_by("", "ollama_meter_requests_total")
                            + ")",
                            "{{reason}}",
                        )
                    ],
                    width=12,
                ),
                panel(
                    "Cancellations",
                    "Requests whose client went away before the reply ended (Stop pressed, a "
                    "closed tab, a client timeout): reason client_disconnect, status 499. "
                    "Ollama stops generating; no error ratio or alert counts them.",
                    "reqps",
                    [
                        (
                            rate_by(
                                "endpoint, model",
                                "ollama_meter_request_errors_total",
                                f'{F_ALL}, reason="client_disconnect"',
                            ),
                            "{{model}} {{endpoint}}",
                        )
                    ],
                    width=12,
                ),
                panel(
                    "Model-management failures",
                    "Pulls, pushes, creates, deletes, copies and blob uploads that failed "
                    "in transit (an in-band error such as a mistyped model name, or a cut "
                    "stream), by route and reason. Kept apart from inference errors.",
                    "reqps",
                    [
                        (
                            rate_by(
                                "endpoint, reason",
                                "ollama_meter_request_errors_total",
                                f"{F_ALL}, {MODEL_MANAGEMENT}, {NOT_CANCELLED}",
                            ),
                            "{{endpoint}} {{reason}}",
                        )
                    ],
                    width=12,
                ),
            ],
        ),
        (
            "Latency: how long do requests and tokens take?",
            [
                panel(
                    "Request duration",
                    "Arrival at the proxy to the last byte sent (5m windows, recorded).",
                    "s",
                    quantiles("ollama_meter:request_duration_seconds_bucket:rate5m", F_ALL),
                ),
                panel(
                    "Time to first token",
                    "Streamed responses: arrival to the first body chunk. Includes queueing, "
                    "model load and prompt evaluation (5m windows, recorded).",
                    "s",
                    quantiles("ollama_meter:time_to_first_token_seconds_bucket:rate5m", F_MODEL),
                ),
                panel(
                    "Time per output token",
                    "eval_duration / eval_count as Ollama reports it (native /api routes).",
                    "s",
                    quantiles("ollama_meter:time_per_output_token_seconds_bucket:rate5m", F_MODEL),
                ),
                panel(
                    "Time to first token, p95 by model",
                    "Which models keep clients waiting.",
                    "s",
                    quantiles(
                        "ollama_meter:time_to_first_token_seconds_bucket:rate5m", F_MODEL, "model"
                    )[1:2],
                    width=12,
                ),
                panel(
                    "Time per output token, p95 by model",
                    "Which models generate slowly.",
                    "s",
                    quantiles(
                        "ollama_meter:time_per_output_token_seconds_bucket:rate5m", F_MODEL, "model"
                    )[1:2],
                    width=12,
                ),
            ],
        ),
        (
            "Tokens: how much work, and how fast is generation?",
            [
                panel(
                    "Prompt tokens by model",
                    "Prompt tokens per second (prompt_eval_count, or usage.prompt_tokens on /v1).",
                    TOKENS_PER_S,
                    [
                        (
                            rate_by("model", "ollama_meter_prompt_tokens_total"),
                            "{{model}}",
                        )
                    ],
                ),
                panel(
                    "Completion tokens by model",
                    "Generated tokens per second (eval_count, or usage.completion_tokens on /v1).",
                    TOKENS_PER_S,
                    [
                        (
                            rate_by("model", "ollama_meter_completion_tokens_total"),
                            "{{model}}",
                        )
                    ],
                ),
                panel(
                    "Generation speed",
                    "Tokens per second while generating: completion tokens over eval time, "
                    "native /api traffic (the /v1 routes report no durations).",
                    TOKENS_PER_S,
                    [
                        (
                            rate_by(
                                "model",
                                "ollama_meter_completion_tokens_total",
                                f'{F_MODEL}, endpoint=~"/api/.*"',
                            )
                            + " / "
                            + rate_by("model", "ollama_meter_eval_seconds_total", F_MODEL),
                            "{{model}}",
                        )
                    ],
                ),
                stat(
                    "Completion tokens in range",
                    "Generated tokens over the selected time range.",
                    "short",
                    f"sum(increase(ollama_meter_completion_tokens_total{{{F_ALL}}}[$__range]))",
                    "tokens",
                    width=6,
                ),
                panel(
                    "Final replies by done reason",
                    "stop, length (hit num_predict), load and unload (model load/unload calls).",
                    "reqps",
                    [
                        (
                            rate_by("done_reason", "ollama_meter_done_total"),
                            "{{done_reason}}",
                        )
                    ],
                    width=9,
                ),
                panel(
                    "Streams without a usage report",
                    "Inference streams whose tokens are counted nowhere, by why: the client "
                    "left, the stream broke, or a /v1 stream without include_usage "
                    "(not_requested; see --openai-stream-usage). The dashed line is the chunks "
                    "they delivered, an approximation of their completion tokens.",
                    "short",
                    [
                        (rate_by("reason", "ollama_meter_usage_missing_total"), "{{reason}}"),
                        (
                            rate_by("", "ollama_meter_unmetered_chunks_total"),
                            "chunks delivered",
                        ),
                    ],
                    width=9,
                ),
            ],
        ),
        (
            "Models: what is loaded, where, and how long do loads take?",
            [
                stat(
                    "Loaded models",
                    "Models in Ollama's memory (GET /api/ps at scrape time; in a fleet, the "
                    "poller's latest, added up over the upstreams).",
                    "short",
                    f"max(sum without (upstream) (ollama_meter_loaded_models{{{F_INST}}}))",
                    "loaded",
                    width=4,
                ),
                # In a fleet a model may be loaded on several upstreams: the legends end with
                # the upstream (nothing without a fleet).
                panel(
                    "VRAM vs size",
                    "Size of each loaded model and the part of it in GPU memory; "
                    "less VRAM than size means part of it runs on the CPU.",
                    "bytes",
                    [
                        (
                            f"ollama_meter_model_size_bytes{{{F_MODEL}}}",
                            "{{model}} size {{upstream}}",
                        ),
                        (
                            f"ollama_meter_model_vram_bytes{{{F_MODEL}}}",
                            "{{model}} VRAM {{upstream}}",
                        ),
                    ],
                    width=10,
                ),
                panel(
                    "Time until unload",
                    "Seconds until Ollama unloads each model (expires_at) unless it is used again.",
                    "s",
                    [
                        (
                            f"ollama_meter_model_expiry_timestamp_seconds{{{F_MODEL}}} - time()",
                            "{{model}} {{upstream}}",
                        )
                    ],
                    width=10,
                ),
                panel(
                    "Cold-load time (p95 by model)",
                    "load_duration: queue wait plus model load (15m windows, recorded).",
                    "s",
                    quantiles(
                        "ollama_meter:load_duration_seconds_bucket:rate15m", F_MODEL, "model"
                    )[1:2],
                    width=12,
                ),
                panel(
                    "Context length",
                    "Context window each loaded model was loaded with.",
                    "short",
                    [
                        (
                            f"ollama_meter_model_context_length{{{F_MODEL}}}",
                            "{{model}} {{upstream}}",
                        )
                    ],
                    width=12,
                ),
            ],
        ),
        (
            "Fleet: which upstreams answer, and where do requests go?",
            [
                stat(
                    "Upstream up",
                    "Did each upstream answer the poller's last GET /api/version (every 2 s). "
                    + WITH_FLEET,
                    "none",
                    f"min by (upstream) (ollama_meter_upstream_up{{{F_FLEET}}})",
                    "{{upstream}}",
                    width=6,
                    mappings=UP_DOWN,
                ),
                stat(
                    "Breaker open",
                    "An open breaker means consecutive transport failures (refused, reset, "
                    "timed out) of polls or requests: the upstream is skipped until it "
                    "answers again. " + WITH_FLEET,
                    "none",
                    f"max by (upstream) (ollama_meter_upstream_breaker_open{{{F_FLEET}}})",
                    "{{upstream}}",
                    width=6,
                    mappings=OPEN_CLOSED,
                ),
                panel(
                    "In flight by upstream",
                    "Requests the proxy has sent to each upstream and not finished. " + WITH_FLEET,
                    "short",
                    [
                        (
                            "sum by (upstream) "
                            f"(ollama_meter_upstream_requests_in_flight{{{F_FLEET}}})",
                            "{{upstream}}",
                        )
                    ],
                    width=12,
                ),
                panel(
                    "Routing decisions",
                    "Requests per second by where they were sent and why: hot (loaded, a "
                    "slot free), queued_hot (loaded, waiting for a slot), loading, cold (a "
                    "load), only (the one upstream that has the model), pinned "
                    "(X-Ollama-Meter-Upstream, or model management to admin_upstream), retry "
                    "(after another upstream failed). " + WITH_FLEET,
                    "reqps",
                    [
                        (
                            rate_by(
                                "upstream, decision", "ollama_meter_routing_decisions_total", F_INST
                            ),
                            "{{upstream}} {{decision}}",
                        )
                    ],
                    width=12,
                ),
                panel(
                    "Retries by reason",
                    "Attempts per second that failed before any answer and were sent to another "
                    "upstream, by the upstream that failed and why: connect (refused), reset, "
                    "busy (Ollama's 503 server busy). " + WITH_FLEET,
                    "reqps",
                    [
                        (
                            rate_by(
                                "upstream, reason", "ollama_meter_upstream_retries_total", F_INST
                            ),
                            "{{upstream}} {{reason}}",
                        )
                    ],
                    width=12,
                ),
                panel(
                    "Cold loads",
                    "Loads per minute the routing caused: requests sent to an upstream while "
                    "their model was not loaded there, that answered 2xx. Alert "
                    "OllamaMeterFleetColdLoadStorm: above 1 a minute on an upstream for 10 "
                    "minutes. " + WITH_FLEET,
                    LOADS_PER_MIN,
                    [
                        (
                            "60 * "
                            + rate_by("upstream, model", "ollama_meter_cold_loads_total", F_MODEL),
                            "{{upstream}} {{model}}",
                        )
                    ],
                    width=12,
                ),
                panel(
                    "Loaded models by upstream",
                    "Models each upstream holds in memory, from the poller's last GET /api/ps "
                    "(an upstream that does not answer reads 0). " + WITH_FLEET,
                    "short",
                    [
                        (
                            f"max by (upstream) (ollama_meter_loaded_models{{{F_FLEET}}})",
                            "{{upstream}}",
                        )
                    ],
                    width=12,
                ),
            ],
        ),
        (
            "Proxy: is ollama-meter itself healthy?",
            [
                stat(
                    "Upstream",
                    "Did Ollama answer GET /api/version during the last scrape (in a fleet: "
                    "does any upstream answer the poller; the Fleet row shows each).",
                    "none",
                    f"min(max without (upstream) (ollama_meter_upstream_up{{{F_INST}}}))",
                    "upstream",
                    width=4,
                    mappings=UP_DOWN,
                ),
                stat(
                    "Version",
                    "ollama-meter version of each instance.",
                    "none",
                    f"ollama_meter_build_info{{{F_INST}}}",
                    "{{version}}",
                    width=4,
                    text_mode="name",
                ),
                panel(
                    "Body bytes",
                    "Request and response body bytes per second.",
                    "Bps",
                    [
                        (
                            rate_by("", "ollama_meter_request_bytes_total"),
                            "in (requests)",
                        ),
                        (
                            rate_by("", "ollama_meter_response_bytes_total"),
                            "out (responses)",
                        ),
                    ],
                    width=8,
                ),
                panel(
                    "Proxy memory",
                    "Resident memory of the ollama-meter process.",
                    "bytes",
                    [
                        (
                            "process_resident_memory_bytes" + OF_METER,
                            "{{instance}}",
                        )
                    ],
                    width=4,
                ),
                panel(
                    "Proxy CPU",
                    "CPU time the ollama-meter process uses per second (1.0 is one core).",
                    "percentunit",
                    [
                        (
                            f"rate(process_cpu_seconds_total[{RATE}])" + OF_METER,
                            "{{instance}}",
                        )
                    ],
                    width=4,
                ),
            ],
        ),
        (
            "Capacity: are requests waiting for a slot, and who is turned away?",
            [
                panel(
                    "Slots in use vs configured",
                    "Requests at each gated upstream (its slots set), summed over its models, "
                    "against the slots configured per model. In use near configured for long: "
                    "requests queue in the proxy (Queue depth). " + WITH_LIMITS,
                    "short",
                    [
                        (
                            f"sum by (upstream) (ollama_meter_slots_in_use{{{F_INST}}})",
                            "{{upstream}} in use",
                        ),
                        (
                            f"max by (upstream) (ollama_meter_slots_configured{{{F_INST}}})",
                            "{{upstream}} configured",
                        ),
                    ],
                    width=8,
                ),
                panel(
                    "Queue depth",
                    "Requests waiting in the proxy for a slot, all upstreams together (at "
                    "[limits] max_queue, new ones get 503). " + WITH_LIMITS,
                    "short",
                    [(f"sum by (instance) (ollama_meter_queue_depth{{{F_INST}}})", "{{instance}}")],
                    width=4,
                ),
                panel(
                    "Queue wait p95",
                    "95th percentile of the time from arrival to a slot, by model: the wait in "
                    "the proxy's queue (Ollama's own load time is the Load duration panel). "
                    + WITH_LIMITS,
                    "s",
                    [
                        (
                            "histogram_quantile(0.95, sum by (le, model) (rate("
                            f"ollama_meter_queue_wait_seconds_bucket{{{F_MODEL}}}[{RATE}])))",
                            "{{model}}",
                        )
                    ],
                    width=6,
                ),
                panel(
                    "Rejections by reason and key",
                    "Requests refused per second: 429 for a key over its rate (rpm), tokens "
                    "(tpm) or concurrency; 503 for a full queue, a wait past max_queue_wait, or "
                    "no upstream for the model. " + WITH_LIMITS,
                    "reqps",
                    [
                        (
                            rate_by("reason, key", "ollama_meter_rejected_total", F_INST),
                            "{{reason}} {{key}}",
                        )
                    ],
                    width=6,
                ),
            ],
        ),
        (
            "Keys: who uses Ollama, and who is refused?",
            [
                panel(
                    "Top keys by tokens",
                    "Prompt plus completion tokens per second, for the 10 keys using most "
                    "(anonymous: requests without a key; other: keys past max_key_labels). "
                    + WITH_KEYS,
                    TOKENS_PER_S,
                    [
                        (
                            "topk(10, "
                            + rate_by("key", "ollama_meter_key_prompt_tokens_total", F_MODEL)
                            + " + "
                            + rate_by("key", "ollama_meter_key_completion_tokens_total", F_MODEL)
                            + ")",
                            "{{key}}",
                        )
                    ],
                    width=10,
                ),
                panel(
                    "Requests by key and status class",
                    "Requests per second by key and the class of the status the client got "
                    "(499: it went away first). " + WITH_KEYS,
                    "reqps",
                    [
                        (
                            rate_by("key, status_class", "ollama_meter_key_requests_total", F_INST),
                            "{{key}} {{status_class}}",
                        )
                    ],
                    width=10,
                ),
                stat(
                    "Keys configured",
                    "Keys in the keys file in force, disabled and expired ones included. "
                    + WITH_KEYS,
                    "short",
                    f"max(ollama_meter_keys_configured{{{F_INST}}})",
                    "keys",
                    width=4,
                    thresholds=COUNT,
                ),
                panel(
                    "Refused (4xx) by key",
                    "Requests per second answered 4xx, by key: access control's refusals "
                    "(401: no key that works, counted as anonymous; 403: a route or model the "
                    "key may not use) and Ollama's own 4xx (an unknown model). " + WITH_KEYS,
                    "reqps",
                    [
                        (
                            rate_by(
                                "key",
                                "ollama_meter_key_requests_total",
                                f'{F_INST}, status_class="4xx"',
                            ),
                            "{{key}}",
                        )
                    ],
                    width=8,
                ),
                panel(
                    "Auth failures by reason",
                    "Requests refused by access control per second: no key (missing), a key "
                    "that does not work (invalid, disabled, expired), or a route or model the "
                    "key may not use (forbidden_route, forbidden_model). " + WITH_KEYS,
                    "reqps",
                    [(rate_by("reason", "ollama_meter_auth_failures_total", F_INST), "{{reason}}")],
                    width=8,
                ),
                stat(
                    "Keys file reload errors",
                    "Reloads of the keys file that failed in the time range (the keys before "
                    "stay in force; one per broken version of the file). Whether the last one "
                    "failed: alert OllamaMeterKeysReloadFailed. " + WITH_KEYS,
                    "short",
                    "sum(increase(ollama_meter_config_reloads_total"
                    f'{{{F_INST}, result="error"}}[$__range]))',
                    "errors",
                    width=4,
                    thresholds=ANY_IS_BAD,
                ),
                stat(
                    "Audit lines lost",
                    "Audit lines that could not be written, or were dropped while the writer "
                    "was behind, in the time range ([access] audit_log). " + WITH_KEYS,
                    "short",
                    f"sum(increase(ollama_meter_audit_write_errors_total{{{F_INST}}}[$__range]))",
                    "lost",
                    width=4,
                    thresholds=ANY_IS_BAD,
                ),
            ],
        ),
        (
            "Ledger: is every request being recorded for the usage reports?",
            [
                panel(
                    "Ledger flushes by result",
                    "Flushes of the usage ledger's hourly rows to its store (SQLite or "
                    "PostgreSQL) per second, by result; failing for 10 minutes: alert "
                    "OllamaMeterLedgerFlushFailing. " + WITH_LEDGER,
                    "ops",
                    [
                        (
                            rate_by("result", "ollama_meter_ledger_flushes_total", F_INST),
                            "{{result}}",
                        )
                    ],
                    width=10,
                ),
                panel(
                    "Ledger rows waiting",
                    "Hourly usage rows in memory, not yet in the store: a flush interval's worth "
                    "while it takes writes, growing while it does not (up to max_pending_rows). "
                    + WITH_LEDGER,
                    "short",
                    [
                        (
                            f"sum by (instance) (ollama_meter_ledger_pending_rows{{{F_INST}}})",
                            "{{instance}}",
                        )
                    ],
                    width=6,
                ),
                stat(
                    "Since the last ledger flush",
                    "Time since the ledger's store last took a flush, for the meter furthest "
                    "behind: what a crash would lose. " + WITH_LEDGER,
                    "s",
                    f"max(time() - ollama_meter_ledger_last_flush_timestamp_seconds{{{F_INST}}})",
                    "behind",
                    width=4,
                    thresholds=[(None, "green"), (600, "red")],
                ),
                stat(
                    "Ledger rows dropped",
                    "Usage rows dropped in the time range because the store took no writes "
                    "for so long that max_pending_rows was reached: their requests are "
                    "missing from the usage reports. " + WITH_LEDGER,
                    "short",
                    f"sum(increase(ollama_meter_ledger_dropped_rows_total{{{F_INST}}}[$__range]))",
                    "dropped",
                    width=4,
                    thresholds=ANY_IS_BAD,
                ),
            ],
        ),
    ]


def variables() -> list[dict[str, Any]]:
    def query(name: str, label: str, source: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": source, "refId": name},
            "definition": source,
            "refresh": 2,
            "multi": True,
            "includeAll": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1,
        }

    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
        },
        query("instance", "Instance", "label_values(ollama_meter_build_info, instance)"),
        query("model", "Model", f"label_values(ollama_meter_requests_total{{{F_INST}}}, model)"),
        query(
            "endpoint",
            "Endpoint",
            f"label_values(ollama_meter_requests_total{{{F_INST}}}, endpoint)",
        ),
    ]


def dashboard() -> dict[str, Any]:
    panels: list[Panel] = []
    y = 0
    next_id = 1
    for title, members in rows():
        panels.append(
            {"type": "row", "title": title, "collapsed": False, "id": next_id, "panels": [],
             "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}}
        )  # fmt: skip
        next_id += 1
        y += 1
        x = 0
        for member in members:
            width = member["gridPos"]["w"]
            if x + width > 24:
                x, y = 0, y + 8
            member["gridPos"].update({"x": x, "y": y})
            member["id"] = next_id
            next_id += 1
            x += width
            panels.append(member)
        y += 8
    return {
        "uid": "ollama-meter",
        "title": "Ollama (ollama-meter)",
        "description": "Traffic, latency, tokens and models of an Ollama server, "
        "as metered by ollama-meter.",
        "tags": ["ollama", "llm", "ollama-meter"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "templating": {"list": variables()},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")

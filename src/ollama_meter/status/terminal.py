"""A status.json document (docs/status.md, version 1) drawn as ``rich`` renderables.

Pure: it gets the decoded document and the instant to measure relative times from ("unloads
in 4m00s", "12s ago"; cli_top.py gives the proxy's clock), and returns renderables; it
neither fetches, nor reads the clock, nor knows about terminals or key presses (cli_top.py
owns those). How one value reads and is written is status/cells.py's.

Everything in the document came over the network, and model and key names come from clients,
so every value is drawn as ``rich.text.Text``, never parsed as markup, and a field that is
missing or of the wrong type shows as ``-`` rather than raising: a newer proxy may add
fields, an older one may lack some, and a status view that crashes tells nobody anything.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from rich.box import Box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.table import Table
from rich.text import Text

from .cells import (
    Doc,
    ago,
    bar,
    count,
    duration,
    items,
    num,
    obj,
    rate,
    seconds,
    size,
    sparkline,
    text,
)

KNOWN_VERSION: Final = 1

_YEAR: Final = 365 * 86400.0
_UNBOUNDED: Final = 1 << 20


def version_problem(doc: Doc) -> str | None:
    """Why this document cannot be drawn (a version this module does not know), or None."""
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        return "the answer is not a status.json document (it has no integer version)"
    if version > KNOWN_VERSION:
        return (
            f"the proxy speaks status.json version {version}, "
            f"this ollama-meter knows {KNOWN_VERSION}: upgrade it"
        )
    return None


# --- tables that fit ---------------------------------------------------------------------------

# Rules under the header and between sections (before the total row), nothing else.
_RULES: Final = Box("    \n    \n ── \n    \n ── \n ── \n    \n    \n")
_ASCII_RULES: Final = Box("    \n    \n -- \n    \n -- \n -- \n    \n    \n", ascii=True)


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    right: bool = False
    drop: int = 0  # 0: always shown; otherwise, on a narrow terminal, the highest goes first


class Fitted:
    """A table that, when it is wider than the space it gets, leaves out its least needed
    columns one by one (rich would narrow every column instead, down to nothing for the
    names, which are the point). Whatever is still too wide is cut with an ellipsis."""

    def __init__(self, title: str, columns: Sequence[Column], *, ascii: bool) -> None:
        self.title, self.columns, self.ascii = title, tuple(columns), ascii
        self.rows: list[tuple[Sequence[Text], str | None, bool]] = []

    def add_row(self, *cells: Text, style: str | None = None, end_section: bool = False) -> None:
        self.rows.append((cells, style, end_section))

    def table(self, shown: Sequence[int]) -> Table:
        table = Table(
            title=Text(self.title, style="bold"),
            title_justify="left",
            box=_ASCII_RULES if self.ascii else _RULES,
            header_style="bold",
            show_edge=False,
            collapse_padding=True,
        )
        for i in shown:
            column = self.columns[i]
            table.add_column(
                Text(column.name),
                justify="right" if column.right else "left",
                no_wrap=True,
                overflow="ellipsis",
            )
        for cells, style, end_section in self.rows:
            row = [cells[i] if i < len(cells) else Text("") for i in shown]
            table.add_row(*row, style=style, end_section=end_section)
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        shown = list(range(len(self.columns)))
        table = self.table(shown)
        unbounded = options.update_width(_UNBOUNDED)  # a table's measure is capped at its space
        for i in sorted((i for i, c in enumerate(self.columns) if c.drop), key=self._rank):
            if console.measure(table, options=unbounded).maximum <= options.max_width:
                break
            shown.remove(i)
            table = self.table(shown)
        yield table

    def _rank(self, i: int) -> int:
        return -self.columns[i].drop


# --- the parts of the view ---------------------------------------------------------------------


def _window(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600 and s % 3600 == 0:
        return "hour" if s == 3600 else f"{s // 3600} h"
    return f"{s // 60} min" if s >= 120 and s % 60 == 0 else f"{s} s"


def header(doc: Doc, now: float) -> Text:
    meter = obj(doc.get("meter"))
    parts = [f"ollama-meter {text(meter.get('version')) or '?'}"]
    uptime = num(meter.get("uptime_seconds"))
    if uptime is not None:
        parts.append(f"up {duration(uptime)}")
    parts.append(text(meter.get("mode")) or "?")
    on = [
        name
        for field, name in (("access_control", "keys"), ("limits", "limits"), ("ledger", "ledger"))
        if meter.get(field) is True
    ]
    parts.append(", ".join(on) if on else "no keys, limits or ledger")
    generated = num(doc.get("generated_at"))
    if generated is not None:
        try:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(generated))
        except (OverflowError, OSError, ValueError):  # past what the platform's time_t holds
            stamp = "?"
        parts.append(f"{stamp} ({ago(generated, now)})")
    return Text(" | ".join(parts), style="bold", no_wrap=True, overflow="ellipsis")


def _unload(expires: float | None, now: float) -> str:
    if expires is None:
        return "-"
    if expires - now > _YEAR:  # keep_alive < 0: Ollama reports a date centuries away
        return "never"
    return "now" if expires <= now else f"in {duration(expires - now)}"


def _model_cells(model: Doc, now: float, *, ascii: bool) -> list[Text]:
    total, vram = num(model.get("size_bytes")), num(model.get("vram_bytes"))
    share = vram / total if vram is not None and total else None
    return [
        Text(text(model.get("name")) or "?"),
        Text(size(total)),
        Text("-" if share is None else f"{bar(share, ascii=ascii)} {share:.0%}"),
        Text(_unload(num(model.get("expires_at")), now)),
    ]


_FLEET: Final = (
    Column("upstream"),
    Column("up"),
    Column("breaker", drop=5),
    Column("version", drop=7),
    Column("in flight", right=True, drop=2),
    Column("slots", right=True, drop=1),
    Column("model"),
    Column("size", right=True, drop=6),
    Column("VRAM", drop=3),
    Column("unloads", right=True, drop=4),
)


def fleet(doc: Doc, now: float, *, ascii: bool = False) -> RenderableType:
    """One row per model loaded (an upstream with none still has its row); the upstream's
    own cells only on its first row. Then each poll error, and the queue."""
    part = obj(doc.get("fleet"))
    table = Fitted("Fleet", _FLEET, ascii=ascii)
    errors: list[Text] = []
    for upstream in items(part.get("upstreams")):
        name = text(upstream.get("name")) or "?"
        error = text(upstream.get("last_error"))
        if error is not None:
            polled = ago(num(upstream.get("last_poll")), now)
            errors.append(Text(f"{name}, last poll {polled}: {error}", style="red"))
        breaker = text(upstream.get("breaker"))
        slots = num(upstream.get("slots"))
        own = [
            Text(name),
            Text("up", "green") if upstream.get("up") is True else Text("DOWN", "bold red"),
            Text(breaker or "-", style="red" if breaker == "open" else ""),
            Text(text(upstream.get("version")) or "-"),
            Text(count(upstream.get("in_flight"))),
            Text(f"{count(upstream.get('slots_in_use'))}/{'-' if slots is None else count(slots)}"),
        ]
        loaded = [_model_cells(m, now, ascii=ascii) for m in items(upstream.get("models"))]
        for i, cells in enumerate(loaded or [[Text("-")]]):
            table.add_row(*(own if i == 0 else [Text("")] * len(own)), *cells)
    queue = obj(part.get("queue"))
    depth, most = count(queue.get("depth")), num(queue.get("max"))
    wait = num(queue.get("max_wait_seconds"))
    line = f"queue: {depth} waiting"
    if most is not None:
        line += f" (at most {count(most)}"
        line += f", for up to {duration(wait)})" if wait is not None else ")"
    return Group(table, *errors, Text(line))


_MODELS: Final = (
    Column("model"),
    Column("req/s", right=True, drop=1),
    Column("tok/s", right=True),
    Column("TTFT p50", right=True, drop=2),
    Column("TTFT p95", right=True, drop=5),
    Column("gen tok/s", right=True, drop=4),
    Column("req 15m", right=True, drop=6),
    Column("tok/s, 15 min", drop=3),
)


def models(doc: Doc, *, ascii: bool = False) -> RenderableType:
    """Busiest first, as the document orders them, then the total over all models."""
    part = obj(doc.get("models"))
    window = _window(num(part.get("window_seconds")) or 60)
    table = Fitted(f"Models (rates over the last {window})", _MODELS, ascii=ascii)
    rows = items(part.get("items"))
    total = obj(part.get("total"))
    for i, item in enumerate([*rows, total] if total else rows):
        is_total = i == len(rows)
        history = obj(item.get("history"))
        table.add_row(
            Text("all models" if is_total else (text(item.get("name")) or "?")),
            Text(rate(item.get("requests_per_second"))),
            Text(rate(item.get("completion_tokens_per_second"))),
            Text(seconds(item.get("ttft_p50_seconds"))),
            Text(seconds(item.get("ttft_p95_seconds"))),
            Text(rate(item.get("generation_tokens_per_second"))),
            Text(count(item.get("requests"))),
            Text(sparkline(history.get("completion_tokens_per_second"), ascii=ascii), "cyan"),
            style="bold" if is_total else None,
            end_section=i == len(rows) - 1,
        )
    return table


_KEYS: Final = (
    Column("key"),
    Column("requests", right=True),
    Column("prompt tok", right=True, drop=5),
    Column("compl tok", right=True, drop=4),
    Column("refusals", right=True, drop=1),
)
_TODAY: Final = (
    Column("today req", right=True, drop=2),
    Column("today tok", right=True, drop=3),
)


def keys(doc: Doc, *, ascii: bool = False) -> RenderableType:
    """The busiest keys of the last hour; with the ledger on, today's requests and tokens
    beside them, and below them the keys seen today but not in the last hour."""
    part = obj(doc.get("keys"))
    today = obj(part.get("today"))
    window = _window(num(part.get("window_seconds")) or 3600)
    title = f"Keys (the last {window}" + ("; today from the ledger)" if today else ")")
    table = Fitted(title, _KEYS + _TODAY if today else _KEYS, ascii=ascii)
    daily = {text(d.get("key")): d for d in items(today.get("items"))}
    hour = items(part.get("items"))
    seen = {text(k.get("key")) for k in hour}
    for item in [*hour, *(d for k, d in daily.items() if k not in seen)]:
        key = text(item.get("key"))
        in_hour = key in seen
        refusals = num(item.get("refusals"))
        cells = [
            Text(key or "?"),
            *(
                Text(count(item.get(f)) if in_hour else "-")
                for f in ("requests", "prompt_tokens", "completion_tokens")
            ),
            Text(count(refusals) if in_hour else "-", style="red" if refusals else ""),
        ]
        day = daily.get(key, {})
        p, c = num(day.get("prompt_tokens")), num(day.get("completion_tokens"))
        tokens = None if p is None and c is None else (p or 0.0) + (c or 0.0)
        table.add_row(*cells, Text(count(day.get("requests"))), Text(count(tokens)))
    return table


_PROBLEMS: Final = (
    Column("when", right=True),
    Column("status", right=True),
    Column("reason"),
    Column("route", drop=1),
    Column("model", drop=2),
    Column("key", drop=3),
    Column("upstream", drop=4),
)


def problems(doc: Doc, now: float, *, ascii: bool = False, limit: int = 20) -> RenderableType:
    table = Fitted("Problems (newest first)", _PROBLEMS, ascii=ascii)
    for problem in items(doc.get("problems"))[:limit]:
        status = num(problem.get("status"))
        table.add_row(
            Text(ago(num(problem.get("time")), now)),
            Text(count(status), style="red" if status is not None and status >= 500 else ""),
            *(Text(text(problem.get(f)) or "-") for f in ("reason", "route", "model", "key")),
            Text(text(problem.get("upstream")) or "-"),
        )
    if not table.rows:
        return Group(Text("Problems: none", style="bold"))
    return table


def render(
    doc: Doc, now: float, *, error: str | None = None, ascii: bool = False
) -> RenderableType:
    """The whole view. ``error``: the last fetch failed, so ``doc`` is the last good one:
    a banner says the data is stale and why."""
    problem = version_problem(doc)
    if problem is not None:
        return message(problem)
    parts: list[RenderableType] = []
    if error is not None:
        parts.append(Text(f"STALE: {error} (retrying)", style="bold white on red"))
    parts.append(header(doc, now))
    for part in (
        fleet(doc, now, ascii=ascii),
        models(doc, ascii=ascii),
        keys(doc, ascii=ascii),
        problems(doc, now, ascii=ascii),
    ):
        parts += [Text(""), part]
    return Group(*parts)


def message(text: str) -> Text:
    """A view that is only a message (a version it cannot draw, a first fetch under way)."""
    return Text(text, style="bold")


def render_plain(doc: Doc, now: float, width: int) -> str:
    """The view as plain text for a pipe or a file: no colour, no control codes, ASCII
    only, ``width`` columns, no trailing blanks."""
    out = io.StringIO()
    console = Console(
        file=out,
        width=max(width, 1),
        color_system=None,
        force_terminal=False,
        no_color=True,
        highlight=False,
        markup=False,
        emoji=False,
        legacy_windows=False,
    )
    console.print(render(doc, now, ascii=True))
    return "".join(line.rstrip() + "\n" for line in out.getvalue().splitlines())

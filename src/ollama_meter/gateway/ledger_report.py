"""Usage reports from the ledger's stored rows: grouped, summed and written as a table, CSV
or JSON. Pure: the rows and the clock are arguments (``ollama-meter usage`` and ``/-/usage``
read the store and call this).

Rules:
1. A report covers the hours that start in [since, until), in UTC. ``since`` is a date
   (``2026-11-01``, ``2026-11-01T13``), or an age (``7d``, ``12h``) before now, rounded down
   to the hour; the default is the start of the current month. ``until`` defaults to now.
2. ``by`` is any combination of key, team, model, endpoint, upstream, status (the class:
   2xx, 4xx, 499, 5xx), replica, day, hour; the numbers are requests, prompt tokens,
   completion tokens, GPU seconds (Ollama's prompt_eval + eval + load durations) and errors,
   summed over every replica.
3. Field names are stable (the JSON and CSV headers): the ``by`` names, then ``requests``,
   ``prompt_tokens``, ``completion_tokens``, ``gpu_seconds``, ``errors``. CSV follows
   RFC 4180 (a header row, CRLF, quotes where needed); a name a spreadsheet would read as a
   formula (starting with = + - @, a tab or a CR) is written with a leading ``'``.
4. A bad option is a ReportError (a 400, a one-line error), never a traceback: an age or a
   date outside 1970..9999, an ``until`` not after ``since``.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from .ledger import COUNTS, HOUR
from .ledger_store import KEY_COLUMNS

GROUPS: Final = (
    "key", "team", "model", "endpoint", "upstream", "status", "replica", "day", "hour"
)  # fmt: skip
DEFAULT_BY: Final = ("key", "model")
NUMBERS: Final = ("requests", "prompt_tokens", "completion_tokens", "gpu_seconds", "errors")
FORMATS: Final = ("table", "csv", "json")
_AGE: Final = re.compile(r"([0-9]{1,7})([dh])")
#: Ages and dates a report may name: from 1970 (the ledger's hours are Unix seconds) to
#: 9999 (the last year a date prints): anything else is a 400, never a 500 or a traceback.
_EARLIEST: Final = 0
_LATEST: Final = int(datetime(9999, 12, 31, 23, tzinfo=UTC).timestamp())
#: Characters that make a spreadsheet read a CSV cell as a formula (OWASP "CSV injection").
_FORMULA: Final = ("=", "+", "-", "@", "\t", "\r")
_COLUMN: Final = {name: n for n, name in enumerate((*KEY_COLUMNS, *COUNTS))}


class ReportError(ValueError):
    """A report option that does not parse (one line, naming the option)."""


def parse_time(value: str, option: str, now: float) -> int:
    """Unix seconds of a ``--since``/``--until`` value, rounded down to the hour."""
    text = value.strip()
    age = _AGE.fullmatch(text)
    if age:
        seconds = int(age[1]) * (86400 if age[2] == "d" else 3600)
        return _in_range(int(now) - seconds, value, option)
    for shape in ("%Y-%m-%d", "%Y-%m-%dT%H", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"):
        try:
            moment = datetime.strptime(text, shape).replace(tzinfo=UTC)
        except ValueError:
            continue
        return _in_range(int(moment.timestamp()), value, option)
    raise ReportError(
        f"{option}: {value[:60]!r} is not a date (2026-11-01, 2026-11-01T13, UTC) "
        "or an age (7d, 12h)"
    )


def _in_range(moment: int, value: str, option: str) -> int:
    if not _EARLIEST <= moment <= _LATEST:
        raise ReportError(f"{option}: {value[:60]!r} is before 1970 or after 9999 (UTC)")
    return moment // HOUR * HOUR


def check_span(since: int, until: int, options: tuple[str, str] = ("--since", "--until")) -> None:
    """A report's [since, until) must not be empty by mistake."""
    if until <= since:
        raise ReportError(f"{options[1]}: {_iso(until)} is not after {options[0]} {_iso(since)}")


def month_start(now: float) -> int:
    moment = datetime.fromtimestamp(now, UTC)
    return int(moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp())


def parse_by(value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in GROUPS]
    if unknown or not names:
        raise ReportError(
            f"--by: {(unknown or [value])[0][:40]!r} is not one of {', '.join(GROUPS)}"
        )
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True, slots=True)
class Report:
    since: int
    until: int
    by: tuple[str, ...]
    rows: list[dict[str, Any]]


def _group(row: Sequence[Any], name: str) -> str:
    hour = int(row[_COLUMN["hour"]])
    if name == "hour":
        return datetime.fromtimestamp(hour, UTC).strftime("%Y-%m-%dT%H:00Z")
    if name == "day":
        return datetime.fromtimestamp(hour, UTC).strftime("%Y-%m-%d")
    column = "status_class" if name == "status" else name
    return str(row[_COLUMN[column]])


def summarise(
    stored: Iterable[Sequence[Any]], since: int, until: int, by: tuple[str, ...]
) -> Report:
    """Stored rows (ledger_store's column order) summed per ``by`` group, sorted by it."""
    sums: dict[tuple[str, ...], list[float]] = {}
    c = _COLUMN
    for row in stored:
        group = tuple(_group(row, name) for name in by)
        total = sums.get(group)
        if total is None:
            total = sums[group] = [0, 0, 0, 0.0, 0]
        total[0] += row[c["requests"]]
        total[1] += row[c["prompt_tokens"]]
        total[2] += row[c["completion_tokens"]]
        total[3] += row[c["prompt_eval_seconds"]] + row[c["eval_seconds"]] + row[c["load_seconds"]]
        total[4] += row[c["errors"]]
    rows = []
    for group in sorted(sums):
        n = sums[group]
        numbers = (int(n[0]), int(n[1]), int(n[2]), round(n[3], 3), int(n[4]))
        rows.append(
            {**dict(zip(by, group, strict=True)), **dict(zip(NUMBERS, numbers, strict=True))}
        )
    return Report(since, until, by, rows)


def _iso(moment: int) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def as_json(report: Report) -> bytes:
    return orjson.dumps(
        {
            "since": _iso(report.since),
            "until": _iso(report.until),
            "by": list(report.by),
            "rows": report.rows,
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )


def as_csv(report: Report) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow((*report.by, *NUMBERS))
    for row in report.rows:
        cells = _cells(row, report.by)
        names = len(report.by)
        writer.writerow([*map(_inert, cells[:names]), *cells[names:]])
    return out.getvalue()


def _inert(cell: str) -> str:
    """A name (a key, a model: ``-2-3`` is a valid model name) that a spreadsheet would
    evaluate as a formula gets a leading ``'``, which it shows as text."""
    return "'" + cell if cell.startswith(_FORMULA) else cell


def _cells(row: dict[str, Any], by: tuple[str, ...]) -> list[str]:
    return [str(row[n]) for n in by] + [
        f"{row[n]:.3f}" if n == "gpu_seconds" else str(row[n]) for n in NUMBERS
    ]


def as_table(report: Report) -> str:
    """Aligned columns for a terminal: names left, numbers right, a total line."""
    header = [*report.by, *NUMBERS]
    body = [_cells(row, report.by) for row in report.rows]
    totals = [sum(row[n] for row in report.rows) for n in NUMBERS]
    total = ["total", *[""] * (len(report.by) - 1)] + [
        f"{v:.3f}" if n == "gpu_seconds" else str(int(v))
        for n, v in zip(NUMBERS, totals, strict=True)
    ]
    lines = [header, *body, total]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    names = len(report.by)

    def render(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i < names else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    title = f"usage {_iso(report.since)} to {_iso(report.until)} (UTC)"
    return "\n".join([title, render(header), rule, *map(render, body), rule, render(total)]) + "\n"


def render(report: Report, fmt: str) -> str:
    if fmt == "csv":
        return as_csv(report)
    if fmt == "json":
        return as_json(report).decode()
    return as_table(report)

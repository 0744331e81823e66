"""One value of a status.json document: read without trusting it, written for a cell.

Reading: the document came over the network, so a field may be missing or of any type; each
reader answers None (or an empty container) for anything but the type it expects. Strings
lose what a terminal would act on. Writing: short, fixed forms (``4m00s``, ``12.3k``,
``310ms``, a sparkline) so that columns stay narrow. Knows nothing of tables or terminals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

_SPARK: Final = "▁▂▃▄▅▆▇█"
_SPARK_ASCII: Final = ".:-=+*#@"
SPARK_WIDTH: Final = 20  # 180 points of 5 s: 9 a character, 45 s each
_BAR_WIDTH: Final = 5

Doc = Mapping[str, object]


# --- reading the document without trusting it ------------------------------------------------


def obj(value: object) -> Doc:
    return value if isinstance(value, dict) else {}


def items(value: object) -> list[Doc]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def text(value: object) -> str | None:
    """A string field, with anything a terminal would act on (an escape sequence, a
    carriage return; rich strips only some) replaced by ``?``: names come from clients."""
    if not isinstance(value, str):
        return None
    return value if value.isprintable() else "".join(c if c.isprintable() else "?" for c in value)


# --- formatting numbers ----------------------------------------------------------------------


def duration(seconds: float) -> str:
    """``35s``, ``4m00s``, ``2h02m``, ``3d04h``: two units at most, rounded down; ``-``
    for a span no int holds (two far-off times from the document, their difference inf)."""
    if not math.isfinite(seconds):
        return "-"
    s = int(max(seconds, 0.0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def ago(then: float | None, now: float) -> str:
    if then is None:
        return "-"
    return "now" if now - then < 1 else f"{duration(now - then)} ago"


def count(value: object) -> str:
    """A count in at most about five characters: ``5120``, ``12.3k``, ``1.21M``."""
    n = num(value)
    if n is None:
        return "-"
    if abs(n) < 10_000:
        return f"{n:.0f}"
    if abs(n) < 1_000_000:
        return f"{n / 1000:.1f}k"
    if abs(n) < 1_000_000_000:
        return f"{n / 1_000_000:.2f}M"
    return f"{n / 1_000_000_000:.2f}G"


def rate(value: object) -> str:
    n = num(value)
    if n is None:
        return "-"
    if abs(n) < 10:
        return f"{n:.2f}"
    return f"{n:.1f}" if abs(n) < 1000 else count(n)


def seconds(value: object) -> str:
    n = num(value)
    if n is None:
        return "-"
    return f"{n * 1000:.0f}ms" if n < 1 else f"{n:.2f}s"


def size(value: object) -> str:
    n = num(value)
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def sparkline(values: object, width: int = SPARK_WIDTH, *, ascii: bool = False) -> str:
    """``values`` (oldest first, None for a step with none) squeezed into ``width``
    characters, each the mean of its points; a blank where a character's points are all
    None. Scaled from 0 to the largest value, so a flat line at a low rate looks low."""
    points = values if isinstance(values, list) else []
    if not points or width < 1:
        return ""
    per = max(1, math.ceil(len(points) / width))
    cells: list[float | None] = []
    for start in range(0, len(points), per):
        known = [v for v in map(num, points[start : start + per]) if v is not None]
        # (Each divided first: a sum of large finite values can overflow to inf, and inf/inf
        # below is NaN.)
        cells.append(sum(v / len(known) for v in known) if known else None)
    top = max((c for c in cells if c is not None), default=0.0)
    levels = _SPARK_ASCII if ascii else _SPARK
    out = []
    for cell in cells:
        if cell is None:
            out.append(" ")
        else:
            share = cell / top if top > 0 else 0.0
            out.append(levels[min(len(levels) - 1, int(max(share, 0.0) * len(levels)))])
    return "".join(out)


def bar(share: float, *, ascii: bool) -> str:
    full = round(min(max(share, 0.0), 1.0) * _BAR_WIDTH)
    on, off = ("#", ".") if ascii else ("█", "░")
    return on * full + off * (_BAR_WIDTH - full)

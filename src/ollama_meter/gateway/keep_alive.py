"""A bound on ``keep_alive``, how long Ollama keeps a model in memory after a request.

API keys of non-admin roles may not pin a model in VRAM forever. For them the proxy hands
the body of a native inference request (``/api/generate``, ``/api/chat``, ``/api/embed``,
``/api/embeddings``) to ``clamp_keep_alive``, which replaces each top-level ``keep_alive``
value meaning longer than ``max_keep_alive`` (or forever) with the bound, as a JSON number.
Every other byte stays as the client sent it.

Rule 1: read the body as Ollama's Go decoder does, or a client slips past the bound. Go
decodes one JSON value and ignores what follows; it matches keys unescaped
(``"keep\\u005falive"``) and case-insensitively (``"Keep_Alive"``, by ``strings.EqualFold``);
the last repeated key wins, so each offending one is rewritten. Go also takes invalid UTF-8,
lone surrogate escapes and nesting 10000 deep, so we do (orjson refuses all three). What a
value means mirrors ``api.Duration.UnmarshalJSON`` and Go's ``time.ParseDuration``.
Rule 2: only top-level members count. A ``keep_alive`` in ``options``, in a ``format``
schema or in a message is data Ollama does not act on.
Rule 3: when in doubt, change nothing: a body that is not a JSON object, a ``null`` value
(absent, to Go), a value Ollama refuses (it answers 400). An absent one is not added.

How: the body is decoded as latin-1, so that character offsets are byte offsets, and the
top-level object is walked member by member while the C ``json`` scanner skips each value
(a base64 image of tens of MB included): Python works about a microsecond per top-level
member. Non-ASCII keys and ``keep_alive`` strings are decoded again as UTF-8. Pure: no I/O.
"""

from __future__ import annotations

import json
import math
import re
from typing import Final

_NS: Final = 1_000_000_000  # per second; µ below is U+00B5 (micro sign), μ U+03BC (mu)
_UNIT_NS: Final = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": _NS}
_UNIT_NS.update(m=60 * _NS, h=3600 * _NS)
_PAIR: Final = re.compile(r"([0-9]*)(\.[0-9]*)?([^0-9.]*)")  # Go: digits, fraction, unit
_BIT63: Final = 1 << 63
_UINT64: Final = (1 << 64) - 1
MAX_BOUND_SECONDS: Final = (_BIT63 - 1) // _NS  # Ollama makes int64 ns of whole seconds

_WS: Final = "[ \t\n\r]*"  # JSON's whitespace, and Go's
_OPEN: Final = re.compile(_WS + r"\{" + _WS + r"(\})?")
_MEMBER: Final = re.compile(_WS + r'"([^"\\\x00-\x1f]*)"' + _WS + ":" + _WS)
_COLON: Final = re.compile(_WS + ":" + _WS)
_NEXT: Final = re.compile(_WS + r"(?:(,)|\})")
_QUOTE: Final = re.compile(_WS + '"')
_DEEP_TOKEN: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_GO_MAX_DEPTH: Final = 10000  # encoding/json: "exceeded max depth"


def _refuse(constant: str) -> object:
    raise ValueError(f"{constant} is not JSON")  # Python would take NaN and Infinity


# parse_int=float: Python refuses to make ints of 4300+ digits; Go skips them unconverted.
_DECODER: Final = json.JSONDecoder(parse_int=float, parse_constant=_refuse)


def parse_go_duration(text: str) -> float | None:
    """Seconds of a Go ``time.ParseDuration`` string ("5m", "1h30m", "-1s", "0", "1.5h",
    "300ms", "2us", "2µs", "10ns"), or None if Go would reject it.

    A port of Go's code with its overflow rules: the sum is a uint64 of nanoseconds that may
    not pass 2**63 (2**63 - 1 when positive), about 292 years."""
    neg = text[:1] == "-"
    rest = text[1:] if text[:1] in ("-", "+") else text
    if rest == "0":
        return 0.0
    if not rest:
        return None
    total, at = 0, 0
    while at < len(rest):
        pair = _PAIR.match(rest, at)
        assert pair is not None  # each part of the pattern may be empty
        whole, fraction, unit = pair.group(1), pair.group(2) or "", pair.group(3)
        at = pair.end()
        if (not whole and len(fraction) < 2) or unit not in _UNIT_NS:
            return None  # no digits (".s"), no unit ("1", "1.5"), unknown unit ("1d")
        scale = _UNIT_NS[unit]
        digits = whole.lstrip("0") or "0"
        if len(digits) > 19 or int(digits) > _BIT63 // scale:
            return None
        value = int(digits) * scale
        numerator, denominator = 0, 1.0
        for digit in fraction[1:]:  # Go stops adding precision before a uint64 overflows
            if numerator > (_BIT63 - 1) // 10 or numerator * 10 + int(digit) > _BIT63:
                break
            numerator, denominator = numerator * 10 + int(digit), denominator * 10
        if numerator:
            value += int(numerator * (scale / denominator))  # in float64, as Go does
            if value > _BIT63:
                return None
        total = (total + value) & _UINT64  # a uint64 in Go: it wraps at 2**64
        if total > _BIT63:
            return None
    if not neg and total > _BIT63 - 1:
        return None
    return (-total if neg else total) / _NS


def keep_alive_seconds(value: object) -> float | None:
    """What Ollama makes of a decoded ``keep_alive`` value: seconds, ``math.inf`` for
    forever, or None when Ollama refuses it (and answers 400).

    A number is seconds, cut to whole ones as Ollama's ``int(t)`` does (42.9 is 42); a
    string is a Go duration; negative means forever. Anything else is refused, ``None``
    too: callers treat JSON null as absent. One deviation: Ollama wraps seconds too many
    for int64 nanoseconds (292 years) to some CPU-dependent duration; here they stay huge."""
    if isinstance(value, str):
        seconds = parse_go_duration(value)
        return None if seconds is None else (math.inf if seconds < 0 else seconds)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)  # Go decodes a JSON number to float64
    except OverflowError:
        return None
    if not math.isfinite(number):
        return None  # 1e400: too big for float64, so Go refuses it
    return math.inf if number < 0 else float(math.trunc(number))


def clamp_keep_alive(body: bytes, max_seconds: float) -> bytes | None:
    """The body with every top-level ``keep_alive`` that means longer than ``max_seconds``
    (or forever) replaced by ``max_seconds`` as a JSON number (``b"1800"`` when whole), or
    None when nothing needs to change. ``max_seconds`` is 0 to ``MAX_BOUND_SECONDS``."""
    if not 0 <= max_seconds <= MAX_BOUND_SECONDS:
        raise ValueError(f"max_seconds must be 0 to {MAX_BOUND_SECONDS}, not {max_seconds}")
    bound = float(max_seconds)
    number = (str(int(bound)) if bound.is_integer() else repr(bound)).encode()
    parts: list[bytes] = []
    done = 0
    for start, end in _keep_alive_spans(body):
        seconds = _seconds(body[start:end])
        if seconds is not None and seconds > bound:
            parts += (body[done:start], number)
            done = end
    return b"".join([*parts, body[done:]]) if parts else None


def _seconds(raw: bytes) -> float | None:
    if raw[:1] == b'"':
        return keep_alive_seconds(json.loads(raw.decode("utf-8", "replace")))
    if raw[:1] in b"-0123456789":
        return keep_alive_seconds(float(raw))  # float(), as int() refuses 4300+ digits
    return None  # null, true, false, an array, an object


def _keep_alive_spans(body: bytes) -> list[tuple[int, int]]:
    """(start, end) of the value of each top-level member Ollama reads as ``keep_alive``."""
    text = body.decode("latin-1")
    opening = _OPEN.match(text)
    if opening is None or opening.group(1):
        return []  # not an object (Go refuses it, or reads null as empty), or an empty one
    spans: list[tuple[int, int]] = []
    at = opening.end()
    try:
        while True:
            if member := _MEMBER.match(text, at):  # a key without escapes: the fast way
                key, start = member.group(1), member.end()
                quoted = (member.start(1) - 1, member.end(1) + 1)
            else:  # a key with escapes, or not JSON
                if not (quote := _QUOTE.match(text, at)):
                    return []
                at = quote.end() - 1
                key, after = _DECODER.raw_decode(text, at)
                if not (colon := _COLON.match(text, after)):
                    return []
                start, quoted = colon.end(), (at, after)
            if not key.isascii():  # raw bytes are UTF-8 to Go (invalid ones U+FFFD)
                key = json.loads(body[quoted[0] : quoted[1]].decode("utf-8", "replace"))
            end = _value_end(text, start)
            # strings.EqualFold: casefold at equal length, so no expansion (ß -> ss) counts.
            if len(key) == len("keep_alive") and key.casefold() == "keep_alive":
                spans.append((start, end))
            if not (after_value := _NEXT.match(text, end)):
                return []
            if not after_value.group(1):
                return spans  # the closing brace: what follows is ignored, as by Go
            at = after_value.end()
    except ValueError:  # json.JSONDecodeError among them
        return []


def _value_end(text: str, start: int) -> int:
    try:
        return _DECODER.raw_decode(text, start)[1]
    except RecursionError:
        pass
    # Deeper than Python's recursion limit, maybe not Go's: count brackets outside strings.
    # Lenient otherwise: a body Go refuses may be rewritten, to no effect (it answers 400).
    depth = 1  # the top-level object
    for token in _DEEP_TOKEN.finditer(text, start):
        if (char := text[token.start()]) in "[{":
            depth += 1
            if depth > _GO_MAX_DEPTH:
                raise ValueError("exceeded max depth")
        elif char in "]}" and (depth := depth - 1) == 1:
            return token.end()
    raise ValueError("unexpected end of JSON input")

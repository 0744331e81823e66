"""A bound on ``keep_alive``, how long Ollama keeps a model in memory after a request.

API keys of non-admin roles may not pin a model in VRAM forever: for them the proxy passes
the body of a native inference request (``/api/generate``, ``/api/chat``, ``/api/embed``,
``/api/embeddings``) through ``clamp_keep_alive``. It rewrites each top-level ``keep_alive``
meaning longer than ``max_keep_alive``, or forever, to the bound; no other byte changes.

Rule 1: read the body as Ollama's Go decoder does, or a client slips past the bound. Go
decodes one JSON value and ignores what follows; it matches a key once unescaped
(``"keep\\u005falive"``) and by ``strings.EqualFold`` (``"Keep_Alive"``); the last of
repeated keys wins, so each offending one is rewritten. Go takes invalid UTF-8, lone
surrogates and nesting 10000 deep, and so do we (orjson refuses all three). A value means
what Ollama's ``api.Duration.UnmarshalJSON`` makes of it, with one shortcut: a duration
string of over 64 characters (Go sums millions of "0s" parts) is bounded unparsed.
Rule 2: only top-level members count: a ``keep_alive`` in ``options``, in a ``format``
schema or in a message is data Ollama does not act on.
Rule 3: when in doubt, change nothing: a body not a JSON object, a ``null`` (absent, to Go),
a value Ollama refuses (it answers 400 itself). An absent ``keep_alive`` is not added.

How: the body is read as latin-1 (character offsets are byte offsets), member by member;
the C ``json`` scanner skips each value, a base64 image of tens of MB included. Python's
work is about a microsecond per top-level member. Pure: no I/O.
"""

from __future__ import annotations

import json
import math
import re
from typing import Final

_NS: Final = 1_000_000_000  # per second
_UNIT_NS: Final = dict(ns=1, us=1_000, ms=1_000_000, s=_NS, m=60 * _NS, h=3600 * _NS)
_UNIT_NS.update({"µs": 1_000, "μs": 1_000})  # U+00B5 micro sign, U+03BC Greek mu
_PAIR: Final = re.compile(r"(?=[\s\S])([0-9]*)(\.[0-9]*)?([^0-9.]*)")  # digits, fraction, unit
_DURATION: Final = re.compile(r"[-+]?(?:(?:[0-9]++(?:\.[0-9]*+)?+|\.[0-9]++)(?:[nuµμm]?s|m|h))++")
_LONGEST: Final = 64  # characters of a duration parsed part by part (any sane one is < 30)
_BIT63: Final = 1 << 63
_UINT64: Final = (1 << 64) - 1
MAX_BOUND_SECONDS: Final = (_BIT63 - 1) // _NS  # Ollama makes int64 ns of whole seconds

_WS: Final = "[ \t\n\r]*"  # JSON's whitespace, and Go's
_OPEN: Final = re.compile(_WS + r"\{" + _WS + r"(\})?")
_CHARS: Final = r"[^\"\\\x00-\x1f]*"  # of a JSON string, up to a quote, an escape, or a control
_MEMBER: Final = re.compile(f'{_WS}"({_CHARS}(?:\\\\["\\\\/bfnrtu]{_CHARS})*)"{_WS}:{_WS}')
_NEXT: Final = re.compile(_WS + r"(?:(,)|\})")
_DEEP_TOKEN: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|["\[\]{}]')
_GO_MAX_DEPTH: Final = 10000  # encoding/json: "exceeded max depth"


# parse_int=float: Python refuses to make ints of 4300+ digits, which Go skips unconverted.
# parse_constant=int raises ValueError on NaN, Infinity and -Infinity, which Go refuses.
_DECODER: Final = json.JSONDecoder(parse_int=float, parse_constant=int)


def parse_go_duration(text: str) -> float | None:
    """Seconds of a Go ``time.ParseDuration`` string ("5m", "1h30m", "-1s", "0", "1.5h",
    "300ms", "2us", "2µs", "10ns"), or None if Go would reject it. A port of Go's code, with
    its overflow rules: a uint64 sum of nanoseconds up to 2**63 (292 years)."""
    neg = text[:1] == "-"
    rest = text[1:] if text[:1] in ("-", "+") else text
    if rest in ("0", ""):
        return 0.0 if rest else None
    total = 0
    for pair in _PAIR.finditer(rest):  # one after the other: any character starts a pair
        whole, fraction, unit = pair.group(1), pair.group(2) or "", pair.group(3)
        if (not whole and len(fraction) < 2) or unit not in _UNIT_NS:
            return None  # no digits (".s"), no unit ("1", "1.5"), unknown unit ("1d")
        scale = _UNIT_NS[unit]
        digits = whole.lstrip("0") or "0"
        if len(digits) > 19 or int(digits) > _BIT63 // scale:
            return None
        value = int(digits) * scale
        numerator, denominator = 0, 1.0
        # Go stops adding precision before a uint64 overflows; past 308 digits its float64
        # scale is +Inf, and the fraction adds 0 however it goes on.
        for digit in fraction[1:400]:
            if numerator > (_BIT63 - 1) // 10 or numerator * 10 + int(digit) > _BIT63:
                break
            numerator, denominator = numerator * 10 + int(digit), denominator * 10
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
    forever, or None when Ollama refuses it (and answers 400). A number is seconds, cut to
    whole ones as Ollama's ``int(t)`` does (42.9 is 42); a string is a Go duration; negative
    means forever. Anything else is refused, ``None`` too: callers treat null as absent."""
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
    if number < 0:
        return math.inf
    if number >= _BIT63:  # Go's int(t) depends on the CPU here: amd64 and arm64 end <= 0
        return 0.0
    # int(t) * int(time.Second) wraps around int64 past 292 years; zero or below unloads.
    nanoseconds = ((math.trunc(number) * _NS + _BIT63) & _UINT64) - _BIT63
    return max(nanoseconds, 0) / _NS


def clamp_keep_alive(body: bytes, max_seconds: float) -> bytes | None:
    """The body with every top-level ``keep_alive`` that means longer than ``max_seconds``
    (or forever) replaced by ``max_seconds`` as a JSON number (``b"1800"`` when whole), or
    None when nothing needs to change. ``max_seconds`` is 0 to ``MAX_BOUND_SECONDS``."""
    if not 0 <= max_seconds <= MAX_BOUND_SECONDS:
        raise ValueError(f"max_seconds must be 0 to {MAX_BOUND_SECONDS}, not {max_seconds}")
    bound = float(max_seconds)
    number = (str(int(bound)) if bound.is_integer() else repr(bound)).encode()
    view = memoryview(body)  # slices without copying: the join makes the only copy
    parts: list[bytes | memoryview] = []
    done = 0
    for start, end in _keep_alive_spans(body):
        seconds = _seconds(body[start:end])
        if seconds is not None and seconds > bound:
            parts += (view[done:start], number)
            done = end
    return b"".join([*parts, view[done:]]) if parts else None


def _seconds(raw: bytes) -> float | None:
    if raw[:1] == b'"':
        text = json.loads(raw.decode("utf-8", "replace"))
        if len(text) > _LONGEST:  # Go's grammar, checked in C; its overflow, not at all
            return math.inf if _DURATION.fullmatch(text) else None
        return keep_alive_seconds(text)
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
            if not (member := _MEMBER.match(text, at)):
                return []
            key, start = member[1], member.end()
            if "\\" in key or not key.isascii():  # escapes; raw UTF-8 (invalid: U+FFFD)
                quoted = body[member.start(1) - 1 : member.end(1) + 1]
                key = json.loads(quoted.decode("utf-8", "replace"))
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
        if (char := text[token.start()]) == '"' and token.end() - token.start() == 1:
            raise ValueError("unterminated string")  # else each \\" inside starts a rescan
        if char in "[{":
            depth += 1
            if depth > _GO_MAX_DEPTH:
                raise ValueError("exceeded max depth")
        elif char in "]}" and (depth := depth - 1) == 1:
            return token.end()
    raise ValueError("unexpected end of JSON input")

"""The keep_alive bound, pure: Go's duration grammar, Ollama's reading of a value, and the
byte-exact rewrite of top-level members only, as Ollama's Go decoder would see them."""

from __future__ import annotations

import base64
import math

import pytest

from ollama_meter.gateway.keep_alive import (
    MAX_BOUND_SECONDS,
    clamp_keep_alive,
    keep_alive_seconds,
    parse_go_duration,
)

NS = 1_000_000_000
MIN, HOUR = 60 * NS, 3600 * NS
BOUND = 1800.0  # max_keep_alive = "30m"


# Go's own table (time/format_test.go, parseDurationTests), in nanoseconds.
@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("0", 0),
        ("5s", 5 * NS),
        ("1478s", 1478 * NS),
        ("-5s", -5 * NS),
        ("+5s", 5 * NS),
        ("-0", 0),
        ("+0", 0),
        ("5.0s", 5 * NS),
        ("5.6s", 5_600_000_000),
        ("5.s", 5 * NS),
        (".5s", 500_000_000),
        ("1.004s", 1_004_000_000),
        ("100.00100s", 100_001_000_000),
        ("10ns", 10),
        ("11us", 11_000),
        ("12µs", 12_000),  # U+00B5 micro sign
        ("12μs", 12_000),  # U+03BC Greek mu
        ("13ms", 13_000_000),
        ("15m", 15 * MIN),
        ("16h", 16 * HOUR),
        ("3h30m", 3 * HOUR + 30 * MIN),
        ("1h30m", 90 * MIN),
        ("1.5h", 90 * MIN),
        ("10.5s4m", 4 * MIN + 10_500_000_000),
        ("-2m3.4s", -(2 * MIN + 3_400_000_000)),
        ("1h2m3s4ms5us6ns", HOUR + 2 * MIN + 3 * NS + 4_000_000 + 5_000 + 6),
        ("0.3333333333333333333h", 20 * MIN),
        ("9007199254740993ns", (1 << 53) + 1),
        ("9223372036854775807ns", (1 << 63) - 1),
        ("9223372036854775.807us", (1 << 63) - 1),
        ("9223372036s854ms775us807ns", (1 << 63) - 1),
        ("-9223372036854775808ns", -(1 << 63)),
        ("-2562047h47m16.854775808s", -(1 << 63)),
        ("0.830103483285477580700h", 49 * MIN + 48 * NS + 372_539_827),
        ("1.00000000000000000000000000000000001s", NS),  # precision stops, no error
        # Go adds the parts as a uint64, which wraps at 2**64: it really returns 0 here.
        ("9223372036854775808ns9223372036854775808ns", 0),
    ],
)
def test_durations_go_accepts(text: str, ns: int) -> None:
    assert parse_go_duration(text) == ns / NS


@pytest.mark.parametrize(
    "text",
    [
        "",
        "3",  # a number without a unit; only "0" may go without
        "00",
        "-",
        "s",
        ".",
        "-.",
        ".s",
        "+.s",
        "1d",
        "1 s",
        " 1s",
        "1s ",
        "5m30",
        "1e3s",
        "+-1s",
        "1h-1m",
        "1S",
        "\x85\x85",
        "hello \ufffdff world",
        "\uff11s",  # a fullwidth digit one: Go reads ASCII digits only
        "9223372036854775810ns",
        "9223372036854775808ns",
        "-9223372036854775809ns",
        "9223372036854776us",
        "3000000h",  # past 2**63 ns, about 292 years
        "9223372036854775.808us",
        "9223372036854ms775us808ns",
        "1" * 500 + "s",
    ],
)
def test_durations_go_rejects(text: str) -> None:
    assert parse_go_duration(text) is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (42, 42.0),
        (42.5, 42.0),  # Ollama's int(t): whole seconds (its own test says so)
        (1800.9, 1800.0),
        (-0.0, 0.0),
        (-1, math.inf),  # negative: forever
        (-0.5, math.inf),
        (9223372036, 9223372036.0),
        # Past 2**63 ns Ollama's int64 wraps around, mostly to zero or below: it unloads.
        (9223372037, 0.0),
        (1e10, 0.0),
        (2e10, 1553255926.290448384),  # 2e19 - 2**64 ns
        (1e19, 0.0),
        (1e300, 0.0),
        ("5m", 300.0),
        ("0s", 0.0),  # what the Go CLI sends to unload
        ("0", 0.0),
        ("-0s", 0.0),
        ("-1m", math.inf),
        ("-1ns", math.inf),
        ("1000h", 3_600_000.0),
        ("5µs", 5e-6),
    ],
)
def test_what_ollama_makes_of_a_value(value: object, seconds: float) -> None:
    assert keep_alive_seconds(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        *(None, True, False, [], [5], {}, {"s": 5}, "", "forever", "1d", "5"),
        *(math.inf, -math.inf, math.nan, 10**400),  # what Go's float64 cannot hold
    ],
)
def test_values_ollama_refuses(value: object) -> None:
    assert keep_alive_seconds(value) is None


@pytest.mark.parametrize(
    ("body", "clamped"),
    [
        (b'{"model":"m","keep_alive":-1}', b'{"model":"m","keep_alive":1800}'),
        (b'{"keep_alive":-0.5,"model":"m"}', b'{"keep_alive":1800,"model":"m"}'),
        (b'{"keep_alive":1801}', b'{"keep_alive":1800}'),
        (b'{"keep_alive":2e10}', b'{"keep_alive":1800}'),  # 49 years, once wrapped
        (b'{"keep_alive":1E+400}', None),  # beyond float64: Ollama answers 400
        (b'{"keep_alive":"-1m"}', b'{"keep_alive":1800}'),
        (b'{"keep_alive":"1000h"}', b'{"keep_alive":1800}'),
        (b'{"keep_alive":"30m0.000000001s"}', b'{"keep_alive":1800}'),
        (b'{"keep_alive":"1h","stream":false}', b'{"keep_alive":1800,"stream":false}'),
        # The µ as UTF-8 bytes, decoded as such (read as latin-1, "Âµs" would pass).
        ('{"keep_alive":"3600000000µs"}'.encode(), b'{"keep_alive":1800}'),
        (b'{"keep_alive":"3600000000\\u00b5s"}', b'{"keep_alive":1800}'),
    ],
)
def test_a_value_beyond_the_bound_is_replaced(body: bytes, clamped: bytes | None) -> None:
    assert clamp_keep_alive(body, BOUND) == clamped


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","prompt":"hi"}',  # absent: Ollama's default applies
        b"{}",
        b" { } ",
        b'{"keep_alive":1800}',
        b'{"keep_alive":1800.9}',  # 1800 s to Ollama
        b'{"keep_alive":"30m"}',
        b'{"keep_alive":0}',
        b'{"keep_alive":1e10}',  # wraps around to below zero in Ollama: unloads at once
        b'{"keep_alive":"0s"}',
        b'{"keep_alive":"-0s"}',
        b'{"keep_alive":"5\xc2\xb5s"}',
        b'{"keep_alive":null}',  # absent, to Go
        b'{"keep_alive":true}',  # refused by Ollama: its 400, not ours
        b'{"keep_alive":"forever"}',
        b'{"keep_alive":"1d"}',
        b'{"keep_alive":[-1]}',
        b'{"keep_alive":{"s":-1}}',
    ],
)
def test_nothing_to_change(body: bytes) -> None:
    assert clamp_keep_alive(body, BOUND) is None


def test_whitespace_and_every_other_byte_stay() -> None:
    body = b' {\n  "model" : "m" ,\r\n  "keep_alive"\t :\n -1 \t, "x":[1, {"y": 2}]\n}\n'
    clamped = b' {\n  "model" : "m" ,\r\n  "keep_alive"\t :\n 1800 \t, "x":[1, {"y": 2}]\n}\n'
    assert clamp_keep_alive(body, BOUND) == clamped


@pytest.mark.parametrize(
    "key",
    [
        b"keep\\u005falive",
        b"\\u006b\\u0065\\u0065\\u0070\\u005f\\u0061\\u006c\\u0069\\u0076\\u0065",
        b"Keep_Alive",
        b"KEEP_ALIVE",
        b"kEeP_aLiVe",
        b"KEEP\\u005FALIVE",
        "\u212aeep_alive".encode(),  # the Kelvin sign folds to k in Go's EqualFold
        b"\\u212aeep_alive",
    ],
)
def test_keys_go_reads_as_keep_alive(key: bytes) -> None:
    body = b'{"model":"m","' + key + b'":"2h"}'
    assert clamp_keep_alive(body, BOUND) == b'{"model":"m","' + key + b'":1800}'


@pytest.mark.parametrize(
    "key",
    [
        b"keepalive",
        b"keep-alive",
        b"keep_alive ",
        b" keep_alive",
        b"keep_alive\\u0000",
        "keep_al\u0131ve".encode(),  # dotless i: not in i's fold set, to Go as to us
        "keep_al\u0130ve".encode(),  # dotted capital I: casefolds to two characters
        b"keep_al\xffve",  # invalid UTF-8 is U+FFFD to Go
    ],
)
def test_keys_go_reads_as_something_else(key: bytes) -> None:
    assert clamp_keep_alive(b'{"' + key + b'":-1}', BOUND) is None


def test_every_offending_duplicate_is_replaced() -> None:
    # Go keeps the last (null: absent), but which one wins is not ours to judge.
    body = b'{"keep_alive":-1,"m":"x","keep_alive":"10m","Keep_Alive":"2h","keep_alive":null}'
    clamped = b'{"keep_alive":1800,"m":"x","keep_alive":"10m","Keep_Alive":1800,"keep_alive":null}'
    assert clamp_keep_alive(body, BOUND) == clamped


def test_only_top_level_members_count() -> None:
    nested = (
        b'{"model":"m","options":{"keep_alive":-1,"num_ctx":4096},'
        b'"format":{"type":"object","properties":{"keep_alive":{"type":"integer"}}},'
        b'"messages":[{"role":"user","content":"{\\"keep_alive\\": -1}"},{"keep_alive":-1}],'
        b'"prompt":"\\"keep_alive\\":-1","images":["keep_alive"]'
    )
    assert clamp_keep_alive(nested + b"}", BOUND) is None
    clamped = clamp_keep_alive(nested + b',"keep_alive":-1}', BOUND)
    assert clamped == nested + b',"keep_alive":1800}'


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"null",  # Go decodes null to an empty request
        b'[{"keep_alive":-1}]',
        b'"{\\"keep_alive\\":-1}"',
        b"-1",
        b'\xef\xbb\xbf{"keep_alive":-1}',  # a BOM: Go refuses it
    ],
)
def test_a_body_that_is_not_an_object_stays(body: bytes) -> None:
    assert clamp_keep_alive(body, BOUND) is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"keep_alive":-1',
        b'{"keep_alive":-1,',
        b'{"keep_alive":-1,}',
        b'{"keep_alive" -1}',
        b'{"keep_alive":-1 "x":1}',
        b'{"keep_alive":-1,"x"}',
        b'{"keep_alive":-1,"x":}',
        b"{'keep_alive':-1}",
        b"{keep_alive:-1}",
        b'{"keep_alive":- 1}',
        b'{"keep_alive":01}',
        b'{"keep_alive":NaN}',
        b'{"keep_alive":-Infinity}',
        b'{"keep_alive":-1,"x":NaN}',
        b'{"keep_alive":-1,"x":[1,]}',
        b'{"keep_alive":-1,"x":"tab\there"}',  # a raw control character in a string
        b'{"keep\\x5falive":-1}',
        b'{"keep\\u5falive":-1}',
        # Deep, then a string that never ends: found in one pass, not one per escaped quote.
        b'{"keep_alive":-1,"x":' + b"[" * 5000 + b'"' + b'\\"' * 200_000,
    ],
)
def test_invalid_json_stays(body: bytes) -> None:
    assert clamp_keep_alive(body, BOUND) is None


@pytest.mark.parametrize(
    ("head", "tail"),
    [
        # Go decodes one value and ignores what follows it.
        (b'{"keep_alive":', b'}\n{"keep_alive":-1} trailing garbage'),
        # Go takes invalid UTF-8 and lone surrogates; orjson would refuse the body.
        (b'{"prompt":"\xff\xfe\xc3","keep_alive":', b"}"),
        (b'{"prompt":"\\ud800","keep_alive":', b"}"),
        # An int of 5000 digits: Python's int() refuses it; Go skips it unconverted.
        (b'{"seed":' + b"7" * 5000 + b',"keep_alive":', b"}"),
        # Deeper than Python's recursion limit, within Go's 10000.
        (b'{"x":' + b"[" * 5000 + b'"]"' + b"]" * 5000 + b',"keep_alive":', b"}"),
        (b'{"x":' + b'{"a":' * 3000 + b"{}" + b"}" * 3000 + b',"keep_alive":', b"}"),
    ],
)
def test_bodies_go_accepts_and_others_would_not(head: bytes, tail: bytes) -> None:
    assert clamp_keep_alive(head + b"-1" + tail, BOUND) == head + b"1800" + tail


def test_a_duration_too_long_to_parse_part_by_part() -> None:
    # Go would sum a million parts; we bound any that is a duration by its grammar.
    zeros = b'{"keep_alive":"' + b"0s" * 1_000_000 + b'"}'
    assert clamp_keep_alive(zeros, BOUND) == b'{"keep_alive":1800}'
    assert clamp_keep_alive(b'{"keep_alive":"' + b"0s" * 32 + b'"}', BOUND) is None
    assert clamp_keep_alive(b'{"keep_alive":"' + b"0s" * 1_000_000 + b'0"}', BOUND) is None


def test_nesting_deeper_than_go_allows_stays() -> None:
    def body(depth: int) -> bytes:
        return b'{"x":' + b"[" * depth + b"]" * depth + b',"keep_alive":-1}'

    assert clamp_keep_alive(body(9999), BOUND) == body(9999)[:-3] + b"1800}"  # 10000 in all
    assert clamp_keep_alive(body(10000), BOUND) is None


@pytest.mark.parametrize(
    ("bound", "number"),
    [(1800, b"1800"), (1800.0, b"1800"), (0, b"0"), (90.5, b"90.5"), (MAX_BOUND_SECONDS, None)],
)
def test_the_bound_is_written_as_a_json_number(bound: float, number: bytes | None) -> None:
    expected = b'{"keep_alive":' + (number or str(MAX_BOUND_SECONDS).encode()) + b"}"
    assert clamp_keep_alive(b'{"keep_alive":"-1s"}', bound) == expected


@pytest.mark.parametrize("bound", [-1, MAX_BOUND_SECONDS + 1, math.inf, math.nan])
def test_a_bound_ollama_cannot_hold_is_a_programming_error(bound: float) -> None:
    with pytest.raises(ValueError, match="max_seconds"):
        clamp_keep_alive(b'{"keep_alive":-1}', bound)


def test_a_20_mb_image_body() -> None:
    image = base64.b64encode(bytes(range(256)) * (15 * 1024 * 1024 // 256))
    head = b'{"model":"llava","prompt":"What is in this picture?","images":["' + image
    head += b'"],"stream":false,"options":{"keep_alive":-1},"keep_alive":'
    assert len(head) > 20 * 1024 * 1024
    assert clamp_keep_alive(head + b'"-1s"}', BOUND) == head + b"1800}"
    assert clamp_keep_alive(head + b'"5m"}', BOUND) is None

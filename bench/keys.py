"""Micro-benchmark of the access check: ``python bench/keys.py [--keys N] [--repeat R]
[--json FILE]``.

Times ``Access.identify(headers, "POST", route_for("/api/generate"))``, the step proxy.py runs
on every request with access control on, against a KeyRing of ``--keys`` keys (1,000) loaded
from a real keys file, with the head an ollama client sends and a valid ``Authorization:
Bearer`` key; then its failure paths (a wrong secret, an unknown id, a token that is no key,
no credential), its parts, and the record step's per-key usage (``Access.finished``).

timeit loops (``number`` sized by autorange to about 0.2 s); the cases are interleaved, one
repeat of each in turn, every other pass in reverse order, and the report gives each case's
median (and fastest) repeat in µs a call. Pin it to a core of its own for steadier figures:
``taskset -c 0 python bench/keys.py``.

``write_keys_file`` is also what run.py's ``--keys N`` uses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from ollama_meter.exchange import Exchange
from ollama_meter.gateway.access import Access
from ollama_meter.gateway.identity import KeyRing, credential
from ollama_meter.gateway.keys import KEY_PREFIX, Role, digest_of, load_keys, new_key
from ollama_meter.gateway.policy import route_class
from ollama_meter.gateway.usage import KeyUsage
from ollama_meter.ollama import Usage, route_for

#: The head of a small non-streamed generate request from the ollama Python client (httpx),
#: as aiohttp hands it to the proxy; the Authorization value is added per case.
CLIENT_HEAD: tuple[tuple[str, str], ...] = (
    ("Host", "127.0.0.1:11434"),
    ("Accept-Encoding", "gzip, deflate"),
    ("Connection", "keep-alive"),
    ("Content-Length", "68"),
    ("Content-Type", "application/json"),
    ("Accept", "application/json"),
    ("User-Agent", "ollama-python/0.6.0 (x86_64 linux) Python/3.11.7"),
)


def write_keys_file(path: Path, count: int, role: Role = "inference") -> list[str]:
    """A keys file of ``count`` keys named ``bench-0000``..., in the layout ``append_key``
    writes, checked by loading it as the proxy does; the keys, in file order.

    Not ``append_key`` itself: it rereads and rewrites the whole file through tomlkit for every
    key, so 1,000 keys take about two minutes (the 1,000th call alone 0.26 s)."""
    keys: list[str] = []
    ids: set[str] = set()
    lines: list[str] = []
    for number in range(count):
        key, ident = new_key(ids.__contains__)
        ids.add(ident)
        keys.append(key)
        lines += [
            "[[key]]",
            f'id = "{ident}"',
            f'name = "bench-{number:04d}"',
            f'sha256 = "{digest_of(key).hex()}"',
            f'role = "{role}"',
        ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)
    entries = load_keys(path)
    assert len(entries) == count
    assert all(e.digest == digest_of(k) for e, k in zip(entries, keys, strict=True))
    return keys


def head(authorization: str | None) -> CIMultiDictProxy[str]:
    headers = CIMultiDict(CLIENT_HEAD)
    if authorization is not None:
        headers["Authorization"] = authorization
    return CIMultiDictProxy(headers)


def build(count: int, directory: Path) -> tuple[Access, list[str]]:
    keys = write_keys_file(directory / "keys.toml", count)
    ring = KeyRing(load_keys(directory / "keys.toml"))
    usage = KeyUsage(CollectorRegistry(), max_key_labels=100)
    access = Access(ring, usage, anonymous=None, max_keep_alive=None, audit=None)
    return access, keys


def cases(count: int, directory: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (statement, its globals)."""
    access, keys = build(count, directory)
    (directory / "one").mkdir()
    small, small_keys = build(1, directory / "one")
    valid = keys[count // 2]
    # The same id with another secret: found by id, refused by the digest (the costliest miss).
    wrong_secret = valid[:-1] + ("A" if valid[-1] != "A" else "B")
    unknown_id = f"{KEY_PREFIX}{'z' * 8}{valid[11:]}"
    assert access.ring.matching(unknown_id) is None
    route = route_for("/api/generate")
    identify = access.identify
    refusals = {
        "wrong secret": head(f"Bearer {wrong_secret}"),
        "unknown id": head(f"Bearer {unknown_id}"),
        "not a key": head("Bearer sk-proj-0123456789abcdefghijklmnopqrstuvwxyz"),
        "missing": head(None),
    }
    for name, headers in refusals.items():
        gate = identify(headers, "POST", route)
        assert gate.refusal is not None, name
    ok = head(f"Bearer {valid}")
    gate = identify(ok, "POST", route)
    assert gate.refusal is None
    assert gate.identity.name == f"bench-{count // 2:04d}"
    x = Exchange("POST", route.template, 0.0, inference=True)
    x.status, x.finished, x.model = 200, 0.001, "llama3.2"
    x.usage = Usage(26, 290, 0.01, 0.5)
    x.key, x.team, x.gate = gate.identity.name, gate.identity.team, gate
    g: dict[str, Any] = {
        "identify": identify,
        "route": route,
        "ok": ok,
        "key": valid,
        "ring": access.ring,
        "now": time.time(),
        "credential": credential,
        "route_class": route_class,
        "template": route.template,
        "digest_of": digest_of,
        "finished": access.finished,
        "requests": access.usage.requests,
        "x": x,
        "gate": gate,
        "small": small.identify,
        "small_ok": head(f"Bearer {small_keys[0]}"),
    }
    table: dict[str, tuple[str, dict[str, Any]]] = {
        f"identify: valid key ({count:,} keys)": ('identify(ok, "POST", route)', g),
        "identify: valid key (1 key)": ('small(small_ok, "POST", route)', g),
    }
    for name, headers in refusals.items():
        table[f"identify: {name} (401)"] = ('identify(h, "POST", route)', {**g, "h": headers})
    table |= {
        "  credential(headers)": ("credential(ok)", g),
        "  KeyRing.authenticate(key, now)": ("ring.authenticate(key, now)", g),
        "    digest_of(key) (SHA-256)": ("digest_of(key)", g),
        "  route_class(method, template)": ('route_class("POST", template)', g),
        "record step: Access.finished (per-key usage)": (
            'finished(x, gate, lambda: "127.0.0.1", "/api/generate")',
            g,
        ),
        "  one of its three counter additions": (
            'requests.add(("bench-0500", "", "2xx"), 1)',
            g,
        ),
    }
    return table


def measure(
    table: dict[str, tuple[str, dict[str, Any]]], repeat: int
) -> dict[str, dict[str, float]]:
    timers = {name: timeit.Timer(stmt, globals=g) for name, (stmt, g) in table.items()}
    numbers = {}
    for name, timer in timers.items():
        number, _ = timer.autorange()  # at least 0.2 s
        numbers[name] = number
    runs: dict[str, list[float]] = {name: [] for name in timers}
    names = list(timers)
    for pass_ in range(repeat):
        for name in names if pass_ % 2 == 0 else names[::-1]:
            seconds = timers[name].timeit(numbers[name])
            runs[name].append(1e6 * seconds / numbers[name])
    return {
        name: {
            "median_us": statistics.median(values),
            "min_us": min(values),
            "max_us": max(values),
            "number": numbers[name],
            "repeats": len(values),
        }
        for name, values in runs.items()
    }


def render(results: dict[str, dict[str, float]], command: str) -> str:
    lines = [
        f"`{command}` (Python {platform.python_version()}, on CPU "
        f"{','.join(map(str, sorted(os.sched_getaffinity(0))))}), µs a call, median of "
        f"{int(next(iter(results.values()))['repeats'])} interleaved repeats:",
        "",
        "| call | median (µs) | fastest (µs) | slowest (µs) |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['median_us']:.2f} | {r['min_us']:.2f} | {r['max_us']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1000, help="keys in the ring (1,000)")
    parser.add_argument("--repeat", type=int, default=9, help="repeats of each case (9)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ollama-meter-keys-") as directory:
        table = cases(args.keys, Path(directory))
        results = measure(table, args.repeat)
    print(render(results, "python " + " ".join(["bench/keys.py", *sys.argv[1:]])))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

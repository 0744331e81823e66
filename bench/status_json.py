"""Micro-benchmark of the status page: ``python bench/status_json.py [--repeat R] [--json FILE]``.

Budget (issue 14): /-/status.json costs < 5 ms to build with 20 upstreams, 100 models and
100 keys. Times, on tests/status_fixture.py's busy page (15 minutes of traffic on 100
models from 100 keys, 20 upstreams of 5 loaded models each, a queue, the ledger's day):

- ``build``: snapshot.build, what the handler does but the socket (the same step of the
  5 s rings as the last call: the page polls every 2 s, so most polls fall in a step whose
  closed points are already worked out);
- ``build + dumps``: the same, and orjson.dumps of it, the whole cost of an answer's body;
- ``build, new step``: the first build in a new step (at most one poll in 5 s), after the
  step's traffic (34 requests, as in the fixture's steps): the rings move on, and the new
  closed point of each history is worked out;
- ``record``: Recorder.record of one streamed request, what every proxied request pays
  for the page (the record step, proxy.py ``_record``).

timeit loops sized to about 0.2 s, the cases interleaved (every other pass reversed), median
of ``--repeat`` (9), µs a call (bench/keys.py's ``measure``). Pin it to a core of its own:
``taskset -c 0 python bench/status_json.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import orjson
from keys import measure, render

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ollama_meter.exchange import Exchange
from ollama_meter.ollama import Usage
from tests.status_fixture import NOW, busy


def cases() -> dict[str, tuple[str, dict[str, Any]]]:
    page = busy()
    stepping = busy()
    moments = iter(NOW + 5.0 * n for n in range(1, 10**9))
    clock = [NOW]
    stepping.recorder.clock = lambda: clock[0]
    traffic = []
    for n in range(0, 100, 3):
        y = Exchange("POST", "/api/chat", NOW, model=f"model-{n:03d}:7b", stream=True)
        y.inference = y.streamed = True
        y.first_byte, y.status, y.usage, y.key = NOW + 0.2, 200, Usage(34, 3, 0.05, 0.04), "k"
        traffic.append(y)

    def new_step() -> None:
        clock[0] = next(moments)
        for y in traffic:
            stepping.recorder.record(y)
        stepping.build(clock[0])

    x = Exchange("POST", "/api/chat", NOW, model="model-001:7b", stream=True, inference=True)
    x.streamed, x.first_byte, x.status = True, NOW + 0.2, 200
    x.usage = Usage(34, 3, 0.05, 0.04)
    x.key = "key-001"
    fresh = busy()
    fresh.recorder.clock = lambda: NOW
    g = {"page": page, "dumps": orjson.dumps, "NOW": NOW, "new_step": new_step, "x": x}
    g["record"] = fresh.recorder.record
    return {
        "build": ("page.build(NOW)", g),
        "build + dumps": ("dumps(page.build(NOW))", g),
        "build, new step": ("new_step()", g),
        "record": ("record(x)", g),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9, help="repeats of each case (9)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    results = measure(cases(), args.repeat)
    print(render(results, "python " + " ".join(["bench/status_json.py", *sys.argv[1:]])))
    size = len(orjson.dumps(busy().build()))
    print(f"\nThe busy page's body: {size:,} bytes.")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""A busy status page: 20 upstreams, 100 models and 100 keys, after 15 minutes of traffic.

Built with the proxy's own objects (the recorder fed real Exchanges, fleet Nodes holding what
their polls would hold), for the structure test (tests/test_status_json.py) and the cost
benchmark (bench/status_json.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from yarl import URL

from ollama_meter.exchange import Exchange
from ollama_meter.fleet_settings import UpstreamSettings
from ollama_meter.gateway.fleet import Fleet
from ollama_meter.gateway.router import model_key
from ollama_meter.ollama import Usage
from ollama_meter.status.recorder import POINTS, STEP, Recorder
from ollama_meter.status.snapshot import Meter, Queue, Today, build, fleet_upstreams

NOW = 1_796_220_000.0


@dataclass
class Busy:
    meter: Meter
    recorder: Recorder
    fleet: Fleet
    queue: Queue
    today: Today

    def build(self, now: float = NOW) -> dict[str, Any]:
        upstreams = fleet_upstreams(self.fleet.nodes, self.queue, now)
        return build(self.meter, self.recorder, upstreams, self.queue, self.today, now)


def busy(upstreams: int = 20, models: int = 100, keys: int = 100) -> Busy:
    clock = [NOW - POINTS * STEP]
    recorder = Recorder(lambda name: name or "anonymous", _reader(clock), keys_on=True)
    names = [f"model-{n:03d}:7b" for n in range(models)]
    step = 0
    while clock[0] < NOW:
        for n, name in enumerate(names):
            if (n + step) % 3:  # not every model every step
                continue
            x = Exchange("POST", "/api/chat", clock[0], model=name, stream=True, inference=True)
            x.streamed = True
            x.first_byte = x.started + 0.02 * (1 + n % 40)
            x.status = 429 if (n + step) % 97 == 0 else 200
            x.refused = "rate" if x.status == 429 else None
            x.usage = None if x.refused else Usage(20 + n, 5 + n % 50, 0.01, 0.05 + n / 1000)
            x.key = f"key-{(n * 7 + step) % keys:03d}"
            recorder.record(x)
        clock[0] += STEP / 2
        step += 1
    fleet = Fleet(
        [
            UpstreamSettings(f"gpu-{n:02d}", URL(f"http://10.0.0.{n}:11434"), 4, 5)
            for n in range(upstreams)
        ],
        2.0,
    )
    in_use: dict[tuple[str, str], int] = {}
    for n, node in enumerate(fleet.nodes):
        node.answered = n != 3
        node.version = b'{"version":"0.33.0"}'
        node.last_poll = NOW - 1.5
        loaded = [names[(n * 5 + m) % models] for m in range(5)]
        node.ps = [
            {
                "name": name,
                "size": 4_000_000_000,
                "size_vram": 3_000_000_000,
                "expires_at": "2026-12-02T12:04:05.123456789Z",
                "context_length": 8192,
            }
            for name in loaded
        ]
        node.in_flight_by = {model_key(name): 2 for name in loaded}
        node.in_flight = 10
        for name in loaded:
            in_use[(node.name, model_key(name))] = 2
    in_use_by = {node.name: 10 for node in fleet.nodes}
    queue = Queue(17, 64, 30.0, {node.name: 4 for node in fleet.nodes}, in_use, in_use_by)
    meter = Meter("0.1.0", NOW - 86400, "fleet", True, True, True, "/metrics", {"listen": "x"})
    today = Today(
        NOW // 86400 * 86400,
        NOW - 10,
        [
            {"key": f"key-{k:03d}", "requests": 100, "prompt_tokens": 10, "completion_tokens": 5}
            for k in range(keys)
        ],
    )
    return Busy(meter, recorder, fleet, queue, today)


def _reader(clock: list[float]) -> Callable[[], float]:
    return lambda: clock[0]

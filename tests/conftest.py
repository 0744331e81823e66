"""Shared fixtures: a fake Ollama and ollama-meter in front of it, both on loopback sockets."""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from pytest_aiohttp import AiohttpServer

from ollama_meter.app import METRICS, create_app
from ollama_meter.config import Config
from ollama_meter.metrics import build_registry
from ollama_meter.settings import Settings

from .fake_fleet import start_fleet as start_fleet  # the fake fleet's fixture, for every module
from .fake_ollama import FakeOllama

# Variables the official clients (and httpx) read: a developer's shell must not change a test.
_CLIENT_ENV = ("OLLAMA_HOST", "OLLAMA_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL")


def unused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if (
            name in _CLIENT_ENV
            or name.upper().endswith("_PROXY")
            or name.startswith("OLLAMA_METER_")
        ):
            monkeypatch.delenv(name)


@pytest.fixture
async def fake(aiohttp_server: AiohttpServer) -> FakeOllama:
    fake = FakeOllama()
    server = await aiohttp_server(fake.app)
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


@dataclass
class Meter:
    """ollama-meter running in front of the fake, with its own registry."""

    server: TestServer
    registry: CollectorRegistry
    app: web.Application

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def value(self, name: str, **labels: str) -> float:
        """A sample of the registry (0 when the series does not exist)."""
        sample = self.registry.get_sample_value(f"ollama_meter_{name}", labels)
        return 0.0 if sample is None else sample

    def series(self, name: str) -> list[dict[str, str]]:
        """Label sets of every sample of one family (by sample name)."""
        return [
            dict(sample.labels)
            for metric in self.registry.collect()
            for sample in metric.samples
            if sample.name == f"ollama_meter_{name}"
        ]


class _Families:
    """The ollama_meter_ families of a registry (not the process and platform ones)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        return [m for m in self._registry.collect() if m.name.startswith("ollama_meter_")]


MeterFactory = Callable[..., Awaitable[Meter]]


@pytest.fixture
def start_meter(aiohttp_server: AiohttpServer, fake: FakeOllama) -> MeterFactory:
    """Start ollama-meter; keyword arguments override Config.build's (upstream: the fake),
    but ``settings``, the gateway's (settings.Settings)."""

    async def start(settings: Settings | None = None, **overrides: Any) -> Meter:
        options: dict[str, Any] = {"listen": "127.0.0.1:0", "upstream": fake.url}
        options.update(overrides)
        registry = build_registry()
        app = create_app(Config.build(**options), registry, settings)
        server = await aiohttp_server(app)
        # Read the app's metrics through prometheus_client's own Collector interface (the
        # /metrics handler renders the same samples faster; tests/test_metrics.py checks that),
        # and the gateway's families, which live in the registry.
        view = CollectorRegistry()
        view.register(app[METRICS])
        view.register(_Families(registry))
        return Meter(server, view, app)

    return start


@pytest.fixture
async def meter(start_meter: MeterFactory) -> Meter:
    return await start_meter()

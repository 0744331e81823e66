"""Scrape-time probes: one shared probe, an answer reused for under a second (MAX_AGE)."""

from __future__ import annotations

import asyncio

import aiohttp
from yarl import URL

from ollama_meter.upstreams import MAX_AGE, Upstream

from .fake_ollama import FakeOllama


async def test_answers_are_shared_and_reused_for_under_max_age(fake: FakeOllama) -> None:
    now = [100.0]
    async with aiohttp.ClientSession() as session:
        upstream = Upstream(session, URL(fake.url), 2.0, clock=lambda: now[0])
        states = await asyncio.gather(*(upstream.state() for _ in range(10)))
        assert all(state.up for state in states)
        assert fake.count("/api/ps") == 1  # ten at once: one probe
        now[0] += MAX_AGE - 0.01
        await upstream.state()
        assert fake.count("/api/ps") == 1  # younger than MAX_AGE: reused
        now[0] += 0.01
        await upstream.state()
        assert fake.count("/api/ps") == 2  # MAX_AGE old: asked again

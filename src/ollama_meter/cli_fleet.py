"""``ollama-meter fleet status`` and ``fleet pull``: a running proxy's fleet, from a shell.

Both talk to the proxy (``--url``, default http://127.0.0.1:11435), never to the servers
behind it, so a pull passes the proxy's access control, audit log and metrics like any other.
With access control on, give an admin key (``--key``, or ``OLLAMA_METER_KEY``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import click
import orjson

from .cli_client import key_option, url_option
from .gateway.dispatch import PIN_HEADER


def _error(status: int, body: bytes) -> str:
    """The message of an error answer ({"error": "..."}), else its first bytes."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    message = doc.get("error") if isinstance(doc, dict) else None
    return f"{status}: {message if isinstance(message, str) else body[:200]!r}"


def _headers(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


async def _status(url: str, key: str | None) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(headers=_headers(key)) as session,
        session.get(url.rstrip("/") + "/-/fleet") as response,
    ):
        body = await response.read()
        if response.status != 200:
            raise click.ClickException(f"{url}/-/fleet: {_error(response.status, body)}")
    doc: dict[str, Any] = orjson.loads(body)
    return doc


@click.group("fleet")
def fleet_command() -> None:
    """The upstreams of a running proxy."""


@fleet_command.command("status")
@url_option
@key_option
def status(url: str, key: str | None) -> None:
    """Each upstream: up, breaker, models loaded, requests in flight per model, slots, and
    the last error."""
    try:
        doc = asyncio.run(_status(url, key))
    except aiohttp.ClientError as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}") from None
    rows = [("UPSTREAM", "UP", "BREAKER", "SLOTS", "LOADED", "IN FLIGHT", "LAST ERROR")]
    for u in doc["upstreams"]:
        in_flight = ",".join(f"{m}={n}" for m, n in sorted(u["in_flight"].items())) or "-"
        rows.append(
            (
                u["name"],
                "up" if u["up"] else "down",
                u["breaker"],
                "?" if u["slots"] is None else str(u["slots"]),
                ",".join(u["loaded"]) or "-",
                in_flight,
                (u["last_error"] or "")[:60],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


async def _pull(url: str, key: str | None, model: str, upstream: str) -> str | None:
    """Pull ``model`` onto ``upstream`` with a progress bar; None, or the error."""
    headers = {**_headers(key), PIN_HEADER: upstream}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.post(url.rstrip("/") + "/api/pull", json={"model": model}) as response,
    ):
        if response.status != 200:
            return _error(response.status, await response.read())
        label = f"{upstream:<12}"
        with click.progressbar(length=1, label=label, show_percent=True) as bar:
            async for line in response.content:
                try:
                    doc = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if "error" in doc:
                    return str(doc["error"])
                total, done = doc.get("total"), doc.get("completed")
                if isinstance(total, int) and isinstance(done, int) and total:
                    bar.length = total
                    bar.update(done - bar.pos)
                if doc.get("status") == "success":
                    bar.update(max((bar.length or 1) - bar.pos, 0))
                    return None
    return "the pull ended without success"


@fleet_command.command("pull")
@click.argument("model")
@click.option(
    "--upstream", "upstreams", multiple=True, required=True, help="An upstream (repeatable)."
)
@url_option
@key_option
def pull(model: str, upstreams: tuple[str, ...], url: str, key: str | None) -> None:
    """Pull MODEL onto several upstreams, one after another."""
    failed = []
    for upstream in upstreams:
        try:
            error = asyncio.run(_pull(url, key, model, upstream))
        except aiohttp.ClientError as exc:
            error = str(exc)
        if error is not None:
            click.echo(f"{upstream}: {error}", err=True)
            failed.append(upstream)
        else:
            click.echo(f"{upstream}: {model} pulled", err=True)
    if failed:
        raise click.ClickException(f"the pull failed on {', '.join(failed)}")

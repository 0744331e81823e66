"""Access control against a hostile client or a careless operator: each test is a finding of
a review, which failed on the code as first written. Real sockets, the shared fixtures; each
docstring says what went wrong before the fix."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path

import aiohttp
import orjson
import pytest
from click.testing import CliRunner

from ollama_meter.app import ACCESS, KEYS_FILE
from ollama_meter.cli import main
from ollama_meter.config import ConfigError
from ollama_meter.gateway.keys import KeyEntry, append_key, digest_of, edit_key, load_keys, new_key
from ollama_meter.logs import ClientErrors
from ollama_meter.settings import AccessSettings, Settings, parse_settings

from .access_keys import Keys, access_settings, make_keys
from .conftest import MeterFactory, unused_port
from .fake_ollama import FakeOllama


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _status(url: str, key: str | None, method: str = "GET", path: str = "/api/tags") -> int:
    headers = {} if key is None else _bearer(key)
    body = b'{"model":"llama3.2","stream":false}' if method == "POST" else None
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url + path, headers=headers, data=body) as response,
    ):
        await response.read()
        return response.status


async def _raw(port: int, head: bytes) -> bytes:
    """Send raw bytes on a fresh connection; what came back until the server closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


# --- Medium -------------------------------------------------------------------------------


async def test_metrics_on_the_main_listener_need_a_key_when_access_is_on(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys
) -> None:
    """Without --metrics-listen, GET /metrics is served on the proxy's own listener with no key
    at all: anonymous clients (anonymous = "none") enumerate every key name and team, per-key
    usage, and the model inventory and what is loaded (read-class data: /api/tags, /api/ps),
    and each scrape makes the proxy probe Ollama."""
    meter = await start_meter(settings=access_settings(keys))
    body = {"model": "llama3.2", "prompt": "hi", "stream": False}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            meter.url + "/api/generate", json=body, headers=_bearer(keys.inference)
        ) as r:
            assert r.status == 200
        async with session.get(meter.url + "/metrics") as response:  # no key
            text = await response.text()
            status = response.status
    leaked = 'key="alice"' in text
    assert (status, leaked) == (401, False), f"anonymous /metrics: {status}, key names leaked"


async def test_a_role_listener_is_not_opened_to_the_network(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys
) -> None:
    """[[access.listener]] grants its role with no key. ``listen = ":11436"`` (the spelling
    Ollama's docs warn about) or "0.0.0.0:..." binds every interface, where the Host rule does
    not apply either: an admin listener is then unauthenticated admin for the whole network.
    It is accepted silently."""
    port = unused_port()
    table = {"keys_file": str(keys.path), "listener": [{"listen": f":{port}", "role": "admin"}]}
    try:
        settings = parse_settings({"access": table}, "s.toml", Path("."))
    except ConfigError:
        return  # refused with a one-line error: fixed
    await start_meter(settings=settings)
    before = fake.count("/api/pull")
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/api/pull",
            json={"model": "llama3.2", "stream": False},
            headers={"Host": "attacker.example"},  # as from another machine, no key
        ) as response,
    ):
        await response.read()
    assert fake.count("/api/pull") == before, "a keyless pull from the network reached Ollama"


def test_keys_cli_keeps_the_files_owner_and_group(keys: Keys) -> None:
    """The CLI replaces the file (os.replace of a mkstemp file) and copies only the mode: the
    owner and group become those of whoever ran it (root under sudo). A service that read the
    file through its group (0640, group ollama-meter) can no longer read it; the reload then
    fails and, by design, KEEPS THE OLD KEYS: `sudo ollama-meter keys disable alice` leaves
    alice working, with one log line and a counter as the only sign."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file another owner")
    os.chown(keys.path, 4242, 4243)
    os.chmod(keys.path, 0o640)
    result = CliRunner().invoke(main, ["keys", "disable", "--file", str(keys.path), "alice"])
    assert result.exit_code == 0, result.output
    st = keys.path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (4242, 4243, 0o640)


async def test_a_poll_racing_a_sighup_never_brings_back_a_removed_key(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KeysFile.check is not serialized: the 2 s poll and a SIGHUP-forced check can run at
    once. A poll that read the file before `keys remove` finishes after the SIGHUP reload and
    installs the old keys; the signature it leaves is the new file's, so no later poll fixes
    it. The removed key works until the file changes again."""
    meter = await start_meter(settings=access_settings(keys))
    watcher = meter.app[KEYS_FILE]
    read_old, release = threading.Event(), threading.Event()

    def slow_load(path: Path) -> tuple[KeyEntry, ...]:
        entries = load_keys(path)
        if any(e.name == "alice" for e in entries) and not read_old.is_set():
            read_old.set()  # this check read the file as it was before the removal
            release.wait(10)
        return entries

    monkeypatch.setattr("ollama_meter.gateway.reload.load_keys", slow_load)
    os.utime(keys.path, ns=(1, 1))  # a change: the next 2 s poll reloads
    assert await asyncio.to_thread(read_old.wait, 5), "the poll did not reload"
    edit_key(keys.path, "alice", None)  # the operator revokes alice ...
    forced = asyncio.create_task(watcher.check(force=True))  # ... and reloads (SIGHUP)
    await asyncio.sleep(0)  # let it start: it now waits for the poll
    release.set()  # the slower poll finishes
    await forced
    assert await _status(meter.url, keys.inference) == 401, "the removed key works again"
    await watcher.check()  # the next poll
    assert await _status(meter.url, keys.inference) == 401, "the removed key still works"


# --- Low ----------------------------------------------------------------------------------


async def test_a_basic_header_that_is_not_ascii_is_a_401_not_a_500(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys
) -> None:
    """base64.b64decode raises a plain ValueError (not binascii.Error) for non-ASCII text, which
    identity._from_authorization does not catch: any client gets a 500 and an ERROR traceback
    in the log per request (a log flood), instead of the 401 the issue asks for."""
    meter = await start_meter(settings=access_settings(keys))
    head = "GET /api/tags HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic é\r\n"
    answer = await _raw(meter.server.port or 0, (head + "Connection: close\r\n\r\n").encode())
    assert answer.split(b"\r\n", 1)[0] == b"HTTP/1.1 401 Unauthorized", answer[:200]


async def test_a_malformed_authorization_line_never_logs_the_key(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """A head aiohttp cannot parse is logged (as a debug line, logs.ClientErrors) with the
    offending bytes quoted: a control character or an over-long value in the Authorization
    line puts the whole key into the log. The issue: credentials are never logged."""
    meter = await start_meter(settings=access_settings(keys))
    server_log = logging.getLogger("aiohttp.server")
    errors = ClientErrors()
    server_log.addFilter(errors)
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    try:
        for tail in ("\x01", "A" * 17_000):
            head = f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {keys.admin}"
            await _raw(meter.server.port or 0, (head + tail + "\r\n\r\n").encode())
    finally:
        server_log.removeFilter(errors)
    secret = keys.admin[12:]
    assert secret not in caplog.text


async def test_options_is_not_a_way_around_the_roles(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys
) -> None:
    """policy.route_class makes OPTIONS public on every path (the issue's table has only
    GET/HEAD / and /api/version public; "anything else: admin only"). A keyless OPTIONS with a
    body to an admin route, or to a path the proxy does not know, goes to Ollama and is neither
    refused nor audited. Ollama serves on http.DefaultServeMux: any method-agnostic handler
    registered there (net/http/pprof in a build that links it) is then open to anyone. A CORS
    preflight (Origin + Access-Control-Request-Method, no body) is all that needs letting by."""
    meter = await start_meter(settings=access_settings(keys))
    before = len(fake.received)
    async with aiohttp.ClientSession() as session:
        for path in ("/api/pull", "/debug/pprof/goroutine?debug=2"):
            async with session.options(
                meter.url + path, data=b'{"model":"llama3.2"}'
            ) as response:  # no Origin: not a preflight
                await response.read()
    reached = [r.path for r in fake.received[before:]]
    assert reached == [], f"keyless OPTIONS reached Ollama: {reached}"


async def test_refusals_on_any_v1_path_use_the_openai_shape(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys
) -> None:
    """error_body picks the shape from the route template; a /v1 path the table does not know
    is "other", so its 401/403 come in the native {"error": "..."} shape (GATEWAY.md section 4:
    /v1/* gets OpenAI's). Ollama serves /v1/images/generations and /v1/images/edits (inference
    routes, server/routes.go): they are "other" here, admin-only, and the openai SDK's
    images.generate gets a body it cannot read as an OpenAI error."""
    meter = await start_meter(settings=access_settings(keys))
    shapes = {}
    async with aiohttp.ClientSession() as session:
        for path, key in (
            ("/v1/images/generations", keys.inference),  # 403 (admin-only here)
            ("/v1/images/generations", None),  # 401
            ("/v1/models/", None),  # 401
            ("/v1/files", keys.read),  # 403
        ):
            headers = {} if key is None else _bearer(key)
            async with session.post(
                meter.url + path, json={"model": "x", "prompt": "a cat"}, headers=headers
            ) as response:
                if response.status in (401, 403):
                    error = (await response.json())["error"]
                    shapes[path, key is None, response.status] = type(error).__name__
    assert shapes
    assert set(shapes.values()) == {"dict"}, shapes


async def test_an_in_place_edit_that_keeps_size_and_mtime_is_still_reloaded(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys
) -> None:
    """The change signature is (dev, inode, mtime, size). An in-place rewrite that keeps the
    size and restores the mtime (cp -p, rsync --inplace -t, touch -r, a config tool that
    preserves timestamps) is never noticed: here the admin key is demoted to read and keeps
    admin. st_ctime_ns cannot be set back by utime."""
    meter = await start_meter(settings=access_settings(keys))
    st = keys.path.stat()
    text = keys.path.read_text()
    demoted = text.replace('role = "admin"', 'role = "read" ', 1)
    assert len(demoted) == len(text)
    fd = os.open(keys.path, os.O_WRONLY)  # same inode, no truncation: same size
    os.write(fd, demoted.encode())
    os.close(fd)
    os.utime(keys.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    await meter.app[KEYS_FILE].check()  # what the 2 s poll runs
    assert await _status(meter.url, keys.admin, "POST", "/api/pull") == 403


async def test_keys_cli_refuses_a_hand_written_inline_array_clearly(
    start_meter: MeterFactory, fake: FakeOllama, tmp_path: Path
) -> None:
    """`key = [{...}, ...]` is valid TOML and the proxy loads it, but the CLI only edits
    [[key]] tables: `keys disable alice` answered "no key named 'alice'" (an operator may take
    that for "already gone") and the key kept working. Now it says what to do."""
    secret, ident = new_key()
    path = tmp_path / "keys.toml"
    path.write_text(
        "# hand-written\n"
        f'key = [{{ id = "{ident}", name = "alice", sha256 = "{digest_of(secret).hex()}", '
        'role = "inference" }]\n'
    )
    meter = await start_meter(settings=Settings(access=AccessSettings(keys_file=path)))
    assert await _status(meter.url, secret) == 200
    for args in (["disable", "alice"], ["create", "--name", "bob", "--role", "read"]):
        result = CliRunner().invoke(main, ["keys", args[0], "--file", str(path), *args[1:]])
        assert result.exit_code == 1
        assert "edits [[key]] tables only" in result.output


def test_an_empty_keys_file_option_is_an_error_not_access_off(tmp_path: Path) -> None:
    """settings.with_keys_file treats --keys-file "" as absent, so `--keys-file "$KEYS"` with
    KEYS unset (or ExecStart=... --keys-file ${KEYS}) starts the proxy with access control OFF,
    silently. An explicitly empty value should be a one-line error."""
    result = CliRunner().invoke(main, ["--keys-file", "", "config", "check"])
    assert result.exit_code != 0, result.output


async def test_the_key_label_cap_counts_keys_in_force_not_every_name_ever_seen(
    start_meter: MeterFactory, fake: FakeOllama, tmp_path: Path
) -> None:
    """usage._Bounded never forgets a name: after rotations (alice-q1, alice-q2, ...) past
    max_key_labels names over the process's life, every new key is "other" until a restart,
    even when the file holds a single key."""
    path = tmp_path / "keys.toml"
    first, _ = append_key(path, name="a", role="read")
    second, _ = append_key(path, name="b", role="read")
    settings = Settings(access=AccessSettings(keys_file=path, max_key_labels=2))
    meter = await start_meter(settings=settings)
    for key in (first, second):
        assert await _status(meter.url, key) == 200
    edit_key(path, "a", None)
    edit_key(path, "b", None)
    third, _ = append_key(path, name="c", role="read")
    await meter.app[KEYS_FILE].check(force=True)
    assert await _status(meter.url, third) == 200
    assert {s["key"] for s in meter.series("key_requests_total")} >= {"c"}


async def test_the_audit_client_is_the_one_a_trusted_proxy_names(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys, tmp_path: Path
) -> None:
    """Behind a reverse proxy listed in --trusted-proxies, the audit line's "client" is the
    reverse proxy's address (request.remote), not the client it names in X-Forwarded-For:
    "who deleted llama3" loses the address, though the proxy itself forwards that header as
    trusted."""
    audit = tmp_path / "audit.jsonl"
    meter = await start_meter(
        settings=access_settings(keys, audit_log=str(audit)), trusted_proxies="127.0.0.1/32"
    )
    async with (
        aiohttp.ClientSession() as session,
        session.delete(
            meter.url + "/api/delete",
            json={"model": "llama3.2"},
            headers={**_bearer(keys.admin), "X-Forwarded-For": "10.0.0.7"},
        ) as response,
    ):
        await response.read()
    log = meter.app[ACCESS].audit
    assert log is not None
    log.close()
    [line] = [orjson.loads(x) for x in audit.read_bytes().splitlines()]
    assert line["client"] == "10.0.0.7"

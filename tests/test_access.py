"""Access control over real sockets: every route class against every kind of caller, the ways
clients send keys, what reaches Ollama, and the refusals' shapes."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import aiohttp
import ollama
import openai
import pytest

from ollama_meter.app import KEYS_FILE
from ollama_meter.gateway.keys import append_key, digest_of, new_key
from ollama_meter.settings import AccessSettings, Settings

from .access_keys import Keys, access_settings, make_keys
from .clients import openai_httpx
from .conftest import Meter, MeterFactory
from .fake_ollama import FakeOllama

_MODEL: Final = b'{"model":"llama3.2","stream":false,"prompt":"hi","messages":[],"input":"x"}'

#: (method, path, body, class)
ROUTES: Final = [
    ("GET", "/", None, "public"),
    ("HEAD", "/", None, "public"),
    ("GET", "/api/version", None, "public"),
    ("HEAD", "/api/version", None, "public"),
    ("OPTIONS", "/api/chat", None, "admin"),  # not a CORS preflight: no Origin
    ("GET", "/api/tags", None, "read"),
    ("HEAD", "/api/tags", None, "read"),
    ("GET", "/api/ps", None, "read"),
    ("GET", "/api/status", None, "read"),
    ("GET", "/v1/models", None, "read"),
    ("GET", "/v1/models/llama3.2", None, "read"),
    ("POST", "/api/show", b'{"model":"llama3.2"}', "read"),
    ("HEAD", "/api/blobs/sha256:" + "a" * 64, None, "read"),
    ("POST", "/api/generate", _MODEL, "inference"),
    ("POST", "/api/chat", _MODEL, "inference"),
    ("POST", "/api/embed", _MODEL, "inference"),
    ("POST", "/api/embeddings", _MODEL, "inference"),
    ("POST", "/v1/chat/completions", _MODEL, "inference"),
    ("POST", "/v1/completions", _MODEL, "inference"),
    ("POST", "/v1/embeddings", _MODEL, "inference"),
    ("POST", "/v1/responses", _MODEL, "inference"),
    ("POST", "/v1/messages", _MODEL, "inference"),
    ("POST", "/v1/audio/transcriptions", b"--x\r\n", "inference"),
    ("POST", "/api/pull", b'{"model":"llama3.2","stream":false}', "admin"),
    ("POST", "/api/push", b'{"model":"me/llama3.2","stream":false}', "admin"),
    ("POST", "/api/create", b'{"model":"mine","from":"llama3.2","stream":false}', "admin"),
    ("POST", "/api/copy", b'{"source":"llama3.2","destination":"b"}', "admin"),
    ("DELETE", "/api/delete", b'{"model":"b"}', "admin"),
    ("POST", "/api/blobs/sha256:" + "b" * 64, b"blob", "admin"),
    ("GET", "/api/me", None, "admin"),
    ("POST", "/api/signout", None, "admin"),
    ("POST", "/api/experimental/web_search", b"{}", "admin"),
    ("DELETE", "/api/user/keys/abc", None, "admin"),
    ("GET", "/api/unknown", None, "admin"),
    ("PUT", "/api/tags", None, "admin"),
    ("POST", "/", None, "admin"),
    ("GET", "/api/generate", None, "admin"),
]

#: The roles that may use each class, by caller.
ALLOWED: Final = {
    "public": {"admin", "inference", "read", "limited", "none", "bad", "unknown", "off", "old"},
    "read": {"admin", "inference", "read", "limited"},
    "inference": {"admin", "inference"},  # limited may use qwen* only: these name llama3.2
    "admin": {"admin"},
}
#: Callers refused with 401 (who they are is not known, or their key does not work).
UNAUTHENTICATED: Final = {"none", "bad", "unknown", "off", "old"}


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path)


def _callers(keys: Keys) -> dict[str, str | None]:
    return {
        "admin": keys.admin,
        "inference": keys.inference,
        "read": keys.read,
        "limited": keys.limited,
        "none": None,
        "bad": keys.bad_secret(),
        "unknown": keys.unknown_id(),
        "off": keys.disabled,
        "old": keys.expired,
    }


async def test_every_route_class_against_every_caller(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys
) -> None:
    meter = await start_meter(settings=access_settings(keys))
    wrong: list[str] = []
    async with aiohttp.ClientSession() as session:
        for caller, key in _callers(keys).items():
            for method, path, body, cls in ROUTES:
                headers = {"Content-Type": "application/json"}
                if key is not None:
                    headers["Authorization"] = f"Bearer {key}"
                before = len(fake.received)
                async with session.request(
                    method, meter.url + path, data=body, headers=headers
                ) as response:
                    await response.read()
                    status = response.status
                    challenge = response.headers.get("WWW-Authenticate")
                reached = len(fake.received) > before
                if caller in ALLOWED[cls]:
                    expected = "through"
                elif caller in UNAUTHENTICATED:
                    expected = "401"
                else:
                    expected = "403"
                got = "through" if reached and status not in (401, 403) else str(status)
                if status == 401 and challenge != 'Bearer realm="ollama-meter"':
                    got = "401 without WWW-Authenticate"
                if reached and status in (401, 403):
                    got = f"{status} from upstream"
                if got != expected:
                    wrong.append(f"{caller} {method} {path}: {got}, expected {expected}")
    assert wrong == []


async def test_a_model_allow_list_admits_its_models_only(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys
) -> None:
    meter = await start_meter(settings=access_settings(keys))
    headers = {"Authorization": f"Bearer {keys.limited}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        for model, status in (("qwen3:8b", 200), ("QWEN3:8B", 200), ("llama3.2", 403)):
            body = {"model": model, "prompt": "hi", "stream": False}
            async with session.post(meter.url + "/api/generate", json=body) as response:
                assert response.status == status, model
                if status == 403:
                    assert await response.json() == {
                        "error": f"ollama-meter: key 'limited' may not use model '{model}'"
                    }
        # Ollama's decoder matches keys case-insensitively and keeps the last: a body that
        # spells "model" twice is refused rather than guessed at.
        before = len(fake.received)
        two = b'{"model":"qwen3:8b","MODEL":"llama3.2","prompt":"hi","stream":false}'
        async with session.post(meter.url + "/api/generate", data=two) as r:
            assert r.status == 400
            assert "more than one spelling" in (await r.json())["error"]
        assert len(fake.received) == before
        # A body whose model cannot be read is refused, never let through unchecked.
        gzipped = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        url = meter.url + "/api/generate"
        async with session.post(url, data=b"\x1f\x8b", headers=gzipped) as r:
            assert r.status == 403
            assert "cannot be read" in (await r.json())["error"]
    assert meter.value("auth_failures_total", reason="forbidden_model") == 3


async def test_keys_come_the_ways_clients_send_them(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys
) -> None:
    meter = await start_meter(settings=access_settings(keys))
    key = keys.inference
    basic = base64.b64encode(f"any:{key}".encode()).decode()
    user_only = base64.b64encode(f"{key}:".encode()).decode()
    forms: list[tuple[dict[str, str], int]] = [
        ({"Authorization": f"Bearer {key}"}, 200),
        ({"authorization": f"bearer  {key} "}, 200),
        ({"Authorization": f"Basic {basic}"}, 200),
        ({"Authorization": f"Basic {user_only}"}, 200),
        ({"x-api-key": key}, 200),
        ({"Authorization": "Basic not*base64"}, 401),
        ({"Authorization": "Bearer om_short_key"}, 401),
        ({"Authorization": "Bearer " + "A" * 10_000}, 401),
        ({"Authorization": f"Token {key}"}, 401),
        ({"x-api-key": key.upper()}, 401),
    ]
    async with aiohttp.ClientSession() as session:
        for headers, status in forms:
            body = {"model": "llama3.2", "prompt": "hi", "stream": False}
            async with session.post(
                meter.url + "/api/generate", json=body, headers=headers
            ) as response:
                assert response.status == status, headers
        two = [("Authorization", f"Bearer {key}"), ("Authorization", f"Bearer {key}")]
        async with session.get(meter.url + "/api/tags", headers=two) as response:
            assert response.status == 401
    assert meter.value("auth_failures_total", reason="invalid") == 6


async def test_credentials_never_reach_ollama_and_everything_else_does(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys
) -> None:
    meter = await start_meter(settings=access_settings(keys))
    body = b'{"model":"llama3.2","prompt":"hi","stream":false}'
    extra = {"X-Custom": "kept", "Content-Type": "application/json", "User-Agent": "t/1"}
    async with aiohttp.ClientSession(skip_auto_headers=["Accept-Encoding", "Accept"]) as session:
        async with session.post(fake.url + "/api/generate", data=body, headers=extra) as r:
            direct_answer = await r.read()
        direct = fake.received[-1]
        with_key = {**extra, "Authorization": f"Bearer {keys.admin}", "x-api-key": keys.admin}
        async with session.post(meter.url + "/api/generate", data=body, headers=with_key) as r:
            assert await r.read() == direct_answer
        proxied = fake.received[-1]
    assert "Authorization" not in proxied.headers
    assert "x-api-key" not in proxied.headers
    assert proxied.view() == direct.view()


async def test_refusals_speak_each_routes_error_shape(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys
) -> None:
    meter = await start_meter(settings=access_settings(keys))
    before = len(fake.received)  # the start-up probe of /api/tags
    async with aiohttp.ClientSession() as session:
        async with session.post(meter.url + "/v1/chat/completions", json={}) as response:
            assert response.status == 401
            error = (await response.json())["error"]
            assert error["type"] == "authentication_error"
            assert error["message"].startswith("ollama-meter: ")
        headers = {"Authorization": f"Bearer {keys.read}"}
        async with session.post(
            meter.url + "/api/pull", json={"model": "x"}, headers=headers
        ) as response:
            assert response.status == 403
            assert await response.json() == {
                "error": "ollama-meter: key 'reader' (role read) may not use POST /api/pull"
            }
        headers = {"Authorization": f"Bearer {keys.disabled}"}
        async with session.get(meter.url + "/api/tags", headers=headers) as response:
            assert response.status == 401
            assert await response.json() == {"error": "ollama-meter: the API key 'off' is disabled"}
    assert len(fake.received) == before


async def test_a_cors_preflight_needs_no_key(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys
) -> None:
    meter = await start_meter(settings=access_settings(keys))
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    async with (
        aiohttp.ClientSession() as session,
        session.options(meter.url + "/api/chat", headers=preflight) as response,
    ):
        assert response.status not in (401, 403)
    assert fake.last("/api/chat").method == "OPTIONS"


async def test_anonymous_clients_get_the_role_configured(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys
) -> None:
    meter = await start_meter(settings=access_settings(keys, anonymous="read"))
    async with aiohttp.ClientSession() as session:
        async with session.get(meter.url + "/api/tags") as response:
            assert response.status == 200
        async with session.post(meter.url + "/api/chat", json={"model": "llama3.2"}) as response:
            assert response.status == 403
        # A key that does not work is an error, never a way to be anonymous.
        headers = {"Authorization": f"Bearer {keys.bad_secret()}"}
        async with session.get(meter.url + "/api/tags", headers=headers) as response:
            assert response.status == 401


async def test_a_100_continue_upload_is_refused_before_its_body(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys
) -> None:
    meter = await start_meter(settings=access_settings(keys))
    before = len(fake.received)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            meter.url + "/api/blobs/sha256:" + "c" * 64,
            data=b"x" * 100_000,
            headers={"Authorization": f"Bearer {keys.inference}"},
            expect100=True,
        ) as response,
    ):
        assert response.status == 403
    assert len(fake.received) == before


async def test_the_keys_file_is_reloaded_on_change_and_on_sighup(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys
) -> None:
    import asyncio
    import os
    import signal

    from ollama_meter.gateway.keys import append_key, edit_key

    meter = await start_meter(settings=access_settings(keys))
    watcher = meter.app[KEYS_FILE]

    async def status(key: str) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        async with (
            aiohttp.ClientSession(headers=headers) as session,
            session.get(meter.url + "/api/tags") as response,
        ):
            return response.status

    # Added by the command line's code: works within the 2 s poll, without a signal.
    reloaded = watcher.next_reload()
    new, _ = append_key(keys.path, name="bob", role="read")
    assert await status(new) == 401
    await asyncio.wait_for(reloaded.wait(), 3)
    assert await status(new) == 200
    assert meter.value("keys_configured") == 7
    # Removed, then SIGHUP: at once.
    reloaded = watcher.next_reload()
    edit_key(keys.path, "bob", None)
    os.kill(os.getpid(), signal.SIGHUP)
    await asyncio.wait_for(reloaded.wait(), 1)
    assert await status(new) == 401
    # A broken file keeps the keys in force and counts the error.
    reloaded = watcher.next_reload()
    keys.path.write_text(keys.path.read_text() + "\n[[key]]\nname = 'x'\n")
    os.kill(os.getpid(), signal.SIGHUP)
    await asyncio.wait_for(reloaded.wait(), 1)
    assert await status(keys.admin) == 200
    assert meter.value("config_reloads_total", result="error") == 1
    assert meter.value("config_reloads_total", result="ok") == 2


#: (endpoint, body) of the traffic each caller sends: native and /v1, streamed and not.
_TRAFFIC: Final[list[tuple[str, dict[str, Any]]]] = [
    ("/api/generate", {"prompt": "hi", "stream": True}),
    ("/api/generate", {"prompt": "hi", "stream": False}),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
]


async def test_per_key_usage_matches_what_ollama_reported(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys
) -> None:
    """Each model is used by known callers only, so the per-key counters of a model must add
    up to the core's counters of that model, over every endpoint."""
    meter: Meter = await start_meter(settings=access_settings(keys, anonymous="inference"))
    callers = [(keys.admin, "llama3.2"), (None, "llama3.2"), (keys.inference, "qwen3:8b")]
    async with aiohttp.ClientSession() as session:
        for key, model in callers:
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            for endpoint, body in _TRAFFIC:
                async with session.post(
                    meter.url + endpoint, json={"model": model, **body}, headers=headers
                ) as response:
                    assert response.status == 200
                    await response.read()

    def core(name: str, model: str) -> float:
        return sum(
            meter.value(name, endpoint=endpoint, model=model, stream=stream)
            for endpoint in {e for e, _ in _TRAFFIC}
            for stream in ("true", "false")
        )

    def per_key(name: str, model: str, *who: tuple[str, str]) -> float:
        return sum(meter.value(name, key=k, team=t, model=model) for k, t in who)

    for kind in ("prompt", "completion"):
        llama, qwen = "llama3.2:latest", "qwen3:8b"
        both = (("admin", "ml"), ("anonymous", ""))
        assert per_key(f"key_{kind}_tokens_total", llama, *both) == core(
            f"{kind}_tokens_total", llama
        )
        assert per_key(f"key_{kind}_tokens_total", qwen, ("alice", "ml")) == core(
            f"{kind}_tokens_total", qwen
        )
        assert core(f"{kind}_tokens_total", qwen) > 0
    for key, team in (("admin", "ml"), ("alice", "ml"), ("anonymous", "")):
        requests = meter.value("key_requests_total", key=key, team=team, status_class="2xx")
        assert requests == len(_TRAFFIC)


async def test_the_official_clients_get_in_with_their_own_mechanisms(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    meter = await start_meter(settings=access_settings(keys))
    # ollama-python reads OLLAMA_API_KEY and sends it as a Bearer token.
    monkeypatch.setenv("OLLAMA_API_KEY", keys.inference)
    async with ollama.AsyncClient(host=meter.url) as client:
        reply = await client.generate("llama3.2", "hi")
        assert reply.done
        with pytest.raises(ollama.ResponseError) as refused:
            await client.pull("llama3.2")
        assert refused.value.status_code == 403
        assert "may not use POST /api/pull" in refused.value.error
    monkeypatch.setenv("OLLAMA_API_KEY", keys.bad_secret())
    async with ollama.AsyncClient(host=meter.url) as client:
        with pytest.raises(ollama.ResponseError) as refused:
            await client.generate("llama3.2", "hi")
        assert refused.value.status_code == 401
        assert refused.value.error == "ollama-meter: the API key is not valid"
    monkeypatch.delenv("OLLAMA_API_KEY")
    # The openai SDK sends its api_key as a Bearer token too.
    http = openai_httpx().AsyncClient()
    for key, raised in (
        (keys.inference, None),
        (keys.read, openai.PermissionDeniedError),
        ("sk-not-ours", openai.AuthenticationError),
    ):
        client_ = openai.AsyncOpenAI(
            base_url=meter.url + "/v1", api_key=key, http_client=http, max_retries=0
        )
        messages: Any = [{"role": "user", "content": "hi"}]
        if raised is None:
            done = await client_.chat.completions.create(model="llama3.2", messages=messages)
            assert done.usage is not None
            assert done.usage.completion_tokens > 0
            continue
        with pytest.raises(raised) as error:
            await client_.chat.completions.create(model="llama3.2", messages=messages)
        body: Any = error.value.body
        assert body["message"].startswith("ollama-meter: ")
        assert str(error.value.message).endswith(" - " + body["message"])
    await http.aclose()


async def test_500_key_names_leave_a_bounded_label_set(
    start_meter: MeterFactory, fake: FakeOllama, tmp_path: Path
) -> None:
    lines = []
    secrets: list[str | None] = []
    for number in range(500):
        secret, ident = new_key()
        secrets.append(secret)
        lines.append(
            f'[[key]]\nid = "{ident}"\nname = "user{number}"\n'
            f'sha256 = "{digest_of(secret).hex()}"\nrole = "read"\n'
        )
    path = tmp_path / "keys.toml"
    path.write_text("".join(lines))
    settings = Settings(access=AccessSettings(keys_file=path, max_key_labels=10, anonymous="read"))
    meter = await start_meter(settings=settings)
    async with aiohttp.ClientSession() as session:
        for key in [*secrets, None]:  # the last: anonymous
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            async with session.get(meter.url + "/api/tags", headers=headers) as response:
                assert response.status == 200
    names = {s["key"] for s in meter.series("key_requests_total")}
    assert len(names) == 10 + 2
    assert {"anonymous", "other"} <= names
    assert meter.value("key_requests_total", key="other", team="", status_class="2xx") == 490


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_gets_in_with_basic_auth_and_bearer(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys
) -> None:
    meter = await start_meter(settings=access_settings(keys))

    async def curl(*args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", *args,
            meter.url + "/api/tags",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await process.communicate()
        return out.decode()

    assert await curl("-u", f"any:{keys.read}") == "200"
    assert await curl("-H", f"Authorization: Bearer {keys.read}") == "200"
    assert await curl("-u", "any:om_wrong") == "401"
    assert await curl() == "401"
    assert "Authorization" not in fake.last("/api/tags").headers


async def test_max_keep_alive_rewrites_that_one_value_for_non_admin_keys(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys
) -> None:
    meter = await start_meter(
        settings=access_settings(keys, max_keep_alive=1800), max_inspect_bytes=4096
    )
    forever = b'{"model":"llama3.2", "keep_alive" : -1 ,"prompt":"hi \\u00e9","stream":false}'
    clamped = b'{"model":"llama3.2", "keep_alive" : 1800 ,"prompt":"hi \\u00e9","stream":false}'
    within = b'{"model":"llama3.2","keep_alive":"5m","prompt":"hi","stream":false}'
    sent: list[tuple[str, bytes, bytes]] = [
        (keys.inference, forever, clamped),
        (keys.inference, within, within),
        (keys.admin, forever, forever),
    ]
    async with aiohttp.ClientSession() as session:
        for key, body, expected in sent:
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            async with session.post(
                meter.url + "/api/generate", data=body, headers=headers
            ) as response:
                assert response.status == 200
            received = fake.last("/api/generate")
            assert received.body == expected
            assert received.headers["Content-Length"] == str(len(expected))

        # Chunked, without a length: the same rewrite, and a length that fits it.
        async def chunks() -> AsyncIterator[bytes]:
            yield forever[:20]
            yield forever[20:]

        headers = {"Authorization": f"Bearer {keys.inference}"}
        async with session.post(meter.url + "/api/chat", data=chunks(), headers=headers) as r:
            assert r.status in (200, 400)  # the fake's answer to a chat without messages
        assert fake.last("/api/chat").body == clamped
        # A body too large to read cannot be checked: refused for such a key.
        big = b'{"model":"llama3.2","keep_alive":-1,"prompt":"' + b"x" * 8000 + b'"}'
        before = len(fake.received)
        async with session.post(meter.url + "/api/generate", data=big, headers=headers) as r:
            assert r.status == 403
        assert len(fake.received) == before


GATEWAY_GOLDEN: Final = Path(__file__).parent / "golden" / "gateway-families.txt"


async def test_the_access_families_are_a_pinned_contract(
    start_meter: MeterFactory, fake: FakeOllama, keys: Keys
) -> None:
    """Name, type, help and labels of every family access control adds, pinned like the
    core's (tests/golden/families.txt); UPDATE_GOLDEN=1 rewrites the file. Without keys, none
    of them exists."""
    plain = await start_meter()
    meter = await start_meter(settings=access_settings(keys))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin}"}) as s:
        body = {"model": "llama3.2", "prompt": "hi", "stream": False}
        async with s.post(meter.url + "/api/generate", json=body) as response:
            assert response.status == 200
    core = {m.name for m in plain.registry.collect()}
    lines = []
    for family in meter.registry.collect():
        if family.name in core:
            continue
        labels = sorted({k for sample in family.samples for k in sample.labels})
        lines.append(f"{family.name} {family.type} [{','.join(labels)}] {family.documentation}")
    text = "\n".join(sorted(lines)) + "\n"
    if os.environ.get("UPDATE_GOLDEN"):
        GATEWAY_GOLDEN.write_text(text)
    assert text == GATEWAY_GOLDEN.read_text()


async def test_a_kubernetes_secret_swap_is_seen_and_a_broken_file_logged_once(
    start_meter: MeterFactory, fake: FakeOllama, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Secret volume: keys.toml -> ..data/keys.toml, and an update points ..data at a new
    directory in one rename. The path's own symlink never changes; what it resolves to does."""
    first, second = tmp_path / "v1", tmp_path / "v2"
    first.mkdir()
    second.mkdir()
    old, _ = append_key(first / "keys.toml", name="a", role="read")
    new, _ = append_key(second / "keys.toml", name="b", role="read")
    (tmp_path / "..data").symlink_to(first)
    (tmp_path / "keys.toml").symlink_to(tmp_path / "..data" / "keys.toml")
    meter = await start_meter(
        settings=Settings(access=AccessSettings(keys_file=tmp_path / "keys.toml"))
    )
    watcher = meter.app[KEYS_FILE]

    async def status(key: str) -> int:
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
            session.get(meter.url + "/api/tags") as response,
        ):
            return response.status

    assert (await status(old), await status(new)) == (200, 401)
    (tmp_path / "..data_tmp").symlink_to(second)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    await watcher.check()  # what the 2 s poll runs
    assert (await status(old), await status(new)) == (401, 200)
    # Broken: one warning line naming the file, the entry and the field; checked again
    # without a change, nothing more.
    # (Written whole, in one step: the app's own 2 s poll must not catch it half written,
    # which would be a second broken version, and rightly a second line.)
    broken = second / "keys.toml.new"
    broken.write_text((second / "keys.toml").read_text() + "[[key]]\nid = 1\n")
    os.replace(broken, second / "keys.toml")
    with caplog.at_level(logging.WARNING, logger="ollama_meter.gateway.reload"):
        await watcher.check()
        await watcher.check()
    [line] = [r.getMessage() for r in caplog.records if r.name == "ollama_meter.gateway.reload"]
    assert "keys.toml: key[2].name: missing" in line
    assert line.endswith("keeping the 1 keys in force")
    assert await status(new) == 200

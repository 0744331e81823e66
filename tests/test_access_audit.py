"""The audit log through the proxy: model-management calls and refusals, as JSON lines, with
the outcome read from the stream. Compared with tests/golden/audit.jsonl (UPDATE_GOLDEN=1
rewrites it), with the fields that change per run (time, request id, duration) blanked."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import ollama
import orjson
import pytest

from ollama_meter.app import ACCESS
from ollama_meter.gateway.access import Access

from .access_keys import Keys, access_settings, make_keys
from .conftest import MeterFactory
from .fake_ollama import FakeOllama

GOLDEN = Path(__file__).parent / "golden" / "audit.jsonl"
_VOLATILE = ("time", "request_id", "duration_seconds")
_PROMPT = "a prompt that must never be audited"


def _client(url: str, key: str) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=url, headers={"Authorization": f"Bearer {key}"})


async def test_model_management_and_refusals_are_audited(
    start_meter: MeterFactory, fake: FakeOllama, tmp_path: Path
) -> None:
    keys: Keys = make_keys(tmp_path)
    audit = tmp_path / "audit.jsonl"
    meter = await start_meter(settings=access_settings(keys, audit_log=str(audit)))
    async with (
        _client(meter.url, keys.admin) as admin,
        _client(meter.url, keys.inference) as user,
        _client(meter.url, keys.bad_secret()) as stranger,
    ):
        await _manage(admin, user, stranger, tmp_path)
    _check(meter.app[ACCESS], audit, keys)


async def _manage(
    admin: ollama.AsyncClient, user: ollama.AsyncClient, stranger: ollama.AsyncClient, tmp: Path
) -> None:
    # A pull that succeeds, streamed; one that fails after its 200 (the shared fixture).
    async for _ in await admin.pull("llama3.2", stream=True):
        pass
    with pytest.raises(ollama.ResponseError):
        async for _ in await admin.pull("no-such-model", stream=True):
            pass
    # A pull by an inference key: denied, and it never reaches Ollama.
    with pytest.raises(ollama.ResponseError) as refused:
        await user.pull("llama3.2")
    assert refused.value.status_code == 403
    # A copy, and a delete with a body.
    await admin.copy("llama3.2", "backup")
    await admin.delete("backup")
    # A create after its blob upload (the Modelfile-free way ollama-python creates models).
    blob = tmp / "model.gguf"
    blob.write_bytes(b"GGUF" + bytes(1000))
    digest = await admin.create_blob(blob)
    assert digest == "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    await admin.create("mine", files={"model.gguf": digest})
    # Inference is not audited; a refused inference call is.
    await user.generate("llama3.2", _PROMPT)
    with pytest.raises(ollama.ResponseError):
        await stranger.generate("llama3.2", _PROMPT)


def _check(access: Access, audit: Path, keys: Keys) -> None:
    assert access.audit is not None
    access.audit.close()
    lines = [orjson.loads(line) for line in audit.read_bytes().splitlines()]
    for line in lines:
        assert line["request_id"]
        assert len(line["request_id"]) == 16
        assert line["duration_seconds"] >= 0
        assert line["time"].endswith("Z")
        for field in _VOLATILE:
            line[field] = "*"
    expected: list[dict[str, Any]]
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    expected = [orjson.loads(line) for line in GOLDEN.read_bytes().splitlines()]
    assert lines == expected
    # Never a prompt, never a secret.
    text = audit.read_text()
    assert _PROMPT not in text
    for key in (keys.admin, keys.inference, keys.bad_secret()):
        assert key not in text

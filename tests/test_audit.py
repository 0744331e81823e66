"""The audit log: what a line holds, and how lines reach a real file in tmp_path."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from pathlib import Path

import orjson
import pytest

from ollama_meter.gateway.audit import NAME_LIMIT, OUTCOMES, AuditLog, audit_line, request_names

FIELDS = ["time", "request_id", "key", "team", "client", "method", "route", "upstream"]
SECRET = "the-prompt-must-not-be-audited"


def line(n: int) -> bytes:
    return orjson.dumps({"n": n}, option=orjson.OPT_APPEND_NEWLINE)


def lines_in(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


class Errors:
    """An ``on_error`` that counts (list.append is thread-safe)."""

    def __init__(self) -> None:
        self.calls: list[None] = []

    def __call__(self) -> None:
        self.calls.append(None)

    @property
    def count(self) -> int:
        return len(self.calls)


class Clock:
    """A clock the test moves by hand; each call is one batch starting, which a test can await
    (batch n+1 asks only once batch n is written)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls = 0
        self._changed = threading.Condition()

    def __call__(self) -> float:
        with self._changed:
            self.calls += 1
            self._changed.notify_all()
            return self.now

    def wait_for_calls(self, calls: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.calls >= calls, timeout=10)


# request_names


@pytest.mark.parametrize(
    ("template", "body", "names"),
    [
        ("/api/pull", {"model": "llama3.2", "insecure": True}, {"model": "llama3.2"}),
        ("/api/pull", {"name": "llama3.2"}, {"model": "llama3.2"}),
        ("/api/pull", {"model": " ", "name": "llama3.2"}, {"model": "llama3.2"}),
        ("/api/push", {"model": "me/mine:1"}, {"model": "me/mine:1"}),
        ("/api/delete", {"name": "old"}, {"model": "old"}),
        ("/api/show", {"name": "llama3.2", "verbose": True}, {"model": "llama3.2"}),
        ("/api/copy", {"source": "a", "destination": "b"}, {"source": "a", "destination": "b"}),
        (
            "/api/create",
            {
                "model": "mine",
                "from": "llama3.2",
                "modelfile": f"FROM llama3.2\nSYSTEM {SECRET}",
                "files": {"model.gguf": "sha256:" + "0" * 64},
                "adapters": {"lora.gguf": "sha256:" + "1" * 64},
                "system": SECRET,
                "template": SECRET,
                "messages": [{"role": "user", "content": SECRET}],
                "quantize": "q4_K_M",
            },
            {"model": "mine", "from": "llama3.2"},
        ),
        ("/api/generate", {"model": "llama3.2", "prompt": SECRET}, {"model": "llama3.2"}),
        ("/v1/chat/completions", {"model": "x", "messages": [{"content": SECRET}]}, {"model": "x"}),
        ("/api/generate", {"name": "not-a-field-here"}, {}),
        ("/api/copy", {"source": 1, "destination": ["b"]}, {}),  # only strings
        ("/api/pull", {"Model": "hidden"}, {"model": "hidden"}),  # as Go reads it
        ("/api/pull", ["llama3.2"], {}),
    ],
)
def test_names_from_the_body(template: str, body: object, names: dict[str, str | int]) -> None:
    got = request_names(template, orjson.dumps(body), template, 123)
    assert got == names
    assert list(got) == [k for k in ("model", "source", "destination", "from") if k in got]
    assert SECRET not in repr(got)


@pytest.mark.parametrize("body", [None, b"", b"{not json", b"\xff\xfe", b"null", b'"llama3.2"'])
def test_an_unreadable_body_names_nothing(body: bytes | None) -> None:
    assert request_names("/api/pull", body, "/api/pull", 0) == {}


@pytest.mark.parametrize("body", [None, b"GGUF\x00\x01binary", b'{"model": "x"}'])
def test_a_blob_upload_names_its_digest_and_size(body: bytes | None) -> None:
    digest = "sha256:" + "a" * 64
    names = request_names("/api/blobs/{digest}", body, "/api/blobs/" + digest, 4096)
    assert names == {"digest": digest, "bytes": 4096}


def test_long_names_are_cut() -> None:
    huge = "m" * 10_000
    body = orjson.dumps({"source": huge, "destination": huge})
    assert request_names("/api/copy", body, "/api/copy", 0) == {
        "source": "m" * NAME_LIMIT,
        "destination": "m" * NAME_LIMIT,
    }
    blob = request_names("/api/blobs/{digest}", None, "/api/blobs/" + huge, 1)
    assert blob["digest"] == "m" * NAME_LIMIT


# audit_line


def test_a_line_has_its_fields_in_order() -> None:
    raw = audit_line(
        at=1_700_000_000.123,
        request_id="r1",
        key="alice",
        team=None,
        client="10.0.0.7",
        method="POST",
        route="/api/pull",
        upstream="gpu-1",
        names={"bytes": 5, "prompt": SECRET, "from": "b", "model": "a", "status": "x"},
        status=200,
        duration=1.23456789,
        outcome="success",
    )
    assert raw.endswith(b"\n")
    assert raw.count(b"\n") == 1
    doc = orjson.loads(raw)
    assert list(doc) == [*FIELDS, "model", "from", "bytes", "status", "duration_seconds", "outcome"]
    assert doc["time"] == "2023-11-14T22:13:20.123Z"
    assert doc["team"] is None
    assert doc["status"] == 200
    assert doc["duration_seconds"] == 1.234568
    assert SECRET.encode() not in raw


def test_a_refusal_says_why() -> None:
    doc = orjson.loads(
        audit_line(
            at=0.0,
            request_id="r2",
            key="anonymous",
            team="ml",
            client=None,
            method="DELETE",
            route="/api/delete",
            upstream="default",
            names={"model": "llama3.2"},
            status=403,
            duration=0.0,
            outcome="denied",
            reason="forbidden_model",
        )
    )
    assert list(doc)[-3:] == ["duration_seconds", "outcome", "reason"]
    assert (doc["time"], doc["team"], doc["client"]) == ("1970-01-01T00:00:00.000Z", "ml", None)
    assert (doc["outcome"], doc["reason"]) == ("denied", "forbidden_model")
    assert doc["outcome"] in OUTCOMES


# AuditLog


def test_lines_are_appended_in_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(line(-1))
    errors = Errors()
    log = AuditLog(str(path), errors)
    log.start()
    for n in range(1000):
        log.write(line(n))
    log.close()
    assert lines_in(path) == [line(n) for n in range(-1, 1000)]
    assert errors.count == 0


def test_a_new_file_is_readable_by_owner_and_group_only(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), Errors())
    log.start()
    log.write(line(1))
    log.close()
    assert stat.S_IMODE(path.stat().st_mode) & ~0o640 == 0


def test_close_writes_lines_of_a_log_never_started(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), Errors())
    log.write(line(1))
    log.close()
    assert lines_in(path) == [line(1)]


def test_a_line_after_close_is_counted(tmp_path: Path) -> None:
    errors = Errors()
    log = AuditLog(str(tmp_path / "audit.jsonl"), errors)
    log.start()
    log.close()
    log.write(line(1))
    assert errors.count == 1


def test_dash_writes_to_standard_output(capfd: pytest.CaptureFixture[str]) -> None:
    log = AuditLog("-", Errors())
    log.start()
    log.write(line(1))
    log.write(line(2))
    log.close()
    assert capfd.readouterr().out == (line(1) + line(2)).decode()


@pytest.mark.parametrize("target", ["directory", "/dev/full"])
def test_a_failed_write_is_counted_per_line_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, target: str
) -> None:
    if target == "/dev/full" and not os.path.exists(target):
        pytest.skip("no /dev/full")
    errors = Errors()
    log = AuditLog(str(tmp_path) if target == "directory" else target, errors)
    log.start()
    with caplog.at_level(logging.WARNING, logger="ollama_meter.gateway.audit"):
        for n in range(5):
            log.write(line(n))
        log.close()
    assert errors.count == 5
    [record] = caplog.records
    assert record.levelno == logging.WARNING


def test_lines_past_max_pending_are_dropped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    entered, release = threading.Event(), threading.Event()

    def slow_open(target: str) -> int:
        entered.set()
        release.wait(10)
        return os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    errors = Errors()
    log = AuditLog(str(path), errors, max_pending=4, opener=slow_open)
    log.start()
    log.write(line(0))
    assert entered.wait(10)  # the writer holds line 0 and waits on the disk
    for n in range(1, 8):
        log.write(line(n))
    assert errors.count == 3  # lines 5, 6 and 7: four were already waiting
    release.set()
    log.close()
    assert lines_in(path) == [line(n) for n in range(5)]
    assert errors.count == 3


@pytest.mark.parametrize("recreated", [False, True])
def test_lines_follow_a_rotated_file(tmp_path: Path, recreated: bool) -> None:
    path, moved = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    clock = Clock()
    errors = Errors()
    log = AuditLog(str(path), errors, clock=clock)
    log.start()
    log.write(line(1))
    clock.wait_for_calls(1)
    log.write(line(2))
    clock.wait_for_calls(2)  # line 1 is written, line 2 is in the file's next batch
    path.rename(moved)
    if recreated:  # logrotate's "create"
        path.touch()
    clock.now = 0.5  # under a second: not checked yet, the line goes to the moved file
    log.write(line(3))
    clock.wait_for_calls(3)
    clock.now = 1.0
    log.write(line(4))
    log.close()
    assert lines_in(moved) == [line(1), line(2), line(3)]
    assert lines_in(path) == [line(4)]
    assert errors.count == 0


def test_a_line_cut_short_is_ended_before_the_next(tmp_path: Path) -> None:
    """A full pipe takes part of a long line, then refuses the rest: the next line starts
    on a line of its own."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    received = bytearray()

    def pipe_open(target: str) -> int:  # a reopen first empties the pipe
        with contextlib.suppress(BlockingIOError):
            os.set_blocking(read_end, False)
            while chunk := os.read(read_end, 1 << 20):
                received.extend(chunk)
        return os.dup(write_end)

    long = b'{"n":"' + b"x" * (1 << 20) + b'"}\n'
    errors = Errors()
    log = AuditLog(str(tmp_path / "unused"), errors, opener=pipe_open)
    log.write(long)
    log.write(line(2))
    log.close()
    os.close(write_end)
    received.extend(os.read(read_end, 1 << 20))
    os.close(read_end)
    cut, rest = bytes(received).split(b"\n", 1)
    assert 0 < len(cut) < len(long) - 1
    assert long.startswith(cut)
    assert rest == line(2)
    assert errors.count == 1

"""The audit trail without a sidecar: records, redaction, rotation, disk full, never blocking."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from sidecar import audit
from sidecar.audit import AuditLog, RotatingFile, audit_record, redact_body, redact_text
from sidecar.config.model import Audit
from sidecar.events import AuditWritten, EventBus, RequestFinished
from sidecar.exchange import Exchange
from sidecar.http.message import Headers, Request
from tests.conftest import wait_for

SECRET = "sk-proj-abcdefghijklmnop1234567890"


def exchange(body: bytes = b"", status: int = 200, **fields: Any) -> Exchange:
    headers = Headers([("authorization", f"Bearer {SECRET}"), ("cookie", "session=abc123xyz")])
    request = Request("POST", "/openai/v1/chat/completions?key=querysecret", headers, body)
    ex = Exchange(request, "req-1", "127.0.0.1:5555", 100.0)
    ex.status = status
    ex.finished = 100.25
    for name, value in fields.items():
        setattr(ex, name, value)
    return ex


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_record_says_who_what_when_outcome_and_usage_but_no_content_or_secrets():
    ex = exchange(b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}')
    ex.tenant, ex.model, ex.tokens, ex.cost_usd, ex.attempts = "team-a", "gpt-4o", (12, 5), 0.001, 1
    record = audit_record(ex, include_bodies=False)
    assert record["tenant"] == "team-a" and record["model"] == "gpt-4o"
    assert record["path"] == "/openai/v1/chat/completions"  # the query may carry a key
    assert record["outcome"] == "success" and record["status"] == 200
    assert record["tokens"] == {"prompt": 12, "completion": 5, "total": 17}
    assert record["cost_usd"] == 0.001 and record["duration_ms"] == 250.0
    assert record["ts"].endswith("Z")
    text = orjson.dumps(record).decode()
    for leaked in ("hello", SECRET, "abc123xyz", "querysecret", "authorization", "cookie"):
        assert leaked not in text


@pytest.mark.parametrize(
    ("status", "error", "gone", "outcome"),
    [
        (200, None, False, "success"),
        (400, None, False, "client_error"),
        (429, "rate_limited", False, "refused"),
        (503, "circuit_open", False, "refused"),
        (429, None, False, "error"),
        (502, "retries_exhausted", False, "error"),
        (500, None, False, "error"),
        (0, None, True, "client_gone"),
    ],
)
def test_outcomes(status, error, gone, outcome):
    ex = exchange(status=status, error=error, client_gone=gone)
    assert audit_record(ex, False)["outcome"] == outcome


def test_bodies_only_when_asked_and_with_secrets_masked():
    body = orjson.dumps(
        {
            "model": "m",
            "max_tokens": 5,
            "api_key": "plain-secret-value",
            "messages": [{"role": "user", "content": f"my key is {SECRET}"}],
        }
    )
    ex = exchange(body)
    ex.attrs["response_body"] = [b'{"choices": [{"message": {"content": "hi"}}], ', b'"ok": 1}']
    record = audit_record(ex, include_bodies=True)
    request = record["request_body"]["json"]
    assert request["max_tokens"] == 5 and request["model"] == "m"
    assert request["api_key"] == "<redacted>"
    assert request["messages"][0]["content"] == "my key is <redacted>"
    assert record["response_body"]["json"]["choices"][0]["message"]["content"] == "hi"
    assert SECRET not in orjson.dumps(record).decode()


def test_redaction_of_text_and_truncated_bodies():
    assert (
        redact_text("Authorization: Bearer abcdefgh12345678") == "Authorization: Bearer <redacted>"
    )
    assert "AKIAABCDEFGHIJKLMNOP" not in redact_text("id AKIAABCDEFGHIJKLMNOP")
    assert redact_text("sk-ant-api03-abcdefghijklmnop") == "<redacted>"
    assert redact_text("tokens: 42, no secret here") == "tokens: 42, no secret here"
    big = redact_body(b"x" * 100 + b" " + SECRET.encode(), limit=1000)
    assert big["text"].endswith("<redacted>")
    cut = redact_body(b'{"a": "' + b"y" * 50 + b'"}', limit=10)
    assert cut == {"truncated": True, "text": '{"a": "yyy'}
    nested = redact_body(b'{"headers": {"Authorization": "x", "X-Api-Key": "y", "Accept": "z"}}')
    assert nested["json"]["headers"] == {
        "Authorization": "<redacted>",
        "X-Api-Key": "<redacted>",
        "Accept": "z",
    }


def settings(path: Path, **kw: Any) -> Audit:
    return Audit(path=str(path), **{"max_bytes": 1024, "backups": 2, **kw})


def test_rotation_keeps_whole_lines_and_at_most_backups_files(tmp_path):
    path = tmp_path / "audit.log"
    file = RotatingFile()
    line = orjson.dumps({"n": "x" * 90}) + b"\n"
    for _ in range(45):
        file.write([line], settings(path))
    file.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.log", "audit.log.1", "audit.log.2"]
    for name in names:
        data = (tmp_path / name).read_bytes()
        assert 0 < len(data) <= 1024 and data.endswith(b"\n")
        assert all(orjson.loads(x) for x in data.splitlines())
    full = (1024 // len(line)) * len(line)  # rotated before passing max_bytes
    assert (tmp_path / "audit.log.1").stat().st_size == full


def test_a_batch_larger_than_max_bytes_is_split_between_files_by_line(tmp_path):
    path = tmp_path / "audit.log"
    file = RotatingFile()
    line = b"m" * 299 + b"\n"
    file.write([line] * 10, settings(path, backups=3))  # 3000 bytes in one batch
    file.close()
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    # Three 300-byte lines fit in 1024: the ten lines fill three files, the last holds one.
    assert sizes == {"audit.log": 300, "audit.log.1": 900, "audit.log.2": 900, "audit.log.3": 900}


def test_rotation_with_no_backups_truncates(tmp_path):
    path = tmp_path / "audit.log"
    file = RotatingFile()
    for _ in range(15):
        file.write([b"z" * 99 + b"\n"], settings(path, backups=0))
    file.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.log"]
    assert path.stat().st_size == 500


def test_a_restart_appends_and_measures_the_existing_file(tmp_path):
    path = tmp_path / "audit.log"
    path.write_bytes(b"a" * 1000 + b"\n")
    file = RotatingFile()
    file.write([b"b" * 99 + b"\n"], settings(path))
    file.close()
    assert (tmp_path / "audit.log.1").stat().st_size == 1001
    assert path.read_bytes() == b"b" * 99 + b"\n"


def test_devices_are_never_rotated(tmp_path):
    link = tmp_path / "audit.log"
    link.symlink_to("/dev/null")
    file = RotatingFile()
    for _ in range(30):
        file.write([b"q" * 99 + b"\n"], settings(link))
    file.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.log"]
    assert link.is_symlink() and os.path.exists("/dev/null")


class FullDisk(io.RawIOBase):
    """A file whose writes fail like a full disk until ``space`` is set."""

    def __init__(self, space: threading.Event, sink: list[bytes]) -> None:
        self.space = space
        self.sink = sink

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if not self.space.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        self.sink.append(bytes(data))
        return len(data)


async def started_log(events: EventBus, audit_settings: Audit, opener: Any = None) -> AuditLog:
    log = AuditLog(events, lambda: audit_settings, opener)
    log.start()
    return log


async def test_disk_full_loses_the_batch_counts_it_and_recovers(tmp_path):
    events = EventBus()
    seen: list[AuditWritten] = []
    events.subscribe(AuditWritten, seen.append)
    space, sink = threading.Event(), []
    log = await started_log(events, settings(tmp_path / "a.log"), lambda p: FullDisk(space, sink))
    events.emit(RequestFinished(exchange()))
    events.emit(RequestFinished(exchange()))
    await wait_for(lambda: log.write_errors == 1, message="a failed write")
    assert seen == [AuditWritten(0, 2, "ENOSPC")] and log.lost == 2
    space.set()  # room again: the next batch reopens the file and is written
    events.emit(RequestFinished(exchange()))
    await wait_for(lambda: log.written == 1, message="a write after recovery")
    assert seen[-1] == AuditWritten(1) and len(sink) == 1
    await log.stop()


async def test_dev_full_is_a_full_disk(tmp_path):
    link = tmp_path / "audit.log"
    link.symlink_to("/dev/full")
    events = EventBus()
    log = await started_log(events, settings(link))
    events.emit(RequestFinished(exchange()))
    await wait_for(lambda: log.write_errors == 1, message="ENOSPC from /dev/full")
    await log.stop()


class SlowDisk(io.RawIOBase):
    def __init__(self, release: threading.Event) -> None:
        self.release = release
        self.data: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        assert self.release.wait(30), "never released"
        self.data.append(bytes(data))
        return len(data)


async def test_a_stuck_disk_never_blocks_the_loop_and_the_backlog_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "MAX_BACKLOG", 5)
    release = threading.Event()
    disk = SlowDisk(release)
    events = EventBus()
    log = await started_log(events, settings(tmp_path / "a.log"), lambda p: disk)
    try:
        events.emit(RequestFinished(exchange()))
        await wait_for(lambda: not log._pending, message="the first batch in the writer thread")
        loop = asyncio.get_running_loop()
        before = loop.time()
        for _ in range(20):  # the writer is stuck: 5 wait in memory, 15 are dropped
            events.emit(RequestFinished(exchange()))
        await asyncio.sleep(0)
        assert loop.time() - before < 0.5
        assert log.lost == 15 and len(log._pending) == 5
    finally:
        release.set()
    await wait_for(lambda: log.written == 6, message="the backlog written")
    await log.stop()
    assert b"".join(disk.data).count(b"\n") == 6


async def test_stop_flushes_what_is_queued(tmp_path):
    path = tmp_path / "a.log"
    events = EventBus()
    log = await started_log(events, settings(path))
    for _ in range(3):
        events.emit(RequestFinished(exchange()))
    await log.stop()
    assert len(read_lines(path)) == 3
    events.emit(RequestFinished(exchange()))  # after stop: ignored, nothing raised
    assert len(read_lines(path)) == 3


async def test_no_path_means_no_audit(tmp_path):
    events = EventBus()
    log = await started_log(events, Audit())
    events.emit(RequestFinished(exchange()))
    assert not log._pending and not log.enabled
    await log.stop()

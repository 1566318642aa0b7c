"""The audit trail: append-only JSON lines for compliance, rotated by size, never in the way.

One record per request: who (tenant, client), what (method, path, route, upstream, model), when
(``ts``, UTC, when the request finished, and its duration), the outcome, tokens and cost. Never
a header, a query string or a body, unless ``audit.include_bodies`` is set; then the request
body and the first :data:`~sidecar.policies.observe.CAPTURE_BYTES` of the response are added,
with secrets masked (:func:`redact_body`).

Serving never waits for the disk. Records are queued in memory (at most :data:`MAX_BACKLOG`)
and one writer task hands each batch to a worker thread, which appends, flushes and rotates
(``path`` -> ``path.1`` -> ... ``path.<backups>``, oldest dropped). A failed write (disk full,
I/O error) loses that batch, closes the file so the next batch reopens it, and is reported
through :class:`~sidecar.events.AuditWritten` (``llm_sidecar_audit_write_errors_total``,
``llm_sidecar_audit_dropped_records_total``); the proxy keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, BinaryIO

import orjson

from sidecar.accesslog import request_fields
from sidecar.config.model import Audit
from sidecar.events import AuditWritten, EventBus, RequestFinished
from sidecar.exchange import Exchange
from sidecar.policies.observe import CAPTURE_BYTES

log = logging.getLogger("sidecar.audit")

MAX_BACKLOG = 50_000  # records waiting for the disk; more are dropped (and counted)
REDACTED = "<redacted>"
Opener = Callable[[str], BinaryIO]

# Proxy-made refusals (replies.py kinds): the request never reached a model.
REFUSALS = frozenset(
    {
        "bad_request",
        "no_route",
        "egress_denied",
        "body_too_large",
        "headers_too_large",
        "rate_limited",
        "budget_exceeded",
        "circuit_open",
        "pool_exhausted",
        "shutting_down",
    }
)
_SECRET_KEY = re.compile(
    r"(?i)^(x[-_])?(api[-_]?key|apikey|authorization|proxy[-_]authorization|cookie|set[-_]cookie"
    r"|password|passwd|secret|client[-_]secret|private[-_]key|(access|refresh|id|session)[-_]?token"
    r"|token)$"
)
_SECRET_TEXT = re.compile(
    r"(?i)(bearer\s+)[a-z0-9._~+/=-]{8,}"  # Authorization: Bearer <token>
    r"|\b(sk-(?:ant-|proj-)?[a-z0-9_-]{8,})"  # OpenAI / Anthropic keys
    r"|\b(AKIA[0-9A-Z]{16})"  # AWS access key ids
    r"|\b(AIza[0-9a-z_-]{30,})"  # Google API keys
)


def redact_text(text: str) -> str:
    """``text`` with bearer tokens and provider API keys masked."""
    return _SECRET_TEXT.sub(
        lambda m: (m.group(1) + REDACTED) if m.group(1) else REDACTED,
        text,
    )


def _redact_value(value: Any, key: str = "") -> Any:
    if key and _SECRET_KEY.match(key):
        return REDACTED
    if isinstance(value, dict):
        return {k: _redact_value(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_body(body: bytes, limit: int = CAPTURE_BYTES) -> dict[str, Any]:
    """A body for the audit record: JSON with secret-named keys masked, else masked text.

    Returns ``{"json": ...}`` or ``{"text": ...}``, plus ``"truncated": True`` past ``limit``.
    """
    out: dict[str, Any] = {}
    if len(body) > limit:
        body = body[:limit]
        out["truncated"] = True
    else:
        try:
            out["json"] = _redact_value(orjson.loads(body))
            return out
        except orjson.JSONDecodeError:
            pass
    out["text"] = redact_text(body.decode("utf-8", "replace"))
    return out


def outcome_of(fields: dict[str, Any]) -> str:
    """success, refused (by the sidecar), client_gone, client_error (4xx) or error."""
    error, status = fields["error"], fields["status"]
    if fields["client_gone"]:
        return "client_gone"
    if error in REFUSALS:
        return "refused"
    if error is None and 100 <= status < 400:
        return "success"
    if error is None and 400 <= status < 500 and status != 429:
        return "client_error"
    return "error"


def audit_record(ex: Exchange, include_bodies: bool) -> dict[str, Any]:
    """The audit record of a finished exchange (see the module docstring)."""
    fields = request_fields(ex)
    record: dict[str, Any] = {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "request_id": fields["request_id"],
        "tenant": fields["tenant"],
        "client": fields["client"],
        "method": fields["method"],
        "path": fields["path"],
        "route": fields["route"],
        "upstream": fields["upstream"],
        "model": fields["model"],
        "status": fields["status"],
        "outcome": outcome_of(fields),
        "error": fields["error"],
        "attempts": fields["attempts"],
        "tokens": fields["tokens"],
        "cost_usd": fields["cost_usd"],
        "duration_ms": fields["duration_ms"],
    }
    if include_bodies:
        record["request_body"] = redact_body(ex.request.body)
        parts = ex.attrs.get("response_body")
        if parts is not None:
            body = redact_body(b"".join(parts), CAPTURE_BYTES + 1)
            if ex.attrs.get("response_truncated"):
                body["truncated"] = True
            record["response_body"] = body
    return record


def _append(path: str) -> BinaryIO:
    return open(path, "ab")


class RotatingFile:
    """Appends to ``path``, rotating by size; used from one worker thread at a time."""

    def __init__(self, opener: Opener | None = None) -> None:
        self._opener = opener or _append
        self._file: BinaryIO | None = None
        self._path: str | None = None
        self._size = 0
        self._regular = False

    def write(self, lines: list[bytes], settings: Audit) -> None:
        """Append whole ``lines``, rotating before one would take the file past ``max_bytes``.

        A file holds at most ``max_bytes`` unless a single line is longer; a line is never
        split. Consecutive lines that fit go out in one write.
        """
        assert settings.path is not None
        if self._path != settings.path:
            self.close()
        if self._file is None:
            self._open(settings.path)
        group: list[bytes] = []
        pending = 0
        for line in lines:
            size = self._size + pending
            if self._regular and size and size + len(line) > settings.max_bytes:
                self._append(group, pending)
                group, pending = [], 0
                self._rotate(settings)
            group.append(line)
            pending += len(line)
        self._append(group, pending)

    def _append(self, group: list[bytes], size: int) -> None:
        if not group:
            return
        file = self._file
        assert file is not None
        try:
            file.write(b"".join(group))
            file.flush()
        except BaseException:
            self.close()  # reopen (and re-measure) on the next batch
            raise
        self._size += size

    def close(self) -> None:
        file, self._file, self._path = self._file, None, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()

    def _open(self, path: str) -> None:
        file = self._opener(path)
        try:
            info = os.fstat(file.fileno())
            self._regular = stat.S_ISREG(info.st_mode)  # never rotate /dev/stdout or a pipe
            self._size = info.st_size
        except (OSError, ValueError, AttributeError):
            self._regular, self._size = False, 0
        self._file, self._path = file, path

    def _rotate(self, settings: Audit) -> None:
        path = settings.path
        assert path is not None
        self.close()
        if settings.backups == 0:
            os.truncate(path, 0)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{path}.{settings.backups}")
            for index in range(settings.backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{path}.{index}", f"{path}.{index + 1}")
            os.replace(path, f"{path}.1")
        self._open(path)


class AuditLog:
    """Subscribes to finished requests and writes their audit records (see the module doc)."""

    def __init__(
        self, events: EventBus, settings: Callable[[], Audit], opener: Opener | None = None
    ) -> None:
        self._events = events
        self._settings = settings
        self._file = RotatingFile(opener)
        self._pending: list[bytes] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.written = 0
        self.lost = 0
        self.write_errors = 0
        events.subscribe(RequestFinished, self._on_request)

    @property
    def enabled(self) -> bool:
        return self._settings().path is not None

    def _on_request(self, event: RequestFinished) -> None:
        settings = self._settings()
        if settings.path is None or self._closing:
            return
        if len(self._pending) >= MAX_BACKLOG:
            self.lost += 1
            self._events.emit(AuditWritten(0, 1, "backlog"))
            return
        record = audit_record(event.exchange, settings.include_bodies)
        self._pending.append(orjson.dumps(record) + b"\n")
        self._wakeup.set()

    def start(self) -> None:
        """Start the writer task (call from the running loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._writer(), name="audit-writer")

    async def stop(self, grace_s: float = 5.0) -> None:
        """Write what is queued (for up to ``grace_s`` seconds), then close the file."""
        self._closing = True
        self._wakeup.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(task, grace_s)
            except TimeoutError:  # the disk hangs: leave the file to the stuck worker thread
                log.error("audit log: gave up flushing after %.1fs", grace_s)
                return
        await asyncio.to_thread(self._file.close)

    async def _writer(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch, self._pending = self._pending, []
                await self._write(batch)
            if self._closing:
                return

    async def _write(self, batch: list[bytes]) -> None:
        settings = self._settings()
        if settings.path is None:  # disabled by a reload while these waited
            return
        started = time.monotonic()
        try:
            await asyncio.to_thread(self._file.write, batch, settings)
        except Exception as exc:  # disk full, I/O error, a broken path: count it, keep serving
            self.write_errors += 1
            self.lost += len(batch)
            code = exc.errno if isinstance(exc, OSError) else None
            name = errno.errorcode.get(code or 0, type(exc).__name__)
            log.error(
                "audit log: write to %s failed (%s), %d records lost",
                settings.path,
                name,
                len(batch),
            )
            self._events.emit(AuditWritten(0, len(batch), name))
            return
        self.written += len(batch)
        self._events.emit(AuditWritten(len(batch)))
        if time.monotonic() - started > 1.0:
            log.warning("audit log: a write to %s took over a second", settings.path)

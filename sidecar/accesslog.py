"""One JSON line per request on stdout, written without blocking on every request.

Lines are collected and flushed together a moment later (or when many are waiting), so a busy
sidecar makes one write per batch instead of one per request. A line never holds a header, a
query string or a body: the secrets a request carries (Authorization, API keys, cookies, a
``?key=`` parameter) cannot reach the log. The fields are documented in docs/OBSERVABILITY.md;
:func:`request_fields` is shared with the audit log so both describe a request the same way.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, BinaryIO

import orjson

from sidecar.events import EventBus, RequestFinished
from sidecar.exchange import Exchange

FLUSH_AFTER_S = 0.1
FLUSH_LINES = 256


def token_counts(tokens: object) -> dict[str, int] | None:
    """``{"prompt", "completion", "total"}`` from the exchange's tokens (a pair or a Usage)."""
    if tokens is None:
        return None
    # A tuple of types, not `tuple | list`: that builds a union object on every call.
    if isinstance(tokens, (tuple, list)) and len(tokens) == 2:  # noqa: UP038
        prompt, completion = tokens
    else:
        prompt = getattr(tokens, "prompt_tokens", None)
        completion = getattr(tokens, "completion_tokens", None)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return {"prompt": prompt, "completion": completion, "total": prompt + completion}


def request_fields(ex: Exchange, ts: float | None = None) -> dict[str, Any]:
    """What happened to one request: who, where, outcome, usage, sizes and durations.

    Durations are milliseconds: ``duration_ms`` received to fully sent; ``ttfb_ms`` to the
    upstream's response head; ``ttft_ms`` to a stream's first body chunk; ``upstream_ms`` the
    last attempt's upstream time (head sent to body read); ``overhead_ms`` the rest. ``ts``
    (Unix seconds), when given, leads the record.
    """
    # This runs for every request the access log sees: one dict literal, and milliseconds
    # as int(µs) / 1000 (to the µs, truncated), since round(x, 3) is a correctly-rounded
    # decimal conversion that cost more than the rest of the record (measured in callgrind).
    finished = ex.finished or ex.started
    total = finished - ex.started
    upstream_ms = overhead_ms = None
    if ex.upstream_started is not None:
        upstream_s = (ex.upstream_ended or finished) - ex.upstream_started
        upstream_ms = int(upstream_s * 1e6) / 1000
        overhead_ms = int(max(0.0, total - upstream_s) * 1e6) / 1000
    ttfb, ttft, tokens = ex.ttfb, ex.ttft, ex.tokens
    route, upstream = ex.route, ex.upstream
    request = ex.request
    return {
        "ts": ts,
        "request_id": ex.request_id,
        "client": ex.client,
        "method": request.method,
        "path": request.path,  # without the query string, which may carry a key
        "route": route.label if route is not None else "none",
        "upstream": upstream.name if upstream is not None else "none",
        "model": ex.model,
        "tenant": ex.tenant,
        "status": 499 if ex.client_gone and ex.status == 0 else ex.status,
        "error": ex.error,
        "attempts": ex.attempts,
        "breaker": ex.breaker,
        "cache": ex.cache,
        "tokens": token_counts(tokens) if tokens is not None else None,
        "cost_usd": ex.cost_usd,
        "bytes_in": len(request.body),
        "bytes_out": ex.bytes_out,
        "duration_ms": int(total * 1e6) / 1000,
        "ttfb_ms": None if ttfb is None else int(ttfb * 1e6) / 1000,
        "ttft_ms": None if ttft is None else int(ttft * 1e6) / 1000,
        "upstream_ms": upstream_ms,
        "overhead_ms": overhead_ms,
        "client_gone": ex.client_gone,
    }


class AccessLog:
    def __init__(self, events: EventBus, stream: BinaryIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._lines: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self.enabled = True
        events.subscribe(RequestFinished, self._on_request)

    def _on_request(self, event: RequestFinished) -> None:
        if not self.enabled:
            return
        ts = int(time.time() * 1000) / 1000  # ms, truncated (see request_fields)
        self._lines.append(orjson.dumps(request_fields(event.exchange, ts)))
        if len(self._lines) >= FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_AFTER_S, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = b"\n".join(self._lines) + b"\n"
        self._lines = []
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stdout closed or full: never let logging break serving

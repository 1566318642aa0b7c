"""One JSON line per request on stdout, written without blocking on every request.

Lines are collected and flushed together a moment later (or when many are waiting), so a busy
sidecar makes one write per batch instead of one per request.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import BinaryIO

import orjson

from sidecar.events import EventBus, RequestFinished

FLUSH_AFTER_S = 0.1
FLUSH_LINES = 256


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
        ex = event.exchange
        finished = ex.finished or ex.started
        record = {
            "ts": round(time.time(), 3),
            "request_id": ex.request_id,
            "method": ex.request.method,
            "path": ex.request.path,
            "route": ex.route_label,
            "upstream": ex.upstream_label,
            "model": ex.model,
            "tenant": ex.tenant,
            "status": 499 if ex.client_gone and ex.status == 0 else ex.status,
            "error": ex.error,
            "attempts": ex.attempts,
            "breaker": ex.breaker,
            "cache": ex.cache,
            "tokens": ex.tokens,
            "cost_usd": ex.cost_usd,
            "bytes_in": len(ex.request.body),
            "bytes_out": ex.bytes_out,
            "duration_ms": round((finished - ex.started) * 1000, 3),
            "ttfb_ms": round(ex.ttfb * 1000, 3) if ex.ttfb is not None else None,
            "client_gone": ex.client_gone,
        }
        self._lines.append(orjson.dumps(record))
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

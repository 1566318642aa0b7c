"""Observation stages: what only the response body shows, and how every attempt ended.

:class:`ObserveStage` is outermost in the route tier, so it sees the final response after
retries and fallbacks; it never changes a byte. For a streamed (``text/event-stream``) 2xx
response it records the time to first token (``exchange.ttft``: request received to the first
body chunk, the moment a token can reach the client); when the audit log asks for bodies it
keeps the first :data:`CAPTURE_BYTES` of the response in ``exchange.attrs["response_body"]``.
Both are a body tap (``Response.watch``), not a wrapper, so a stream pays no extra async layer
per chunk, and a response that needs neither is not touched at all.
When no policy has named the request's model, it reads it from the body (LLM calls only), so
metrics, the access log and the audit trail always say which model was asked for.

:class:`AttemptStage` is outermost in the upstream tier and emits one
:class:`~sidecar.events.UpstreamAttempted` per try.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from sidecar.events import UpstreamAttempted
from sidecar.exchange import Exchange
from sidecar.genai import operation_of
from sidecar.http.message import Response
from sidecar.policies.breaker import CircuitOpen
from sidecar.policies.usage import requested_model
from sidecar.replies import ERROR_HEADER

if TYPE_CHECKING:
    from sidecar.pipeline import Handler
    from sidecar.runtime import RouteRuntime, UpstreamRuntime

CAPTURE_BYTES = 256 * 1024  # response bytes kept for an audit record with include_bodies


class ObserveStage:
    """Wraps the body of responses that need watching; see the module docstring."""

    def __init__(self, route: RouteRuntime) -> None:
        self.route = route

    async def __call__(self, exchange: Exchange, call_next: Handler) -> Response:
        # Registered first, so it runs last: after accounting named the model from the
        # response's own usage record, so a body is parsed for its model only when no one did.
        exchange.on_finish(_name_model)
        response = await call_next(exchange)
        stream = 200 <= response.status < 300 and (
            response.headers.get("content-type") or ""
        ).startswith("text/event-stream")
        capture = _wants_bodies(exchange)
        if stream or capture:
            response.watch(tap=BodyObserver(exchange, stream, capture).feed)
        return response


def _name_model(exchange: Exchange) -> None:
    """Name the model of an LLM call for metrics and logs when no policy did."""
    if exchange.model is None and operation_of(exchange.request.path) is not None:
        exchange.model = requested_model(exchange.request.body)


def _wants_bodies(exchange: Exchange) -> bool:
    snapshot = exchange.snapshot
    if snapshot is None:
        return False
    audit = snapshot.config.audit
    return bool(audit.path and audit.include_bodies)


class BodyObserver:
    """Notes the first chunk's time and keeps a bounded copy, as a body tap (no wrapper)."""

    __slots__ = ("_exchange", "_stream", "_parts", "_room")

    def __init__(self, exchange: Exchange, stream: bool, capture: bool) -> None:
        self._exchange = exchange
        self._stream = stream
        self._parts: list[bytes] | None = [] if capture else None
        self._room = CAPTURE_BYTES

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        exchange = self._exchange
        if self._stream and exchange.ttft is None:
            exchange.ttft = time.monotonic() - exchange.started
        parts = self._parts
        if parts is not None:
            kept = chunk[: self._room]
            self._room -= len(kept)
            if kept:
                parts.append(kept)
                exchange.attrs["response_body"] = parts
            if len(kept) < len(chunk):
                exchange.attrs["response_truncated"] = True


class AttemptStage:
    """Upstream-tier stage, outermost: reports every attempt's outcome at its response head.

    The route tier sees only the final response; this sees each try, including the ones a
    retry or a fallback replaced and the ones the breaker refused, which is what per-upstream
    error rates (``llm_sidecar_upstream_attempts_total``, the live dashboard) are made of.
    """

    def __init__(self, upstream: UpstreamRuntime) -> None:
        self.upstream = upstream

    async def __call__(self, exchange: Exchange, call_next: Handler) -> Response:
        upstream = self.upstream
        # time.monotonic, not loop.time(): Python 3.11's get_running_loop() is a getpid()
        # syscall, and this runs on every attempt.
        started = time.monotonic()
        try:
            response = await call_next(exchange)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            kind = "circuit_open" if isinstance(exc, CircuitOpen) else getattr(exc, "kind", None)
            upstream.events.emit(
                UpstreamAttempted(
                    upstream.name,
                    exchange.route_label,
                    0,
                    kind if isinstance(kind, str) else "internal_error",
                    time.monotonic() - started,
                )
            )
            raise
        local = response.headers.get(ERROR_HEADER)  # a stage's own reply (a limit), not upstream's
        upstream.events.emit(
            UpstreamAttempted(
                upstream.name,
                exchange.route_label,
                response.status,
                local,
                time.monotonic() - started,
            )
        )
        return response

"""The last stage of the upstream tier: send the request over a pooled connection.

Builds the upstream request head once (hop-by-hop fields dropped, Host rewritten, configured
header overrides applied, Content-Length re-framed), sends it, and returns as soon as the
response head arrives; the body streams from the connection as the client reads it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sidecar.exchange import Exchange
from sidecar.http.message import HOP_BY_HOP, Headers, Response
from sidecar.upstream.connection import BodyStream, Release, UpstreamConnection
from sidecar.upstream.errors import UpstreamError

if TYPE_CHECKING:
    from sidecar.runtime import UpstreamRuntime

# Fields the proxy always sets itself on the upstream request.
_REPLACED = frozenset({"host", "content-length", "expect"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class Forwarder:
    """Pooled send to one upstream (the upstream tier's terminal handler)."""

    def __init__(self, upstream: UpstreamRuntime) -> None:
        self.upstream = upstream
        self._base = upstream.origin.base_path
        self._skip = HOP_BY_HOP | _REPLACED | upstream.override_names
        self._overrides = "".join(f"{name}: {value}\r\n" for name, value in upstream.overrides)

    async def __call__(self, exchange: Exchange) -> Response:
        upstream = self.upstream
        pool = upstream.pool
        request = exchange.request
        payload = request.body if exchange.upstream_body is None else exchange.upstream_body
        head = self._head(exchange, len(payload))
        timeouts = upstream.config.timeouts
        now = time.monotonic()
        exchange.upstream_started = now
        first_byte_deadline = now + timeouts.first_byte_s
        per_try = exchange.attrs.get("per_try_deadline")
        if per_try is not None:
            first_byte_deadline = min(first_byte_deadline, per_try)
        total_deadline = exchange.started + timeouts.total_s
        head_only = request.method == "HEAD"
        for _ in range(3):  # stale keep-alive connections are retried on a fresh one
            conn = pool.try_reuse()
            reused = conn is not None
            if conn is None:
                conn, reused = await pool.acquire()
            try:
                await conn.send(head, payload, head_only=head_only)
                status, reason, raw_headers = await conn.read_head(first_byte_deadline)
            except UpstreamError as exc:
                pool.release(conn, False)
                if reused and exc.kind == "reset" and not exc.response_started:
                    continue
                raise
            except BaseException:
                pool.release(conn, False)
                raise
            break
        else:  # pragma: no cover - three stale connections in a row
            raise UpstreamError("reset", "upstream keeps closing pooled connections")
        exchange.ttfb = time.monotonic() - exchange.started
        headers = Headers(raw_headers).without_hop_by_hop()
        body = BodyStream(conn, timeouts.idle_s, total_deadline, self._releaser(exchange))
        return Response(status, headers, body, reason)

    def _releaser(self, exchange: Exchange) -> Release:
        pool = self.upstream.pool

        def release(conn: UpstreamConnection, reusable: bool) -> None:
            exchange.upstream_ended = time.monotonic()
            pool.release(conn, reusable)

        return release

    def _head(self, exchange: Exchange, body_length: int) -> bytes:
        request = exchange.request
        skip = self._skip
        connection = request.headers.get("connection")
        if connection:
            skip = skip | {token.strip().lower() for token in connection.split(",")}
        parts = [
            f"{request.method} {self._base}{exchange.upstream_path} HTTP/1.1\r\n"
            f"host: {self.upstream.origin.host_header}\r\n"
        ]
        for name, value in request.headers.items():
            if name not in skip:
                parts.append(f"{name}: {value}\r\n")
        parts.append(self._overrides)
        if body_length or request.method in _BODY_METHODS:
            parts.append(f"content-length: {body_length}\r\n")
        parts.append("\r\n")
        return "".join(parts).encode("latin-1")

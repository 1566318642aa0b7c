"""CONNECT (HTTPS_PROXY): blind tunnels, or TLS interception for the hosts that opt in.

For every CONNECT: the authority must parse (else 400), the host must be allowed (else 403
``egress_denied``), and the host's open tunnels must stay under ``egress.max_tunnels_per_host``
(else 429 ``tunnel_limit``). Then either

* **blind**: the tunnel upstream's breaker is asked (open: 503 ``circuit_open`` at once); the
  host is resolved once, every address is checked against the private-address rule, and the
  sidecar connects to a checked address within ``egress.connect_timeout_s`` (connect failures
  count on the breaker); after ``200`` a :class:`~sidecar.egress.tunnel.Pipe` carries bytes; or
* **intercept**: the sidecar answers ``200``, upgrades the client connection to TLS in place
  (``StreamWriter.start_tls``) with a leaf certificate for the host signed by the configured
  CA, and serves the decrypted stream with the same HTTP/1.1 machinery as base-URL traffic;
  every request is routed by the CONNECT host through the full pipeline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from sidecar.egress.policy import EgressDenied, EgressPolicy
from sidecar.egress.target import ProxyTarget, parse_authority
from sidecar.egress.tunnel import CHUNK, Pipe
from sidecar.events import BreakerRejected, EgressRefused, TunnelClosed, TunnelOpened
from sidecar.http.message import Request, Response
from sidecar.http.server import ClientConnection, ConnectionHandler, ResponseWriter
from sidecar.policies.breaker import Outcome
from sidecar.replies import local_reply
from sidecar.runtime import Snapshot

if TYPE_CHECKING:
    from sidecar.egress.gate import EgressGate

log = logging.getLogger("sidecar.egress")

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
HANDSHAKE_TIMEOUT_S = 10.0
Serve = Callable[[Request, str, ResponseWriter, ProxyTarget], Awaitable[bool]]


class Tunnels:
    """Open CONNECT tunnels, counted per host."""

    def __init__(self, gate: EgressGate) -> None:
        self.gate = gate
        self.active: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<Tunnels {sum(self.active.values())} open to {len(self.active)} hosts>"

    def snapshot(self) -> dict[str, int]:
        return dict(self.active)

    async def handle(
        self, request: Request, conn: ClientConnection, leftover: bytes, serve: Serve
    ) -> None:
        """Answer one CONNECT and carry the tunnel until it ends; the caller then closes."""
        gate = self.gate
        snapshot = gate.current()
        try:
            target = parse_authority(request.target)
        except ValueError as exc:
            await _reply(conn, request, local_reply("bad_request", f"malformed CONNECT: {exc}"))
            return
        if conn.draining():
            await _reply(conn, request, local_reply("shutting_down", "the sidecar is draining"))
            return
        policy = gate.policy(snapshot)
        host = target.host
        try:
            policy.check_host(host, target.port)
        except EgressDenied as exc:
            await _reply(conn, request, gate.refusal(host, exc))
            return
        limit = snapshot.config.egress.max_tunnels_per_host
        if self.active.get(host, 0) >= limit:
            gate.events.emit(EgressRefused(host, "tunnel_limit"))
            message = f"{limit} tunnels to {host} are open already (egress.max_tunnels_per_host)"
            await _reply(conn, request, local_reply("tunnel_limit", message, retry_after_s=1))
            return
        self.active[host] = self.active.get(host, 0) + 1
        try:
            if policy.intercepts(host):
                await self._intercept(snapshot, target, request, conn, leftover, serve)
            else:
                await self._blind(snapshot, policy, target, request, conn, leftover)
        finally:
            self.active[host] -= 1
            if not self.active[host]:
                del self.active[host]

    async def _blind(
        self,
        snapshot: Snapshot,
        policy: EgressPolicy,
        target: ProxyTarget,
        request: Request,
        conn: ClientConnection,
        leftover: bytes,
    ) -> None:
        gate = self.gate
        egress = snapshot.config.egress
        upstream = gate.tunnel_upstream(snapshot, target)
        breaker = upstream.breaker
        permit = breaker.acquire()
        if permit is None:
            gate.events.emit(BreakerRejected(upstream.name))
            reply = local_reply(
                "circuit_open",
                f"{upstream.name}: circuit open after repeated connect failures",
                retry_after_s=breaker.retry_after_s(),
            )
            await _reply(conn, request, reply)
            return
        try:
            async with asyncio.timeout(egress.connect_timeout_s):
                reader, writer = await self._connect(policy, target)
        except EgressDenied as exc:
            permit.release()
            await _reply(conn, request, gate.refusal(target.host, exc))
            return
        except TimeoutError:
            permit.record(breaker.classify(None, "connect_error"))
            message = f"connect to {target.authority} timed out after {egress.connect_timeout_s}s"
            await _reply(conn, request, local_reply("upstream_timeout", message))
            return
        except OSError as exc:
            permit.record(breaker.classify(None, "connect_error"))
            message = f"cannot connect to {target.authority}: {exc}"
            await _reply(conn, request, local_reply("upstream_connect", message))
            return
        except asyncio.CancelledError:
            permit.record(Outcome.CANCELLED)
            raise
        permit.record(Outcome.SUCCESS)
        loop = asyncio.get_running_loop()
        started = loop.time()
        pipe = Pipe((conn.reader, conn.writer), (reader, writer), egress.tunnel_idle_s)
        try:
            conn.writer.write(ESTABLISHED)
            await conn.writer.drain()
        except (ConnectionError, OSError):
            writer.close()
            return
        gate.events.emit(TunnelOpened(target.host, "blind"))
        try:
            await pipe.run(leftover)
        finally:
            duration = loop.time() - started
            gate.events.emit(
                TunnelClosed(
                    target.host, "blind", pipe.bytes_in, pipe.bytes_out, duration, pipe.reason
                )
            )

    async def _connect(
        self, policy: EgressPolicy, target: ProxyTarget
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Resolve once, check every address, connect to a checked one (no second lookup)."""
        addresses = await self.gate.resolve_checked(policy, target.host, target.port)
        error: OSError | None = None
        for address in addresses:
            try:
                return await asyncio.open_connection(address, target.port, limit=CHUNK)
            except OSError as exc:
                error = exc
        raise OSError(f"no address of {target.host} accepted a connection ({error})")

    async def _intercept(
        self,
        snapshot: Snapshot,
        target: ProxyTarget,
        request: Request,
        conn: ClientConnection,
        leftover: bytes,
        serve: Serve,
    ) -> None:
        gate = self.gate
        try:
            context = gate.authority(snapshot).context_for(target.host)
        except (OSError, ValueError) as exc:
            log.error("TLS interception of %s is misconfigured: %s", target.host, exc)
            message = f"TLS interception is misconfigured: {exc}"
            await _reply(conn, request, local_reply("internal_error", message))
            return
        if leftover:
            message = "the client sent data before the CONNECT answer; cannot intercept"
            await _reply(conn, request, local_reply("bad_request", message))
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        writer = conn.writer
        try:
            # No await between this write and start_tls pausing the transport, so the client's
            # ClientHello cannot be read as plain bytes.
            writer.write(ESTABLISHED)
            await writer.start_tls(context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        except (ConnectionError, OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            log.info("TLS handshake for %s with %s failed: %r", target.host, conn.client, exc)
            return
        gate.events.emit(TunnelOpened(target.host, "intercept"))
        handler = _Intercepted(serve, target, conn)
        inner = ClientConnection(conn.reader, writer, handler, conn.limits, conn.draining)
        conn.busy = False  # between requests a drain may close it, like any keep-alive client
        try:
            await inner.serve()
        finally:
            duration = loop.time() - started
            gate.events.emit(TunnelClosed(target.host, "intercept", 0, 0, duration, "closed"))


class _Intercepted(ConnectionHandler):
    """Serves the decrypted requests of one intercepted tunnel, all routed by its host."""

    def __init__(self, serve: Serve, target: ProxyTarget, outer: ClientConnection) -> None:
        self._serve = serve
        self._target = target
        self._outer = outer  # the listener's connection: busy while a request is answered

    async def handle(self, request: Request, client: str, send: ResponseWriter) -> bool:
        self._outer.busy = True
        try:
            return await self._serve(request, client, send, self._target)
        finally:
            self._outer.busy = False

    async def tunnel(self, request: Request, conn: ClientConnection, leftover: bytes) -> None:
        message = "CONNECT inside an intercepted tunnel is not supported"
        await _reply(conn, request, local_reply("bad_request", message))


async def _reply(conn: ClientConnection, request: Request, response: Response) -> None:
    """Refuse a CONNECT; the connection closes after the reply."""
    response.headers.set("connection", "close")
    try:
        await conn.write_response(response, request, None)
    except (ConnectionError, OSError):
        pass

"""A keep-alive connection pool per upstream.

The bookkeeping (idle list, counts, waiters) is synchronous and does no I/O, as in httpcore's
pool; only :meth:`ConnectionPool._connect` touches the network. A released connection is handed
straight to the oldest waiter, so a full pool serves waiters in FIFO order.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

from sidecar.config.model import Pool, Timeouts, Tls
from sidecar.upstream.connection import Origin, UpstreamConnection
from sidecar.upstream.errors import UpstreamError
from sidecar.upstream.resolver import Resolver

AddressCheck = Callable[[str, str], None]  # (host, address) -> raise to refuse


def make_origin(url: str, tls: Tls) -> Origin:
    parts = urlsplit(url)
    scheme = parts.scheme
    host = parts.hostname or ""
    default_port = 443 if scheme == "https" else 80
    port = parts.port or default_port
    host_for_header = f"[{host}]" if ":" in host else host
    host_header = host_for_header if port == default_port else f"{host_for_header}:{port}"
    context: ssl.SSLContext | None = None
    if scheme == "https":
        context = ssl.create_default_context(cafile=tls.ca_bundle)
        if not tls.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["http/1.1"])
    return Origin(scheme, host, port, parts.path.rstrip("/"), host_header, context)


class ConnectionPool:
    """Connections to one origin: at most ``max_connections`` open, ``max_idle`` kept idle."""

    def __init__(
        self,
        origin: Origin,
        settings: Pool,
        timeouts: Timeouts,
        resolver: Resolver,
        address_check: AddressCheck | None = None,
    ) -> None:
        self.origin = origin
        self.settings = settings
        self.timeouts = timeouts
        self._resolver = resolver
        self._address_check = address_check
        self._idle: deque[UpstreamConnection] = deque()
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self._busy = 0  # checked out or being connected
        self.opened = 0  # connections opened over the pool's life
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<ConnectionPool {self.origin} [{self._busy} active, {len(self._idle)} idle, "
            f"{len(self._waiters)} waiting]>"
        )

    def snapshot(self) -> dict[str, object]:
        return {
            "origin": str(self.origin),
            "active": self._busy,
            "idle": len(self._idle),
            "waiting": len(self._waiters),
            "max_connections": self.settings.max_connections,
            "opened_total": self.opened,
        }

    @property
    def active(self) -> int:
        return self._busy

    @property
    def idle(self) -> int:
        return len(self._idle)

    def try_reuse(self) -> UpstreamConnection | None:
        """An idle keep-alive connection, taken for one exchange, or None: the synchronous
        fast path of :meth:`acquire` (no coroutine when the pool is warm)."""
        if self._closed:
            return None
        return self._take_idle()

    async def acquire(self) -> tuple[UpstreamConnection, bool]:
        """A connection for one exchange, and whether it was reused from the idle list."""
        if self._closed:
            raise UpstreamError("connect_error", "upstream pool is closed (upstream removed)")
        conn = self._take_idle()
        if conn is not None:
            return conn, True
        if self._busy < self.settings.max_connections:
            self._busy += 1
            return await self._connect_slot(), False
        return await self._wait()

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Give a connection back after its exchange; not reusable means close it."""
        reusable = reusable and not self._closed and conn.is_usable()
        while self._waiters:
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            if reusable:
                waiter.set_result(conn)  # stays busy, changes hands
            else:
                conn.close()
                waiter.set_result(None)  # the slot changes hands; the waiter connects
            return
        self._busy -= 1
        if reusable and len(self._idle) < self.settings.max_idle:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    def prune(self) -> None:
        """Close idle connections past keepalive_s or closed by the server."""
        now = time.monotonic()
        keep: deque[UpstreamConnection] = deque()
        for conn in self._idle:
            if conn.is_usable() and now - conn.idle_since < self.settings.keepalive_s:
                keep.append(conn)
            else:
                conn.close()
        self._idle = keep

    async def aclose(self) -> None:
        """Close idle connections now; busy ones close when their exchange ends."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(
                    UpstreamError("connect_error", "upstream pool is closed (upstream removed)")
                )
        self._waiters.clear()

    def _take_idle(self) -> UpstreamConnection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # most recently used first: the likeliest to be alive
            if conn.is_usable() and now - conn.idle_since < self.settings.keepalive_s:
                self._busy += 1
                return conn
            conn.close()
        return None

    async def _wait(self) -> tuple[UpstreamConnection, bool]:
        waiter: asyncio.Future[UpstreamConnection | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.settings.max_wait_s):
                conn = await waiter
        except TimeoutError:
            raise UpstreamError(
                "pool_exhausted",
                f"no upstream connection free within {self.settings.max_wait_s}s "
                f"({self.settings.max_connections} in use)",
            ) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()  # handed over just as we were cancelled: give it back
                if handed is not None:
                    self.release(handed, True)
                else:
                    self._busy -= 1
                    self._wake_one()
            raise
        if conn is not None:
            return conn, True
        return await self._connect_slot(), False

    async def _connect_slot(self) -> UpstreamConnection:
        """Open a connection in a slot already counted in ``_busy``; free the slot on failure."""
        try:
            conn = await self._connect()
        except BaseException:
            self._busy -= 1
            self._wake_one()
            raise
        self.opened += 1
        return conn

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._busy += 1
                waiter.set_result(None)
                return

    async def _connect(self) -> UpstreamConnection:
        origin = self.origin
        try:
            async with asyncio.timeout(self.timeouts.connect_s):
                addresses = await self._resolver.resolve(origin.host, origin.port)
                last_error: Exception | None = None
                for address in addresses:
                    if self._address_check is not None:
                        self._address_check(origin.host, address)
                    try:
                        reader, writer = await asyncio.open_connection(
                            address,
                            origin.port,
                            ssl=origin.ssl,
                            server_hostname=origin.host if origin.ssl else None,
                            limit=1 << 20,
                        )
                        return UpstreamConnection(reader, writer)
                    except OSError as exc:
                        last_error = exc
                raise UpstreamError("connect_error", f"cannot connect to {origin}: {last_error}")
        except TimeoutError:
            raise UpstreamError(
                "connect_error", f"connect to {origin} timed out after {self.timeouts.connect_s}s"
            ) from None
        except OSError as exc:  # DNS failure, TLS handshake failure
            raise UpstreamError("connect_error", f"cannot connect to {origin}: {exc}") from exc

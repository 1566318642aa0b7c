"""The client-facing HTTP/1.1 listener, on asyncio streams with the httptools (llhttp) parser.

Per connection, one task reads and parses (so pipelined requests queue up in order and a client
that goes away is noticed at once, even while its request waits on a slow upstream), and the
connection's own task answers requests one at a time. Bodies are buffered up to a cap so that
retries can resend them; responses stream back chunk by chunk with ``drain()`` after every
write, so a slow client slows the upstream read instead of growing memory.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httptools

from sidecar.config.model import Http
from sidecar.http.message import Headers, Request, Response
from sidecar.replies import local_reply
from sidecar.timers import LazyDeadline

log = logging.getLogger("sidecar.http")

NO_BODY_STATUSES = frozenset({204, 304})
MAX_PIPELINED = 16
WRITE_HIGH_WATER = 64 * 1024  # drain() only above this many unsent bytes


@dataclass(slots=True)
class Refusal:
    """A request the parser refused; answered in order, then the connection closes."""

    kind: str
    message: str


class ConnectionHandler:
    """What the listener needs from the proxy core, kept small so both can be tested apart."""

    async def handle(self, request: Request, client: str, send: ResponseWriter) -> bool:
        """Answer one request by calling ``send``; return whether the connection may be kept."""
        raise NotImplementedError

    async def tunnel(self, request: Request, conn: ClientConnection, leftover: bytes) -> None:
        """Take over the connection after a CONNECT (``leftover``: bytes read past its head).

        The handler owns ``conn.reader``/``conn.writer`` until it returns (it may answer with a
        reply through ``conn.write_response``, pipe bytes, or ``start_tls`` in place); the
        listener closes the connection afterwards. See sidecar/egress/connect.py.
        """
        raise NotImplementedError


ErrorEvent = Callable[[BaseException], bytes | None]
ResponseWriter = Callable[[Response, Request, ErrorEvent | None], Awaitable[int]]


class ClientConnection:
    """One client connection: a reader task that parses, and a loop that answers in order."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handler: ConnectionHandler,
        limits: Http,
        draining: Callable[[], bool],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.handler = handler
        self.limits = limits
        self.draining = draining
        peer = writer.get_extra_info("peername")
        self.client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.pending: deque[Request | Refusal] = deque()
        self.busy = False
        self.closed = False
        self._wakeup: asyncio.Future[object] | None = None
        self._loop = asyncio.get_running_loop()
        self._idle = LazyDeadline(self._loop, self._on_idle)
        self._room: asyncio.Event = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task[None] | None = None
        self.tunnel_leftover = b""  # bytes read past a CONNECT head
        self._parser = httptools.HttpRequestParser(self)
        self._reset_message()

    # parser callbacks ------------------------------------------------------------------------
    def _reset_message(self) -> None:
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._head_size = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._in_head = True
        self._refused: Refusal | None = None

    def on_message_begin(self) -> None:
        self._reset_message()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))
        self._head_size += len(name) + len(value) + 4
        if self._head_size + len(self._url) > self.limits.max_header_bytes:
            self._refused = Refusal(
                "headers_too_large",
                f"request head exceeds {self.limits.max_header_bytes} bytes",
            )
            raise ValueError("head too large")
        if len(self._headers) > self.limits.max_headers:
            self._refused = Refusal(
                "headers_too_large", f"more than {self.limits.max_headers} header fields"
            )
            raise ValueError("too many headers")

    def on_headers_complete(self) -> None:
        self._in_head = False
        length = None
        for name, value in self._headers:
            if name == "content-length":
                length = int(value) if value.isdigit() else None
        if length is not None and length > self.limits.max_request_body_bytes:
            self._refused = Refusal(
                "body_too_large",
                f"request body of {length} bytes exceeds the limit of "
                f"{self.limits.max_request_body_bytes} bytes",
            )
            raise ValueError("body too large")
        for name, value in self._headers:
            if name == "expect" and value.lower() == "100-continue":
                # Only when nothing is being written, so it can't interleave with a response.
                if not self.busy and not self.pending:
                    self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.limits.max_request_body_bytes:
            self._refused = Refusal(
                "body_too_large",
                f"request body exceeds the limit of {self.limits.max_request_body_bytes} bytes",
            )
            raise ValueError("body too large")
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        request = Request(
            method=parser.get_method().decode("ascii"),
            target=self._url.decode("latin-1"),
            headers=Headers(self._headers),
            body=body,
            http_version=parser.get_http_version(),
            keep_alive=parser.should_keep_alive(),
        )
        self._push(request)

    # reading -----------------------------------------------------------------------------------
    def _push(self, item: Request | Refusal) -> None:
        self.pending.append(item)
        if len(self.pending) >= MAX_PIPELINED:
            self._room.clear()
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _read_loop(self) -> None:
        reader = self.reader
        parser = self._parser
        max_head = self.limits.max_header_bytes
        try:
            while True:
                if not self._room.is_set():
                    await self._room.wait()
                data = await reader.read(65536)
                if not data:
                    break
                if self._in_head:
                    self._head_bytes += len(data)
                try:
                    parser.feed_data(data)
                except httptools.HttpParserUpgrade as upgrade:
                    if parser.get_method() == b"CONNECT":
                        # HTTPS_PROXY: the CONNECT request was pushed; reading stops here and
                        # the bytes after its head belong to the tunnel (see serve()).
                        self.tunnel_leftover = data[upgrade.args[0] :]
                    else:
                        self._push(Refusal("bad_request", "protocol upgrades are not supported"))
                    break
                except httptools.HttpParserError as exc:
                    refusal = self._refused or Refusal("bad_request", f"malformed request: {exc}")
                    self._push(refusal)
                    break
                if self._in_head and self._head_bytes > max_head and (self._url or self._headers):
                    self._push(
                        Refusal("headers_too_large", f"request head exceeds {max_head} bytes")
                    )
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            # A client that leaves mid-request cancels it, so the upstream stops (and stops
            # billing tokens) at once.
            if self.busy and self._task is not None and not self.pending:
                self._task.cancel()
            wakeup = self._wakeup
            if wakeup is not None and not wakeup.done():
                wakeup.set_result(None)

    async def _next(self) -> Request | Refusal | None:
        while not self.pending:
            if self.closed:
                return None
            wakeup = self._wakeup = self._loop.create_future()
            self._idle.start(time.monotonic() + self.limits.client_idle_s)
            try:
                await wakeup
            finally:
                self._idle.stop()
                self._wakeup = None
            if wakeup.result() is _IDLE and not self.pending:
                return None
        item = self.pending.popleft()
        if not self._room.is_set() and len(self.pending) < MAX_PIPELINED // 2:
            self._room.set()
        return item

    def _on_idle(self) -> None:
        """Idle for ``client_idle_s`` while waiting for a request: close the connection."""
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(_IDLE)

    # answering ---------------------------------------------------------------------------------
    async def serve(self) -> None:
        self._task = asyncio.current_task()
        read_task = asyncio.create_task(self._read_loop())
        try:
            while True:
                item = await self._next()
                if item is None:
                    break
                if isinstance(item, Refusal):
                    reply = local_reply(item.kind, item.message)
                    reply.headers.set("connection", "close")
                    await self.write_response(reply, Request("GET", "/", Headers()), None)
                    break
                self.busy = True
                if item.method == "CONNECT":  # the tunnel handler owns the connection now
                    await self.handler.tunnel(item, self, self.tunnel_leftover)
                    break
                keep = await self.handler.handle(item, self.client, self.write_response)
                self.busy = False
                if not keep or not item.keep_alive or self.draining():
                    break
        except asyncio.CancelledError:
            pass
        except (ConnectionError, OSError):
            pass
        finally:
            read_task.cancel()
            self._idle.cancel()
            self.writer.close()

    async def write_response(
        self, response: Response, request: Request, error_event: ErrorEvent | None
    ) -> int:
        """Write a response; return the body bytes written.

        Raises ConnectionError if the client went away, and re-raises a body error after
        writing ``error_event(exc)`` (if it gives bytes) without a clean end of the message, so
        the client never mistakes a cut stream for a complete one. The body is always closed,
        so its upstream connection is freed.
        """
        writer = self.writer
        headers = response.headers
        no_body = (
            request.method == "HEAD"
            or response.status in NO_BODY_STATUSES
            or (100 <= response.status < 200)
        )
        head = [f"HTTP/1.1 {response.status} {response.reason or _reason(response.status)}\r\n"]
        length = headers.get("content-length")
        chunked = False
        close = not request.keep_alive or self.draining()
        if not no_body and length is None:
            if request.http_version == "1.1":
                chunked = True
            else:
                close = True
        for name, value in headers.items():
            head.append(f"{name}: {value}\r\n")
        if chunked:
            head.append("transfer-encoding: chunked\r\n")
        if close and "connection" not in headers:
            head.append("connection: close\r\n")
        head.append("\r\n")
        sent = 0
        body = response.body
        transport = writer.transport
        encoded = "".join(head).encode("latin-1")
        head_bytes: bytes | None = encoded
        try:
            if no_body or chunked:
                # Streams get their head at once; a sized body's head rides with its first
                # chunk (one write instead of two: the body usually came with the head).
                writer.write(encoded)
                head_bytes = None
            if no_body:
                await response.aclose()
                await writer.drain()
                return 0
            try:
                async for chunk in body:
                    if not chunk:
                        continue
                    sent += len(chunk)
                    if chunked:
                        writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    elif head_bytes is not None:
                        writer.write(head_bytes + chunk)
                        head_bytes = None
                    else:
                        writer.write(chunk)
                    if transport.is_closing():
                        raise ConnectionResetError("client connection closed")
                    if transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                        await writer.drain()  # backpressure: wait for a slow client
                if head_bytes is not None:
                    writer.write(head_bytes)  # an empty sized body
            except (ConnectionError, asyncio.CancelledError):
                raise
            except Exception as exc:
                self.closed = True
                event = error_event(exc) if error_event is not None else None
                is_sse = (headers.get("content-type") or "").startswith("text/event-stream")
                if event and chunked and is_sse:
                    writer.write(b"%x\r\n%b\r\n" % (len(event), event))
                    await writer.drain()
                raise
            if chunked:
                writer.write(b"0\r\n\r\n")
            if transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                await writer.drain()  # else the kernel took it all: no coroutine to wait on
        finally:
            await response.aclose()
        if close:
            self.closed = True
        return sent


_IDLE = object()  # the wake-up value that means "idle too long"


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class ProxyListener:
    """The proxy listener: accepts connections and tracks them for a graceful drain."""

    def __init__(self, handler: ConnectionHandler, limits: Callable[[], Http]) -> None:
        self.handler = handler
        self.limits = limits
        self.draining = False
        self.connections: set[ClientConnection] = set()
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.server = await asyncio.start_server(
            self._accept, host, port, reuse_address=True, limit=1 << 20, backlog=2048
        )
        sockname = self.server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ClientConnection(reader, writer, self.handler, self.limits(), self._is_draining)
        self.connections.add(conn)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)

    def _is_draining(self) -> bool:
        return self.draining

    async def drain(self, grace_s: float) -> None:
        """Stop accepting, let in-flight requests finish for up to ``grace_s``, then cut."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while loop.time() < deadline:
            for conn in list(self.connections):
                if not conn.busy and not conn.pending and conn._task is not None:
                    conn._task.cancel()  # idle keep-alive connection: close it now
            if not self.connections:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn._task is not None:
                conn._task.cancel()
        for _ in range(100):
            if not self.connections:
                break
            await asyncio.sleep(0.01)
        if self.server is not None:
            self.server.close()


def new_request_id() -> str:
    # 96 random bits; not os.urandom, which is a getrandom() syscall per request.
    return f"{random.getrandbits(96):024x}"

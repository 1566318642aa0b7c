"""One HTTP/1.1 client connection to an upstream: send, read the head, stream the body.

States are explicit (as httpcore's http11): idle in the pool, busy with one exchange, closed.
A connection goes back to the pool only when its response was read to the end and both sides
agreed to keep it alive; anything else closes it. Each response gets a fresh httptools parser,
which makes HEAD responses (no body despite Content-Length) and 1xx interim responses simple.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import httptools

from sidecar.http.message import BodyWatchers
from sidecar.timers import LazyDeadline
from sidecar.upstream.errors import UpstreamError

READ_SIZE = 65536
DRAIN_ABOVE = 64 * 1024  # unsent bytes in the transport before send() waits for the socket


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an upstream lives: scheme, host, port, TLS context and the Host header to send."""

    scheme: str
    host: str
    port: int
    base_path: str
    host_header: str
    ssl: object | None  # ssl.SSLContext for https, None for http

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


class UpstreamConnection:
    """A client-side HTTP/1.1 connection; used by one exchange at a time."""

    __slots__ = (
        "reader",
        "writer",
        "idle_since",
        "exchanges",
        "_parser",
        "_status",
        "_reason",
        "_headers",
        "_chunks",
        "_headers_done",
        "_complete",
        "_head_only",
        "_keep_alive",
        "_loop",
        "_expired",
        "_read_deadline",
    )

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0
        self.exchanges = 0
        self._parser: httptools.HttpResponseParser | None = None
        self._status = 0
        self._reason = ""
        self._headers: list[tuple[str, str]] = []
        self._chunks: list[bytes] = []
        self._headers_done = False
        self._complete = False
        self._head_only = False
        self._keep_alive = False
        self._loop = asyncio.get_running_loop()
        self._expired = False
        self._read_deadline = LazyDeadline(self._loop, self._expire)

    def __repr__(self) -> str:
        peer = self.writer.get_extra_info("peername")
        return f"<UpstreamConnection {peer} exchanges={self.exchanges}>"

    def is_usable(self) -> bool:
        """False if the server closed it (EOF seen) or it is closing: never reuse those."""
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self._read_deadline.cancel()
        self.writer.close()

    # httptools callbacks -------------------------------------------------------------------
    def on_status(self, reason: bytes) -> None:
        self._reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # interim response (100 Continue, 103 Early Hints): skip it
            self._headers = []
            return
        self._status = status
        self._headers_done = True
        if self._head_only:
            self._complete = True
            self._keep_alive = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        assert self._parser is not None
        if self._headers_done and not self._complete:
            self._complete = True
            self._keep_alive = self._parser.should_keep_alive()

    # exchange ------------------------------------------------------------------------------
    async def send(self, head: bytes, body: bytes, *, head_only: bool) -> None:
        """Write one request; the caller then reads the head with :meth:`read_head`."""
        self.exchanges += 1
        self._parser = httptools.HttpResponseParser(self)
        self._status, self._reason, self._headers, self._chunks = 0, "", [], []
        self._headers_done = self._complete = self._keep_alive = False
        self._head_only = head_only
        writer = self.writer
        try:
            if body and len(body) < 16384:
                writer.write(head + body)
            else:
                writer.write(head)
                if body:
                    writer.write(body)
            # drain() (two coroutines) only when the kernel did not take it all: a broken
            # connection is then seen by read_head(), which the forwarder retries like any reset.
            if writer.transport.get_write_buffer_size() > DRAIN_ABOVE:
                await writer.drain()
        except OSError as exc:
            raise UpstreamError(
                "reset", f"upstream connection failed while sending: {exc}"
            ) from exc

    async def read_head(self, deadline: float) -> tuple[int, str, list[tuple[str, str]]]:
        """Read until the response head is complete; the body is read by :meth:`iter_body`."""
        got_bytes = False
        while not self._headers_done:
            data = await self._read(deadline, "waiting for the response head", got_bytes)
            if not data:
                raise UpstreamError(
                    "reset",
                    "upstream closed the connection before responding",
                    response_started=got_bytes,
                )
            got_bytes = True
            self._feed(data, got_bytes)
        return self._status, self._reason, self._headers

    def _close_delimited(self) -> bool:
        names = {name for name, _ in self._headers}
        return "content-length" not in names and "transfer-encoding" not in names

    def _feed(self, data: bytes, started: bool) -> None:
        assert self._parser is not None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise UpstreamError(
                "protocol", f"malformed response from upstream: {exc}", response_started=started
            ) from exc

    async def _read(self, deadline: float, during: str, started: bool) -> bytes:
        """Read what has arrived, or fail at ``deadline`` (``time.monotonic()`` seconds).

        A timer that aborts the connection is cheaper than ``asyncio.timeout`` on every read
        (no task cancellation, no extra loop look-ups), and a timed-out connection is
        discarded anyway. The timer is lazy (:class:`~sidecar.timers.LazyDeadline`), not one
        armed and cancelled around every read (every body chunk of a stream).
        """
        if deadline <= time.monotonic():
            raise UpstreamError("timeout", f"upstream timed out {during}", response_started=started)
        self._read_deadline.start(deadline)
        try:
            data = await self.reader.read(READ_SIZE)
        except OSError as exc:
            if self._expired:
                data = b""
            else:
                raise UpstreamError(
                    "reset",
                    f"upstream connection failed {during}: {exc}",
                    response_started=started,
                ) from exc
        finally:
            self._read_deadline.stop()
        if self._expired:
            raise UpstreamError("timeout", f"upstream timed out {during}", response_started=started)
        return data

    def _expire(self) -> None:
        self._expired = True
        self.writer.transport.abort()


Release = Callable[[UpstreamConnection, bool], None]


class BodyStream:
    """The response body as an async iterator of bytes, read as it arrives.

    The connection is released exactly once: back to the pool when the body was read to the
    end and keep-alive holds, closed otherwise (error, or :meth:`aclose` before the end). A
    class rather than an async generator so that ``aclose()`` frees the connection even when
    iteration never started.
    """

    __slots__ = ("_conn", "_idle_s", "_total_deadline", "_release", "watchers", "done")

    def __init__(
        self, conn: UpstreamConnection, idle_s: float, total_deadline: float, release: Release
    ) -> None:
        self._conn = conn
        self._idle_s = idle_s
        self._total_deadline = total_deadline
        self._release = release
        self.watchers = BodyWatchers()  # see Response.watch: policies observe without wrapping
        self.done = False
        if conn._complete and not conn._chunks:
            self._finish(conn._keep_alive, completed=True)

    def __aiter__(self) -> BodyStream:
        return self

    async def __anext__(self) -> bytes:
        if self.done:
            raise StopAsyncIteration
        conn = self._conn
        try:
            while True:
                chunks = conn._chunks
                if chunks:
                    conn._chunks = []
                    data = b"".join(chunks) if len(chunks) > 1 else chunks[0]
                    for tap in self.watchers.taps:
                        tap(data)
                    if conn._complete:
                        self._finish(conn._keep_alive, completed=True)
                    return data
                if conn._complete:
                    self._finish(conn._keep_alive, completed=True)
                    raise StopAsyncIteration
                deadline = min(time.monotonic() + self._idle_s, self._total_deadline)
                data = await conn._read(deadline, "between body chunks", True)
                if not data:
                    if conn._close_delimited():
                        conn._complete, conn._keep_alive = True, False
                        continue
                    raise UpstreamError(
                        "reset", "upstream closed the connection mid-body", response_started=True
                    )
                conn._feed(data, True)
        except StopAsyncIteration:
            raise
        except BaseException:
            if not self.done:
                self._finish(False, completed=False)
            raise

    async def aclose(self) -> None:
        if not self.done:
            self._finish(False, completed=False)

    def _finish(self, reusable: bool, *, completed: bool) -> None:
        self.done = True
        self._release(self._conn, reusable)
        self.watchers.end(completed)

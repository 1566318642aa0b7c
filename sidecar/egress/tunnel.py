"""A bidirectional byte pipe between a client and an upstream, on asyncio streams.

Each direction copies chunk by chunk and awaits ``drain()`` after every write, so a slow reader
on one side stops the reads on the other (backpressure): memory per tunnel stays bounded by the
stream buffers whatever the volume. An EOF in one direction is passed on as a half-close
(``write_eof``) while the other direction goes on. A tunnel with no byte moving either way for
``idle_s`` is closed, and so is one whose side resets; both sides are always closed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib

CHUNK = 256 * 1024


class Pipe:
    """Copies bytes both ways until both directions end, one side fails, or it goes idle."""

    def __init__(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        idle_s: float,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.idle_s = idle_s
        self.bytes_in = 0  # client -> upstream
        self.bytes_out = 0  # upstream -> client
        self.reason = "closed"  # closed | idle | reset | cancelled
        self._last = 0.0

    def __repr__(self) -> str:
        return f"<Pipe in={self.bytes_in} out={self.bytes_out} {self.reason}>"

    async def run(self, leftover: bytes = b"") -> str:
        """Pipe until done; returns why it ended. Closes both sides whatever happens."""
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        client_reader, client_writer = self.client
        upstream_reader, upstream_writer = self.upstream
        tasks = [
            asyncio.create_task(self._copy(client_reader, upstream_writer, True, leftover)),
            asyncio.create_task(self._copy(upstream_reader, client_writer, False, b"")),
        ]
        try:
            pending: set[asyncio.Task[None]] = set(tasks)
            while pending:
                remaining = self._last + self.idle_s - loop.time()
                if remaining <= 0:
                    self.reason = "idle"
                    break
                _, pending = await asyncio.wait(pending, timeout=remaining)
        except asyncio.CancelledError:
            self.reason = "cancelled"
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in (client_writer, upstream_writer):
                writer.close()
        return self.reason

    async def _copy(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        inbound: bool,
        first: bytes,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            data = first
            while True:
                if data:
                    if inbound:
                        self.bytes_in += len(data)
                    else:
                        self.bytes_out += len(data)
                    self._last = loop.time()
                    writer.write(data)
                    await writer.drain()
                    self._last = loop.time()
                data = await reader.read(CHUNK)
                if not data:
                    break
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()  # half-close: the other direction may still be talking
        except (ConnectionError, OSError):
            self.reason = "reset"
            for side in (self.client[1], self.upstream[1]):
                with contextlib.suppress(Exception):
                    side.transport.abort()

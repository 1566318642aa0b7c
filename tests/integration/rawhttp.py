"""A tiny raw-socket HTTP/1.1 client for conformance tests (exact bytes in, exact bytes out)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httptools


@dataclass
class RawResponse:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False


class _Collector:
    def __init__(self) -> None:
        self.messages: list[RawResponse] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.messages.append(RawResponse())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.messages[-1].headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self.messages[-1].status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.messages[-1].body += body

    def on_message_complete(self) -> None:
        self.messages[-1].complete = True


async def read_responses(
    reader: asyncio.StreamReader, count: int, timeout: float = 5
) -> list[RawResponse]:
    """Read ``count`` complete responses (fewer if the server closes first)."""
    collector = _Collector()
    async with asyncio.timeout(timeout):
        while sum(m.complete for m in collector.messages) < count:
            data = await reader.read(65536)
            if not data:
                break
            collector.parser.feed_data(data)
    return collector.messages


async def exchange(host: str, port: int, raw: bytes, count: int = 1) -> list[RawResponse]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        await writer.drain()
        return await read_responses(reader, count)
    finally:
        writer.close()

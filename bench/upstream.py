"""A fast fixed-response LLM upstream for the benchmark: raw asyncio protocol + httptools.

Why not ``sidecar fake-upstream``: it is an aiohttp app (~20k req/s on a core) with per-request
control headers, so at 64 connections it would cap what nginx can show and its own latency
would blur the proxies' overhead. This one answers a canned chat completion from a
``asyncio.Protocol`` with no per-request allocation beyond the parser callbacks (~40k+ req/s
on one core under uvloop), so the proxy under test stays the bottleneck.

It speaks the fake upstream's streaming interface: a request body with ``"stream": true``
gets an SSE response of ``x-fake-chunks`` events (default 100), ``x-fake-chunk-interval-ms``
apart, one HTTP chunk per event. Each event carries ``"t"``, the server's CLOCK_MONOTONIC in
nanoseconds when the event was written, which is system-wide on Linux, so a client in another
process can compute each chunk's delivery delay.

Run: ``python bench/upstream.py --port 8000``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import cast

import httptools

_BODY = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,'
    b'"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"Hello! How can I help you today?"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}'
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    b"x-request-id: req_bench\r\nopenai-processing-ms: 1\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_EVENT = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"content":"tok%d "}}],"t":%d}\n\n'
)
_DONE = b"data: [DONE]\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class UpstreamProtocol(asyncio.Protocol):
    """One connection: parse requests, answer each at once (or stream it)."""

    def __init__(self, streams: set[asyncio.Task[None]]) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.streams = streams
        self.stream_request = False
        self.chunks = 100
        self.interval_ms = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.stream_request = False
        self.chunks = 100
        self.interval_ms = 0.0

    def on_header(self, name: bytes, value: bytes) -> None:
        if name[:7].lower() == b"x-fake-":
            key = name.lower()
            if key == b"x-fake-chunks":
                self.chunks = int(value)
            elif key == b"x-fake-chunk-interval-ms":
                self.interval_ms = float(value)

    def on_body(self, body: bytes) -> None:
        if b'"stream": true' in body or b'"stream":true' in body:
            self.stream_request = True

    def on_message_complete(self) -> None:
        transport = self.transport
        assert transport is not None
        if self.stream_request:
            task = asyncio.get_running_loop().create_task(
                self._stream(transport, self.chunks, self.interval_ms)
            )
            self.streams.add(task)
            task.add_done_callback(self.streams.discard)
        else:
            transport.write(RESPONSE)
        if not self.parser.should_keep_alive():
            transport.close()

    async def _stream(self, transport: asyncio.Transport, chunks: int, interval_ms: float) -> None:
        """Write ``chunks`` events on a fixed schedule (no drift), then [DONE]."""
        loop = asyncio.get_running_loop()
        interval = interval_ms / 1000
        start = loop.time()
        clock = time.monotonic_ns
        transport.write(SSE_HEAD + _chunk(_EVENT % (0, clock())))
        for i in range(1, chunks):
            if interval:
                delay = start + i * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            if transport.is_closing():
                return
            transport.write(_chunk(_EVENT % (i, clock())))
        if interval:  # [DONE] is paced too, so no two events ever leave together
            await asyncio.sleep(max(0.0, start + chunks * interval - loop.time()))
        if not transport.is_closing():
            transport.write(_chunk(_DONE) + b"0\r\n\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    streams: set[asyncio.Task[None]] = set()
    server = await loop.create_server(
        lambda: UpstreamProtocol(streams), host, port, reuse_address=True, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            runner.run(serve(args.host, args.port))
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

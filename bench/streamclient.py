"""SSE load client for the benchmark: raw asyncio protocol + httptools, one JSON line out.

Each event of ``bench/upstream.py`` carries the server's CLOCK_MONOTONIC at write time, so the
client measures every chunk's delivery delay (arrival - written) across processes. Per chunk
it also checks the framing: one HTTP chunk should hold exactly one SSE event, as the upstream
wrote it (``boundaries_ok``).

Modes:
  latency  sequential streams at concurrency 1: TTFB of short streams, then per-chunk delay and
           pacing of long streams;
  open     N streams open at once (ramped in batches), for RSS/CPU of the proxy under test.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any, cast

import httptools
import orjson

BODY = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}],'
    b'"max_tokens":16,"stream": true}'
)


def request_bytes(host: str, port: int, path: str, chunks: int, interval_ms: float) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer sk-bench\r\nx-fake-chunks: {chunks}\r\n"
        f"x-fake-chunk-interval-ms: {interval_ms}\r\ncontent-length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY


class StreamProtocol(asyncio.Protocol):
    """One streaming request; records arrival time and delay of every event."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.now = 0
        self.sent = 0
        self.head_at = 0
        self.status = 0
        self.current: list[bytes] = []
        self.arrivals: list[int] = []
        self.delays: list[int] = []
        self.split = 0
        self.merged = 0
        self.done_event = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.sent = time.monotonic_ns()
        self.transport.write(self.payload)

    def data_received(self, data: bytes) -> None:
        self.now = time.monotonic_ns()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("closed before the end of the stream"))

    def _fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def on_headers_complete(self) -> None:
        self.head_at = self.now
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.current.append(body)

    def on_chunk_complete(self) -> None:
        chunk = b"".join(self.current)
        self.current = []
        if not chunk:
            return
        if not chunk.endswith(b"\n\n"):
            self.split += 1  # an event cut across chunks: framing the client did not get
        elif chunk.count(b"\n\n") > 1:
            self.merged += 1  # events that left the upstream apart, delivered together
        for event in chunk.split(b"\n\n"):
            if not event:
                continue
            if event == b"data: [DONE]":
                self.done_event = True
                continue
            at = event.rfind(b'"t":')
            if at < 0:
                continue
            written = int(event[at + 4 : event.index(b"}", at)])
            self.arrivals.append(self.now)
            self.delays.append(self.now - written)

    def on_message_complete(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        self.transport.close()


async def one_stream(host: str, port: int, payload: bytes, limit_s: float) -> StreamProtocol:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: StreamProtocol(payload), host, port)
    try:
        async with asyncio.timeout(limit_s):
            await proto.done
    finally:
        proto.transport.close()
    return proto


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def _summary_us(values_ns: list[int]) -> dict[str, float]:
    us = [v / 1000 for v in values_ns]
    return {
        "n": len(us),
        "p50": round(_pct(us, 50), 1),
        "p90": round(_pct(us, 90), 1),
        "p99": round(_pct(us, 99), 1),
        "mean": round(statistics.fmean(us), 1) if us else float("nan"),
    }


async def latency_mode(args: argparse.Namespace) -> dict[str, Any]:
    short = request_bytes(args.host, args.port, args.path, 2, 0)
    ttfb: list[int] = []
    for _ in range(args.ttfb_requests):
        proto = await one_stream(args.host, args.port, short, 10)
        ttfb.append(proto.arrivals[0] - proto.sent)
    payload = request_bytes(args.host, args.port, args.path, args.chunks, args.interval_ms)
    delays: list[int] = []
    jitter: list[int] = []
    events = split = merged = 0
    complete = 0
    for _ in range(args.streams):
        proto = await one_stream(args.host, args.port, payload, 60)
        delays.extend(proto.delays)
        events += len(proto.delays)
        split += proto.split
        merged += proto.merged
        complete += proto.done_event and len(proto.delays) == args.chunks
        # Pacing kept: the gap between two arrivals equals the gap between their writes, i.e.
        # consecutive chunks see the same delay. (Timer jitter of the upstream cancels out.)
        d = proto.delays
        jitter.extend(abs(b - a) for a, b in zip(d, d[1:], strict=False))
    return {
        "mode": "latency",
        "ttfb_us": _summary_us(ttfb),
        "chunk_delay_us": _summary_us(delays),
        "pacing_jitter_us": _summary_us(jitter),
        "streams": args.streams,
        "streams_complete": complete,
        "events": events,
        "events_expected": args.streams * args.chunks,
        # Kept: every event arrived, none was cut, and at most 1 % were coalesced with the
        # next one (a proxy that stalls briefly reads two events at once and may send both).
        "boundaries_ok": split == 0
        and events == args.streams * args.chunks
        and merged <= events // 100,
        "split_chunks": split,
        "merged_chunks": merged,
    }


async def open_mode(args: argparse.Namespace) -> dict[str, Any]:
    payload = request_bytes(args.host, args.port, args.path, args.chunks, args.interval_ms)
    timeout = args.chunks * args.interval_ms / 1000 + 30
    results: list[StreamProtocol | BaseException] = []
    tasks: list[asyncio.Task[StreamProtocol]] = []
    started = time.monotonic()
    for i in range(0, args.streams, args.batch):
        batch = [
            asyncio.create_task(one_stream(args.host, args.port, payload, timeout))
            for _ in range(min(args.batch, args.streams - i))
        ]
        tasks.extend(batch)
        await asyncio.sleep(0.02)
    all_open = time.monotonic()
    results = list(await asyncio.gather(*tasks, return_exceptions=True))
    ok = [r for r in results if isinstance(r, StreamProtocol) and r.done_event]
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    first_done = min((r.arrivals[-1] for r in ok if r.arrivals), default=0) / 1e9
    delays = [d for r in ok for d in r.delays]
    return {
        "mode": "open",
        "streams": args.streams,
        "streams_complete": sum(len(r.delays) == args.chunks for r in ok),
        "errors": len(errors),
        "error_sample": errors[:3],
        "started": started,
        "all_open": all_open,
        "first_done": first_done,
        "ended": time.monotonic(),
        "chunk_delay_us": _summary_us(delays),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["latency", "open"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--chunks", type=int, default=100)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--ttfb-requests", type=int, default=300)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()
    import uvloop

    coro = latency_mode(args) if args.mode == "latency" else open_mode(args)
    result = uvloop.run(coro)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()

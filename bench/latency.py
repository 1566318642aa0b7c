"""Sequential latency: direct vs through the sidecar, and the fast-fail of an open breaker.

Runs 1,000 sequential requests (after a warm-up) over one keep-alive connection with a raw
httptools client, against: the fast upstream directly, the sidecar in front of it, and the
sidecar with its upstream's breaker forced open (fast-fail: 503 circuit_open, no upstream I/O).
Prints p50/p99 and the sidecar's added latency (p50/p99 of through-sidecar minus direct).

Run: ``python bench/latency.py [--requests 1000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httptools

BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Done:
    def __init__(self) -> None:
        self.complete = False
        self.status = 0

    def on_message_complete(self) -> None:
        self.complete = True


async def measure(port: int, path: str, count: int, expect: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    samples: list[float] = []
    for i in range(count + 100):
        done = _Done()
        parser = httptools.HttpResponseParser(done)
        started = time.perf_counter()
        writer.write(request)
        while not done.complete:
            data = await reader.read(65536)
            if not data:
                raise RuntimeError("connection closed")
            parser.feed_data(data)
        elapsed = time.perf_counter() - started
        if i >= 100 and parser.get_status_code() != expect:
            raise RuntimeError(f"unexpected status {parser.get_status_code()}")
        if i >= 100:  # warm-up excluded
            samples.append(elapsed)
    writer.close()
    return samples


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def wait_port(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


async def main(count: int) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    up_port, proxy, admin, dead = free_port(), free_port(), free_port(), free_port()
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "c.yaml")
        with open(config, "w") as f:
            f.write(
                f"listen: {{proxy: '127.0.0.1:{proxy}', admin: '127.0.0.1:{admin}'}}\n"
                "access_log: {enabled: false}\n"
                f"upstreams:\n  up: {{url: 'http://127.0.0.1:{up_port}'}}\n"
                f"  dead: {{url: 'http://127.0.0.1:{dead}', "
                "breaker: {failure_threshold: 1, reset_timeout_s: 3600}}\n"
                "routes:\n  - {path_prefix: /openai, upstreams: [up]}\n"
                "  - {path_prefix: /dead, upstreams: [dead]}\n"
            )
        try:
            procs.append(
                subprocess.Popen(
                    [
                        "taskset",
                        "-c",
                        "1",
                        sys.executable,
                        f"{here}/upstream.py",
                        "--port",
                        str(up_port),
                    ]
                )
            )
            procs.append(
                subprocess.Popen(
                    ["taskset", "-c", "0", sys.executable, "-m", "sidecar", "--config", config],
                    stdout=subprocess.DEVNULL,
                )
            )
            await wait_port(up_port)
            await wait_port(proxy)
            direct = await measure(up_port, "/v1/chat/completions", count, 200)
            through = await measure(proxy, "/openai/v1/chat/completions", count, 200)
            # One connect failure opens the dead upstream's breaker for an hour.
            await measure(proxy, "/dead/v1/chat/completions", 0, 502)
            fast_fail = await measure(proxy, "/dead/v1/chat/completions", count, 503)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=35)
    print(f"{'sequential, ' + str(count) + ' requests':<34} {'p50 ms':>8} {'p99 ms':>8}")
    for name, samples in (
        ("direct to upstream", direct),
        ("through sidecar", through),
        ("fast-fail, breaker open", fast_fail),
    ):
        print(f"{name:<34} {pct(samples, 0.5):8.3f} {pct(samples, 0.99):8.3f}")
    print(
        f"{'added by sidecar':<34} {pct(through, 0.5) - pct(direct, 0.5):8.3f} "
        f"{pct(through, 0.99) - pct(direct, 0.99):8.3f}"
    )
    print(
        f"mean direct {statistics.mean(direct) * 1000:.3f} ms, "
        f"through {statistics.mean(through) * 1000:.3f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(main(args.requests))

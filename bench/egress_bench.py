"""Measure transparent egress: CONNECT tunnel throughput, and per-request cost of interception.

    python bench/egress_bench.py            # ~1 minute on 2 cores
    python bench/egress_bench.py --quick    # a few seconds

Starts, all on loopback and stopped by PID at the end: a raw byte server (127.0.0.2), the fake
LLM upstream (127.0.0.1), and the sidecar (``python -m sidecar``, uvloop) configured with a
blind tunnel allowance for the byte server and interception of 127.0.0.1 with a CA made here.
With >= 2 cores the sidecar is pinned to core 0 and everything else to core 1.

1. Tunnel throughput: MB/s of a download and an upload of ``--mb`` MB, direct to the byte
   server vs through ``CONNECT`` (blind tunnel), in the same run; best of ``--repeat``.
2. Per-request latency, sequential keep-alive requests with httpx: direct to the fake, base-URL
   mode (``/openai`` prefix), ``HTTP_PROXY`` absolute-form, and ``HTTPS_PROXY`` with
   interception (TLS from the client to the sidecar, plain HTTP to the fake). The overhead of
   interception is reported against base-URL mode.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

BYTES_HOST = "127.0.0.2"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}


# the raw byte server (runs as a subprocess: `egress_bench.py --byte-server`) -----------------
async def _byte_server() -> None:
    """Per connection, one line: ``down N`` sends N bytes then closes; ``up N`` reads N bytes
    then answers ``ok``."""
    block = os.urandom(256 * 1024)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode, size = (await reader.readline()).split()
        left = int(size)
        if mode == b"down":
            while left > 0:
                writer.write(block[: min(left, len(block))])
                left -= len(block)
                await writer.drain()
        else:
            while left > 0:
                data = await reader.read(1 << 20)
                if not data:
                    break
                left -= len(data)
            writer.write(b"ok\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, BYTES_HOST, 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


# helpers ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pin(core: int) -> list[str]:
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(core)]
    return []


@contextlib.contextmanager
def _process(
    args: list[str], ready_line: bool = False
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline().strip() if ready_line and proc.stdout else ""
        yield proc, line
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def _open(via_proxy: int | None, port: int) -> socket.socket:
    """A socket to the byte server, direct or through a CONNECT tunnel on the sidecar."""
    if via_proxy is None:
        return socket.create_connection((BYTES_HOST, port))
    sock = socket.create_connection(("127.0.0.1", via_proxy))
    sock.sendall(f"CONNECT {BYTES_HOST}:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"CONNECT refused: {head!r}")
    return sock


def _transfer(via_proxy: int | None, port: int, mode: str, size: int) -> float:
    """MB/s of one download or upload of ``size`` bytes."""
    sock = _open(via_proxy, port)
    buf = bytearray(1 << 20)
    block = os.urandom(1 << 20)
    start = time.perf_counter()
    sock.sendall(f"{mode} {size}\n".encode())
    if mode == "down":
        got = 0
        while got < size:
            n = sock.recv_into(buf)
            if not n:
                raise RuntimeError("short download")
            got += n
    else:
        left = size
        while left > 0:
            sock.sendall(block[: min(left, len(block))])
            left -= len(block)
        assert sock.recv(16).startswith(b"ok")
    elapsed = time.perf_counter() - start
    sock.close()
    return size / elapsed / 1e6


def _latencies(client: httpx.Client, url: str, count: int, warm: bool = True) -> list[float]:
    for _ in range(50 if warm else 0):
        client.post(url, json=CHAT).raise_for_status()
    out = []
    for _ in range(count):
        start = time.perf_counter()
        client.post(url, json=CHAT).raise_for_status()
        out.append(time.perf_counter() - start)
    return out


def _summary(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.mean(values) * 1e3, statistics.median(values) * 1e3, p99 * 1e3


# main ------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="MB per transfer (default 256)")
    parser.add_argument("--repeat", type=int, default=3, help="transfers per case, best kept")
    parser.add_argument("--requests", type=int, default=2000, help="requests per mode")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--byte-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.byte_server:
        asyncio.run(_byte_server())
        return 0
    if args.quick:
        args.mb, args.repeat, args.requests = 16, 1, 100

    here = Path(__file__).resolve()
    sys.path.insert(0, str(here.parents[1]))  # this checkout's sidecar, also for `-m sidecar`
    os.chdir(here.parents[1])
    from sidecar.egress.ca import generate_ca

    with tempfile.TemporaryDirectory(prefix="egress-bench-") as tmp:
        ca_cert, ca_key = generate_ca(tmp)
        side = _pin(1)
        with (
            _process([*side, sys.executable, str(here), "--byte-server"], True) as (_, bytes_port),
            _process(
                [*side, sys.executable, "-m", "sidecar", "fake-upstream", "--port", "0"], True
            ) as (_, fake_url),
        ):
            fake_port = int(fake_url.rsplit(":", 1)[1])
            proxy_port, admin_port = _free_port(), _free_port()
            config = {
                "listen": {"proxy": f"127.0.0.1:{proxy_port}", "admin": f"127.0.0.1:{admin_port}"},
                "access_log": {"enabled": False},
                "reload": {"watch": False},
                "upstreams": {"fake": {"url": fake_url}},
                "routes": [
                    {"path_prefix": "/openai", "upstreams": ["fake"]},
                    {"host": "127.0.0.1", "upstreams": ["fake"]},
                ],
                "egress": {
                    "allow": [f"{BYTES_HOST}:*", "127.0.0.1:*"],
                    "allow_addresses": ["127.0.0.0/8"],
                },
                "intercept": {
                    "hosts": ["127.0.0.1"],
                    "ca_cert": str(ca_cert),
                    "ca_key": str(ca_key),
                },
            }
            config_path = Path(tmp, "sidecar.yaml")
            config_path.write_text(yaml.safe_dump(config))
            sidecar_cmd = [*_pin(0), sys.executable, "-m", "sidecar", "--config", str(config_path)]
            with _process([*sidecar_cmd, "--log-level", "warning"]):
                _wait_port(proxy_port)
                return _measure(args, int(bytes_port), fake_port, proxy_port, str(ca_cert))


def _measure(args: argparse.Namespace, bytes_port: int, fake_port: int, proxy: int, ca: str) -> int:
    """Cases alternate within each round, so load from other processes hits them alike."""
    size = args.mb * 1024 * 1024
    print(f"# tunnel throughput ({args.mb} MB per transfer, best of {args.repeat}), MB/s")
    print("| direction | direct | CONNECT tunnel | tunnel / direct |")
    print("|---|---|---|---|")
    for mode, label in (
        ("down", "download (upstream -> client)"),
        ("up", "upload (client -> upstream)"),
    ):
        direct, tunnel = 0.0, 0.0
        for _ in range(args.repeat):
            direct = max(direct, _transfer(None, bytes_port, mode, size))
            tunnel = max(tunnel, _transfer(proxy, bytes_port, mode, size))
        print(f"| {label} | {direct:.0f} | {tunnel:.0f} | {tunnel / direct:.0%} |")

    path = "/v1/chat/completions"
    proxy_url = f"http://127.0.0.1:{proxy}"
    verify = ssl.create_default_context(cafile=ca)
    modes = {
        "direct to the fake upstream": (
            httpx.Client(trust_env=False),
            f"http://127.0.0.1:{fake_port}{path}",
        ),
        "base URL (/openai prefix)": (httpx.Client(trust_env=False), f"{proxy_url}/openai{path}"),
        "HTTP_PROXY absolute-form": (
            httpx.Client(trust_env=False, proxy=proxy_url),
            f"http://127.0.0.1:{fake_port}{path}",
        ),
        "HTTPS_PROXY + interception": (
            httpx.Client(trust_env=False, proxy=proxy_url, verify=verify),
            f"https://127.0.0.1:{fake_port}{path}",
        ),
    }
    rounds = 10
    samples: dict[str, list[float]] = {label: [] for label in modes}
    for client, url in modes.values():
        _latencies(client, url, 0)  # warm-up: connections, leaf certificate, caches
    for _ in range(rounds):
        for label, (client, url) in modes.items():
            samples[label] += _latencies(client, url, args.requests // rounds, warm=False)
    for client, _ in modes.values():
        client.close()
    print(f"\n# per-request latency ({args.requests} sequential keep-alive POSTs per mode, ms)")
    print("| mode | mean | p50 | p99 | p50 overhead vs direct |")
    print("|---|---|---|---|---|")
    p50s: dict[str, float] = {}
    for label, values in samples.items():
        mean, p50, p99 = _summary(values)
        p50s[label] = p50
        base = p50s["direct to the fake upstream"]
        print(f"| {label} | {mean:.3f} | {p50:.3f} | {p99:.3f} | {p50 - base:+.3f} |")
    extra = p50s["HTTPS_PROXY + interception"] - p50s["base URL (/openai prefix)"]
    print(f"\ninterception vs base-URL mode: {extra:+.3f} ms per request (p50)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/instructions.py: callgrind counts a proxy's instructions per request, repeatably.

Runs the floor proxy (fast to start under callgrind) twice against the bench upstream: the
count must be plausible for a proxy (tens of thousands to a few million instructions per
request) and the same within 2 % both times, which is what lets the bench judge a policy's
cost to a few percent on a noisy machine.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"

pytestmark = pytest.mark.skipif(
    shutil.which("valgrind") is None or shutil.which("callgrind_control") is None,
    reason="needs valgrind (Debian package valgrind)",
)


def _wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"bench upstream not listening on {port}")


@pytest.mark.timeout(240)
def test_floor_proxy_instruction_count_is_repeatable() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import instructions
    finally:
        sys.path.remove(str(BENCH))
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(BENCH / "upstream.py"), "--port", str(upstream_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(upstream_port)
        counts = []
        for _ in range(2):
            port = free_port()
            argv = [sys.executable, str(BENCH / "floor_proxy.py"), str(port), str(upstream_port)]
            counts.append(instructions.count(argv, port, "/v1/chat/completions", 200, warmup=50))
    finally:
        upstream.terminate()
        upstream.wait(10)
    assert all(10_000 < c < 5_000_000 for c in counts), counts
    assert abs(counts[0] - counts[1]) / counts[0] < 0.02, counts

"""Instructions per request under callgrind: what each policy costs, repeatably.

CPU time per request on a shared VM moves by +-25 % between two runs of the same config, far
more than the 10 % a policy may cost. ``valgrind --tool=callgrind`` counts the instructions the
sidecar process executes instead: the same count for the same code and requests whatever else
the machine is doing (repeatable to about 0.1 % here). Each config's sidecar starts under
callgrind with instrumentation off, gets a warm-up, then ``callgrind_control -i on``, N
sequential requests over one keep-alive connection, ``-i off`` and a dump; the dump's total
divided by N is the cost of one request, start-up and warm-up excluded.

Instructions are not time (cache misses, syscalls' kernel side are not counted), so this is a
cost model of the proxy's own work, reported next to, not instead of, the wall-clock numbers.
"""

from __future__ import annotations

import http.client
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}],"max_tokens":16}'
HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-bench"}


def available() -> str | None:
    """None when callgrind can run here, else why not."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        return "valgrind not installed (apt-get install valgrind)"
    return None


def _requests(port: int, path: str, count: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for _ in range(count):
            conn.request("POST", path, BODY, HEADERS)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"bench request got {response.status}")
    finally:
        conn.close()


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    """Start-up under callgrind takes ~30 s (every import is instrumented code)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar under callgrind exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"sidecar under callgrind not ready on port {port} after {timeout} s")


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=60)


def count(
    argv: list[str],
    port: int,
    path: str,
    requests: int,
    warmup: int = 200,
    env: dict[str, str] | None = None,
) -> float:
    """Instructions per request of the sidecar started by ``argv`` (listening on ``port``)."""
    with tempfile.TemporaryDirectory(prefix="llm-sidecar-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
            + argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        try:
            _wait_ready(port, proc)
            _requests(port, path, warmup)
            _control("-i", "on", str(proc.pid))
            _requests(port, path, requests)
            _control("-i", "off", str(proc.pid))
            _control("-d", str(proc.pid))
            deadline = time.monotonic() + 30
            total = 0
            while not total and time.monotonic() < deadline:
                for dump in Path(tmp).glob("callgrind.out*"):
                    for line in dump.read_text(errors="replace").splitlines():
                        if line.startswith("totals:"):
                            total = max(total, int(line.split()[1]))
                if not total:
                    time.sleep(0.2)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not total:
            raise RuntimeError("callgrind wrote no totals")
        return total / requests


def policy_costs(
    configs: list[tuple[str, list[str], int]],
    path: str,
    requests: int,
    parallel: int = 2,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``configs``: (name, argv, port), the first being the baseline; counts run ``parallel``
    at a time (contention does not change an instruction count)."""
    with ThreadPoolExecutor(parallel) as pool:
        futures = {
            name: pool.submit(count, argv, port, path, requests, env=env)
            for name, argv, port in configs
        }
        per_request = {name: future.result() for name, future in futures.items()}
    base = per_request[configs[0][0]]
    return {
        "requests": requests,
        "instructions_per_request": {k: round(v) for k, v in per_request.items()},
        "cost_pct": {k: 100 * (v / base - 1) for k, v in per_request.items()},
    }

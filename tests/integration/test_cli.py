"""The command line, as a user runs it: real processes, real ports, real signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from sidecar.fakeupstream import FakeUpstream
from tests.conftest import free_port

CLI = [sys.executable, "-m", "sidecar"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=30)


def test_check_config_prints_a_summary(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "upstreams: {a: {url: 'http://127.0.0.1:1'}}\nroutes: [{path_prefix: /a, upstreams: [a]}]\n"
    )
    result = run("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout and "/a -> a" in result.stdout


def test_check_config_of_the_shipped_configs():
    for name in ("default.yaml", "example.yaml"):
        result = run("check-config", os.path.join("config", name))
        assert result.returncode == 0, result.stderr


def test_invalid_config_exits_non_zero_naming_the_key_before_listening(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("upstreams: {openai: {url: 'htp:/x'}}\n")
    result = run("check-config", str(path))
    assert result.returncode == 1
    assert "upstreams.openai.url: not a valid URL: 'htp:/x'" in result.stderr
    result = run("--config", str(path))
    assert result.returncode == 1
    assert "upstreams.openai.url" in result.stderr


async def _get(url: str, timeout: float = 10) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as response:
                    return response.status, await response.text()
            except aiohttp.ClientConnectionError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)


async def test_no_arguments_serves_the_embedded_default():
    if os.environ.get("LLM_SIDECAR_SKIP_DEFAULT_PORTS"):
        pytest.skip("ports 4000/9901 reserved on this machine")
    process = await asyncio.create_subprocess_exec(
        *CLI, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        status, _ = await _get("http://127.0.0.1:9901/readyz")
        assert status == 200
        # The default routes exist; an unknown path gets the sidecar's own 404.
        status, body = await _get("http://127.0.0.1:4000/nowhere")
        assert status == 404 and "no_route" in body
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0


async def test_sigterm_drains_an_in_flight_stream_then_exits_zero(tmp_path):
    fake = FakeUpstream()
    url = await fake.start()
    proxy, admin = free_port(), free_port()
    path = tmp_path / "c.yaml"
    path.write_text(
        f"listen: {{proxy: '127.0.0.1:{proxy}', admin: '127.0.0.1:{admin}'}}\n"
        f"shutdown_grace_s: 10\n"
        f"upstreams: {{fake: {{url: '{url}'}}}}\n"
        "routes: [{path_prefix: /openai, upstreams: [fake]}]\n"
    )
    process = await asyncio.create_subprocess_exec(
        *CLI, "--config", str(path), stdout=asyncio.subprocess.DEVNULL
    )
    try:
        await _get(f"http://127.0.0.1:{admin}/readyz")
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"http://127.0.0.1:{proxy}/openai/v1/chat/completions",
                json={"model": "m", "stream": True, "messages": []},
                headers={"x-fake-chunks": "10", "x-fake-chunk-interval-ms": "100"},
            ) as response:
                first = await response.content.readline()
                assert first.startswith(b"data:")
                process.send_signal(signal.SIGTERM)
                # Readiness flips to 503 while the stream keeps flowing to its end.
                deadline = time.monotonic() + 5
                while (await _get(f"http://127.0.0.1:{admin}/readyz"))[0] != 503:
                    assert time.monotonic() < deadline, "readiness never went 503"
                    await asyncio.sleep(0.02)
                rest = await response.read()
        assert rest.rstrip().endswith(b"data: [DONE]")
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await fake.stop()

"""Shared fixtures: a real fake upstream and a real sidecar, both on 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from sidecar.app import Sidecar
from sidecar.config.loader import load_text
from sidecar.fakeupstream import FakeUpstream

SidecarFactory = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


def base_config(upstream_url: str, **upstream_extra: Any) -> dict[str, Any]:
    return {
        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "shutdown_grace_s": 2,
        "access_log": {"enabled": False},
        "upstreams": {"fake": {"url": upstream_url, **upstream_extra}},
        "routes": [{"path_prefix": "/openai", "upstreams": ["fake"]}],
    }


@pytest.fixture
async def make_sidecar() -> AsyncIterator[SidecarFactory]:
    started: list[Sidecar] = []

    async def factory(config: dict[str, Any] | str, path: str | None = None) -> Sidecar:
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        sidecar = Sidecar(load_text(text), path, registry=CollectorRegistry())
        await sidecar.start()
        started.append(sidecar)
        return sidecar

    yield factory
    for sidecar in started:
        await sidecar.stop()


def proxy_url(sidecar: Sidecar) -> str:
    assert sidecar.proxy_address is not None
    host, port = sidecar.proxy_address
    return f"http://{host}:{port}"


def admin_url(sidecar: Sidecar) -> str:
    assert sidecar.admin_address is not None
    host, port = sidecar.admin_address
    return f"http://{host}:{port}"


async def wait_for(
    condition: Callable[[], bool], timeout: float = 5.0, message: str = "condition"
) -> None:
    """Poll ``condition`` until true or fail after ``timeout`` seconds (never a bare sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

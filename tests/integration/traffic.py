"""A sidecar with several upstreams, and traffic of every kind through it (observability tests).

``start_rig`` runs a sidecar from a config file (so reloads work) in front of three fake
upstreams (an OpenAI-shaped primary and backup, an Anthropic-shaped one) and a dead address.
``every_kind_of_traffic`` sends what the metrics must describe: JSON and streamed calls on both
APIs, embeddings, a non-LLM path, 4xx, 429, a breaker opening with fallbacks and fail-fast
rejections, a connect error, no route, a client leaving mid-stream, limit refusals, and a good
and a bad reload.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sidecar.app import Sidecar
from sidecar.fakeupstream import FakeUpstream
from tests.conftest import SidecarFactory, admin_url, free_port, proxy_url, wait_for

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}
MESSAGE = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hello"}],
}


@dataclass
class Rig:
    sidecar: Sidecar
    primary: FakeUpstream
    backup: FakeUpstream
    claude: FakeUpstream
    config: dict[str, Any]
    config_path: Path

    @property
    def proxy(self) -> str:
        return proxy_url(self.sidecar)

    @property
    def admin(self) -> str:
        return admin_url(self.sidecar)


def rig_config(primary: str, backup: str, claude: str, reset_timeout_s: float) -> dict[str, Any]:
    breaker = {"failure_threshold": 3, "reset_timeout_s": reset_timeout_s}
    return {
        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "shutdown_grace_s": 1,
        "access_log": {"enabled": False},
        "reload": {"watch": False},
        "upstreams": {
            "primary": {"url": primary, "breaker": breaker},
            "backup": {"url": backup, "breaker": breaker},
            "claude": {"url": claude, "api": "anthropic"},
            "dead": {
                "url": f"http://127.0.0.1:{free_port()}",
                "timeouts": {"connect_s": 1},
                "breaker": {"failure_threshold": 100},
            },
        },
        "routes": [
            {
                "name": "openai",
                "path_prefix": "/openai",
                "upstreams": ["primary", "backup"],
                "retry": {"attempts": 1},
            },
            {"name": "anthropic", "path_prefix": "/anthropic", "upstreams": ["claude"]},
            {"name": "dead", "path_prefix": "/dead", "upstreams": ["dead"]},
            {
                "name": "limited",
                "path_prefix": "/limited",
                "upstreams": ["backup"],
                "limits": {"requests": {"per_min": 2}},
            },
        ],
        "prices": {"gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}},
    }


async def start_rig(
    make_sidecar: SidecarFactory,
    tmp_path: Path,
    *,
    reset_timeout_s: float = 60.0,
    extra: dict[str, Any] | None = None,
) -> Rig:
    fakes = [FakeUpstream() for _ in range(3)]
    urls = [await fake.start() for fake in fakes]
    config = rig_config(*urls, reset_timeout_s=reset_timeout_s)
    config.update(extra or {})
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    sidecar = await make_sidecar(config, str(path))
    return Rig(sidecar, *fakes, config, path)


async def stop_rig(rig: Rig) -> None:
    for fake in (rig.primary, rig.backup, rig.claude):
        await fake.stop()


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    **headers: str,
) -> tuple[int, bytes]:
    async with session.request(method, url, json=body, headers=headers) as response:
        return response.status, await response.read()


async def open_breaker(rig: Rig, session: aiohttp.ClientSession) -> None:
    """Make the primary fail until its breaker opens; requests fall back to the backup."""
    rig.primary.settings.error_rate, rig.primary.settings.error_status = 1.0, 503
    url = rig.proxy + "/openai/v1/chat/completions"
    for _ in range(3):
        status, _ = await call(session, "POST", url, CHAT, **{"x-tenant-id": "team-a"})
        assert status == 200  # fell back to the backup
    breaker = rig.sidecar.snapshot.upstreams["primary"].breaker
    assert breaker.state.name == "OPEN", breaker


async def every_kind_of_traffic(rig: Rig) -> None:
    openai = rig.proxy + "/openai/v1"
    tenant = {"x-tenant-id": "team-a", "authorization": "Bearer sk-test-secret-0123456789"}
    async with aiohttp.ClientSession() as s:
        assert (await call(s, "POST", openai + "/chat/completions", CHAT, **tenant))[0] == 200
        stream = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        status, body = await call(s, "POST", openai + "/chat/completions", stream, **tenant)
        assert status == 200 and b"[DONE]" in body
        embed = {"model": "text-embedding-3-small", "input": "hi"}
        assert (await call(s, "POST", openai + "/embeddings", embed))[0] == 200
        assert (await call(s, "GET", openai + "/models"))[0] == 200
        anthropic = rig.proxy + "/anthropic/v1/messages"
        assert (await call(s, "POST", anthropic, MESSAGE))[0] == 200
        status, body = await call(s, "POST", anthropic, {**MESSAGE, "stream": True})
        assert status == 200 and b"message_stop" in body
        assert (await call(s, "POST", anthropic, MESSAGE, **{"x-fake-status": "400"}))[0] == 400
        assert (await call(s, "POST", anthropic, MESSAGE, **{"x-fake-status": "429"}))[0] == 429
        assert (await call(s, "POST", anthropic, MESSAGE, **{"x-fake-status": "500"}))[0] == 500
        assert (await call(s, "POST", rig.proxy + "/dead/v1/chat/completions", CHAT))[0] == 502
        assert (await call(s, "GET", rig.proxy + "/nowhere"))[0] == 404
        for _ in range(4):  # a 2/min limit: the last ones are refused (once limits are wired)
            await call(s, "POST", rig.proxy + "/limited/v1/chat/completions", CHAT)
        await open_breaker(rig, s)
        status, _ = await call(s, "POST", openai + "/chat/completions", CHAT)
        assert status == 200  # fail fast on primary, served by the backup
        await client_leaves_mid_stream(rig, s)
        assert (await call(s, "POST", rig.admin + "/reload"))[0] == 200
        good = rig.config_path.read_text()
        rig.config_path.write_text(good + "\nthis is: [not valid\n")
        assert (await call(s, "POST", rig.admin + "/reload"))[0] == 400
        rig.config_path.write_text(good)


async def client_leaves_mid_stream(rig: Rig, session: aiohttp.ClientSession) -> None:
    gone_before = rig.backup.closed_by_peer[:]
    slow = {"x-fake-chunks": "100", "x-fake-chunk-interval-ms": "50"}
    url = rig.proxy + "/openai/v1/chat/completions"
    async with session.post(url, json={**CHAT, "stream": True}, headers=slow) as response:
        assert response.status == 200
        await response.content.readany()
        response.close()
    await wait_for(
        lambda: len(rig.backup.closed_by_peer) > len(gone_before),
        timeout=10,
        message="the upstream stream to be closed",
    )


def require_tool(name: str) -> str:
    """Path of a Debian tool the test needs: fail under CI (CI=true) when missing, else skip."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} not on PATH (.ci/apt-packages.txt)")
        pytest.skip(f"{name} not on PATH")
    return path

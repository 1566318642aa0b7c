"""Hot reload from a kubelet-style ConfigMap volume, without harming a request."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from sidecar.fakeupstream import FakeUpstream
from tests.conftest import SidecarFactory, admin_url, free_port, proxy_url, wait_for


class ConfigMapDir:
    """Reproduces kubelet's atomic writer: timestamped data dirs, a ``..data`` symlink swapped
    by rename, and the visible file a symlink through ``..data``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0

    @property
    def path(self) -> Path:
        return self.root / "config.yaml"

    def write(self, text: str) -> None:
        self.version += 1
        data_dir = self.root / f"..2026_12_03_10_00_00.{self.version:09d}"
        data_dir.mkdir()
        (data_dir / "config.yaml").write_text(text)
        tmp_link = self.root / "..data_tmp"
        tmp_link.symlink_to(data_dir.name)
        os.rename(tmp_link, self.root / "..data")  # atomic swap, as kubelet does
        if not self.path.is_symlink():
            self.path.symlink_to("..data/config.yaml")


def config_text(*urls: str, route_to: str = "a", extra: dict[str, Any] | None = None) -> str:
    config: dict[str, Any] = {
        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "shutdown_grace_s": 2,
        "access_log": {"enabled": False},
        "reload": {"poll_interval_s": 0.1, "debounce_s": 0.05},
        "upstreams": {name: {"url": url} for name, url in zip("abc", urls, strict=False)},
        "routes": [{"path_prefix": "/openai", "upstreams": [route_to]}],
    }
    for key, value in (extra or {}).items():
        config[key] = value
    return yaml.safe_dump(config)


@pytest.fixture
async def two_fakes():
    a, b = FakeUpstream(), FakeUpstream()
    await a.start()
    await b.start()
    yield a, b
    await a.stop()
    await b.stop()


async def _start(make_sidecar: SidecarFactory, cm: ConfigMapDir):
    return await make_sidecar(cm.path.read_text(), str(cm.path))


async def test_kubelet_swap_applies_new_route_while_old_stream_completes(
    make_sidecar, two_fakes, tmp_path
):
    a, b = two_fakes
    cm = ConfigMapDir(tmp_path)
    cm.write(config_text(a.url, b.url, route_to="a"))
    sidecar = await _start(make_sidecar, cm)
    url = proxy_url(sidecar) + "/openai/v1/chat/completions"
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url,
            json=body,
            headers={"x-fake-chunks": "15", "x-fake-chunk-interval-ms": "60"},
        ) as stream:
            assert stream.headers["x-llm-sidecar-upstream"] == "a"
            await stream.content.readline()
            swapped = time.monotonic()
            cm.write(config_text(a.url, b.url, route_to="b"))
            served_by = ""
            while served_by != "b":
                async with session.post(url, json={"model": "m", "messages": []}) as response:
                    served_by = response.headers["x-llm-sidecar-upstream"]
                assert time.monotonic() - swapped < 3, "new config not applied in time"
            applied_after = time.monotonic() - swapped
            rest = await stream.read()
    assert rest.rstrip().endswith(b"data: [DONE]")  # the old stream finished on upstream a
    assert rest.count(b"data: {") >= 13
    assert applied_after < 0.1 + 0.05 + 1.0  # poll interval + debounce + margin
    print(f"swap-to-first-new-request: {applied_after * 1000:.0f} ms")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("routes: [ {", "invalid YAML"),
        ("colour: blue\n", "colour: unknown key"),
        (
            "upstreams: {a: {url: 'http://x', headers: {k: '${SIDECAR_TEST_UNSET}'}}}\n",
            "upstreams.a.headers.k: environment variable SIDECAR_TEST_UNSET is not set",
        ),
    ],
)
async def test_invalid_file_is_rejected_and_old_config_keeps_serving(
    make_sidecar, two_fakes, tmp_path, bad, message
):
    a, b = two_fakes
    cm = ConfigMapDir(tmp_path)
    cm.write(config_text(a.url, b.url))
    sidecar = await _start(make_sidecar, cm)
    old_hash = sidecar.snapshot.loaded.text_hash
    cm.write(bad)
    await wait_for(lambda: sidecar.last_error is not None, message="reload rejected")
    assert message in sidecar.last_error["message"]
    assert sidecar.snapshot.loaded.text_hash == old_hash
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy_url(sidecar) + "/openai/v1/chat/completions", json={}) as r:
            assert r.status == 200
        async with session.get(admin_url(sidecar) + "/config") as r:
            report = await r.json()
        async with session.get(admin_url(sidecar) + "/metrics") as r:
            metrics = await r.text()
    assert message in report["last_error"]["message"] and report["last_error"]["at"] > 0
    assert report["hash"] == old_hash
    assert 'llm_sidecar_config_reloads_total{result="error"} 1.0' in metrics
    assert f'llm_sidecar_config_info{{hash="{old_hash}"}} 1.0' in metrics


async def test_admin_reload_reports_changes_and_redacts_secrets(make_sidecar, fake, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(config_text(fake.url))
    sidecar = await make_sidecar(path.read_text(), str(path))
    text = yaml.safe_load(config_text(fake.url))
    text["upstreams"]["a"]["headers"] = {"authorization": "Bearer sk-secret"}
    text["upstreams"]["c"] = {"url": fake.url}
    text["listen"]["proxy"] = "127.0.0.1:1"
    path.write_text(yaml.safe_dump(text))
    async with aiohttp.ClientSession() as session:
        async with session.post(admin_url(sidecar) + "/reload") as r:
            result = await r.json()
        async with session.get(admin_url(sidecar) + "/config") as r:
            report = await r.json()
    assert result["ok"] and result["changes"] == {
        "upstreams_added": ["c"],
        "upstreams_modified": ["a"],
    }
    assert result["restart_required"] == ["listen.proxy"]
    assert "sk-secret" not in orjson.dumps(report).decode()
    assert report["config"]["upstreams"]["a"]["headers"]["authorization"] == "<redacted>"
    assert report["source"] == str(path)


async def test_unchanged_upstream_keeps_its_breaker_and_pool_across_reload(
    make_sidecar, fake, tmp_path
):
    path = tmp_path / "c.yaml"
    extra = {"upstreams": {"a": {"url": fake.url, "breaker": {"failure_threshold": 1}}}}
    path.write_text(config_text(fake.url, extra=extra))
    sidecar = await make_sidecar(path.read_text(), str(path))
    url = proxy_url(sidecar) + "/openai/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json={}, headers={"x-fake-status": "500"}) as r:
            assert r.status == 500
        before = sidecar.snapshot.upstreams["a"]
        assert before.breaker.state.name == "OPEN"
        # A route change elsewhere: upstream "a" is untouched and must keep its open breaker.
        changed = yaml.safe_load(config_text(fake.url, extra=extra))
        changed["routes"].append({"path_prefix": "/other", "upstreams": ["a"]})
        path.write_text(yaml.safe_dump(changed))
        assert (await sidecar.reload())["ok"]
        assert sidecar.snapshot.upstreams["a"] is before
        async with session.post(url, json={}) as r:
            assert r.headers["x-llm-sidecar-error"] == "circuit_open"


async def test_hammer_reloads_under_traffic_drop_nothing(make_sidecar, two_fakes, tmp_path):
    a, b = two_fakes
    cm = ConfigMapDir(tmp_path)
    versions = [
        config_text(a.url, b.url, route_to="a"),
        config_text(a.url, route_to="a", extra={"shutdown_grace_s": 3}),  # b removed
    ]
    cm.write(versions[0])
    sidecar = await _start(make_sidecar, cm)
    url = proxy_url(sidecar) + "/openai/v1/chat/completions"
    failures: list[str] = []
    done = 0

    async def client(n: int) -> None:
        nonlocal done
        async with aiohttp.ClientSession() as session:
            for _ in range(n):
                try:
                    async with session.post(url, json={"model": "m", "messages": []}) as r:
                        await r.read()
                        if r.status != 200:
                            failures.append(f"status {r.status}")
                except aiohttp.ClientError as exc:
                    failures.append(repr(exc))
                done += 1

    async def swapper() -> None:
        for i in range(20):
            cm.write(versions[(i + 1) % 2])
            await sidecar.reload()
            await asyncio.sleep(0.02)

    await asyncio.gather(*(client(100) for _ in range(20)), swapper())
    assert done == 2000
    assert failures == []
    assert sidecar.metrics.reloads.labels("success")._value.get() >= 20


@pytest.mark.skipif(sys.platform != "linux", reason="signals")
async def test_sighup_reloads_a_running_process(tmp_path, fake):
    proxy, admin = free_port(), free_port()
    path = tmp_path / "c.yaml"
    text = yaml.safe_load(config_text(fake.url))
    text["listen"] = {"proxy": f"127.0.0.1:{proxy}", "admin": f"127.0.0.1:{admin}"}
    text["reload"] = {"watch": False}
    path.write_text(yaml.safe_dump(text))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "--config", str(path), stdout=asyncio.subprocess.DEVNULL
    )
    try:
        async with aiohttp.ClientSession() as session:

            async def config_hash() -> str | None:
                try:
                    async with session.get(f"http://127.0.0.1:{admin}/config") as r:
                        return str((await r.json())["hash"])
                except aiohttp.ClientConnectionError:
                    return None

            deadline = time.monotonic() + 10
            while (first := await config_hash()) is None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            text["shutdown_grace_s"] = 7
            path.write_text(yaml.safe_dump(text))
            process.send_signal(signal.SIGHUP)
            while (await config_hash()) == first:
                assert time.monotonic() < deadline, "SIGHUP did not reload"
                await asyncio.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 10)

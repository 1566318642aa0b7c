"""TLS towards the upstream: SNI, certificate verification, a custom CA bundle, reuse."""

from __future__ import annotations

import ssl

import aiohttp
import pytest
import trustme

from sidecar.fakeupstream import FakeUpstream
from tests.conftest import SidecarFactory, base_config, proxy_url


@pytest.fixture
async def tls_fake(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    upstream = FakeUpstream()
    url = await upstream.start(ssl_context=context)
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    port = url.rsplit(":", 1)[1]
    yield upstream, f"https://localhost:{port}", str(ca_path)
    await upstream.stop()


async def test_tls_upstream_with_custom_ca_and_pooled_reuse(make_sidecar: SidecarFactory, tls_fake):
    upstream, url, ca_path = tls_fake
    sidecar = await make_sidecar(base_config(url, tls={"ca_bundle": ca_path}))
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            async with session.post(proxy_url(sidecar) + "/openai/echo", data=b"x") as response:
                assert response.status == 200
                echoed = await response.json()
    assert echoed["headers"]["host"] == url.removeprefix("https://")
    assert sidecar.snapshot.upstreams["fake"].pool.opened == 1
    assert upstream.requests_seen == 20


async def test_untrusted_upstream_certificate_is_refused(make_sidecar: SidecarFactory, tls_fake):
    upstream, url, _ = tls_fake
    sidecar = await make_sidecar(base_config(url))  # system CAs do not trust the test CA
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy_url(sidecar) + "/openai/echo") as response:
            assert response.status == 502
            assert response.headers["x-llm-sidecar-error"] == "upstream_connect"
            assert "CERTIFICATE_VERIFY_FAILED" in (await response.json())["error"]["message"]
    assert upstream.requests_seen == 0

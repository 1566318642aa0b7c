"""Transparent egress end to end: HTTP_PROXY, HTTPS_PROXY tunnels, interception, egress policy.

Every test runs on loopback only. Names such as ``api.openai.test`` are resolved by a static
test resolver injected into the sidecar, and a guard makes any real DNS lookup in the test
process fail loudly, so a client that ignored its proxy could never reach the network.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import trustme
import yaml
from prometheus_client import CollectorRegistry

from sidecar.app import Sidecar
from sidecar.config.loader import load_text
from sidecar.egress.ca import generate_ca
from sidecar.fakeupstream import FakeUpstream
from sidecar.upstream.resolver import Resolver
from tests.conftest import proxy_url, wait_for
from tests.integration.rawhttp import exchange, read_responses

HOST = "api.openai.test"
PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


class StaticResolver(Resolver):
    """Answers from a fixed map (IP literals as themselves); never asks real DNS."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        super().__init__()
        self.names = names
        self.lookups: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            pass
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: unknown to the test resolver")
        return list(self.names[host])


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any lookup of a real name, and start from an environment without proxy settings."""
    real = socket.getaddrinfo

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and name != "localhost":
            try:
                ip = ipaddress.ip_address(name)
            except ValueError:
                raise AssertionError(f"real DNS lookup of {name!r} attempted") from None
            assert ip.is_loopback, f"connection to non-loopback {name} attempted"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    for name in PROXY_ENV:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def upstream_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_fake(upstream_ca: trustme.CA) -> AsyncIterator[tuple[FakeUpstream, int]]:
    """The fake provider over real TLS, with a certificate for api.openai.test."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    upstream_ca.issue_cert(HOST, "127.0.0.1").configure_cert(context)
    fake = FakeUpstream()
    url = await fake.start(ssl_context=context)
    yield fake, int(url.rsplit(":", 1)[1])
    await fake.stop()


@pytest.fixture
def upstream_ca_file(upstream_ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "upstream-ca.pem"
    upstream_ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def sidecar_ca(tmp_path: Path) -> tuple[str, str]:
    cert, key = generate_ca(tmp_path / "sidecar-ca")
    return str(cert), str(key)


StartSidecar = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def start_sidecar() -> AsyncIterator[StartSidecar]:
    started: list[Sidecar] = []

    async def start(config: dict[str, Any], names: dict[str, list[str]] | None = None) -> Sidecar:
        resolver = StaticResolver(names if names is not None else {HOST: ["127.0.0.1"]})
        loaded = load_text(yaml.safe_dump(config))
        sidecar = Sidecar(loaded, registry=CollectorRegistry(), resolver=resolver)
        await sidecar.start()
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        await sidecar.stop()


def egress_config(port: int, ca_file: str, **extra: Any) -> dict[str, Any]:
    """A route for api.openai.test (host) to the TLS fake, and an allow entry for its port."""
    config: dict[str, Any] = {
        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "shutdown_grace_s": 1,
        "access_log": {"enabled": False},
        "upstreams": {
            "openai": {
                "url": f"https://{HOST}:{port}",
                "tls": {"ca_bundle": ca_file},
                "headers": {"authorization": "Bearer real-key"},
            }
        },
        "routes": [{"host": HOST, "upstreams": ["openai"]}],
        "egress": {"allow": [f"{HOST}:{port}"], "allow_addresses": ["127.0.0.1/32"]},
    }
    config.update(extra)
    return config


def proxy_only_config(*allow: str, **egress: Any) -> dict[str, Any]:
    """No upstreams, no routes: only what egress.allow lets through (to 127.0.0.1 only)."""
    return {
        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "shutdown_grace_s": 1,
        "access_log": {"enabled": False},
        "egress": {"allow": list(allow), "allow_addresses": ["127.0.0.1/32"], **egress},
    }


def sample(sidecar: Sidecar, name: str, **labels: str) -> float:
    return sidecar.metrics.registry.get_sample_value(name, labels) or 0.0


async def connect(sidecar: Sidecar, authority: str) -> tuple[int, bytes, Any, Any]:
    """Send CONNECT; return (status, response head+body, reader, writer)."""
    host, port = sidecar.proxy_address  # type: ignore[misc]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        head += await asyncio.wait_for(reader.read(-1), 5)
    return status, head, reader, writer


def body_of(raw: bytes) -> dict[str, Any]:
    return orjson.loads(raw.split(b"\r\n\r\n", 1)[1])  # type: ignore[no-any-return]


# HTTPS_PROXY, blind --------------------------------------------------------------------------
async def test_openai_sdk_and_httpx_through_https_proxy_blind_tunnel(
    start_sidecar, tls_fake, upstream_ca_file, monkeypatch
):
    fake, port = tls_fake
    sidecar = await start_sidecar(egress_config(port, upstream_ca_file))
    monkeypatch.setenv("HTTPS_PROXY", proxy_url(sidecar))
    monkeypatch.setenv("SSL_CERT_FILE", upstream_ca_file)  # the app trusts the provider's CA
    base_url = f"https://{HOST}:{port}/v1"  # the provider's own URL: no sidecar address in it

    client = openai.AsyncOpenAI(api_key="sk-app", base_url=base_url, max_retries=0)
    async with client:
        completion = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert completion.choices[0].message.content
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{base_url}/echo", headers={"authorization": "Bearer sk-app"})
    assert response.status_code == 200
    echoed = response.json()
    # Blind: the sidecar saw only bytes, so it could not inject the key or add headers.
    assert echoed["headers"]["authorization"] == "Bearer sk-app"
    assert "x-request-id" not in response.headers
    assert fake.requests_seen == 2
    await wait_for(lambda: not sidecar.egress.tunnels.active, message="tunnels closed")
    assert sample(sidecar, "llm_sidecar_tunnels_total", host=HOST, mode="blind") == 2
    assert sample(sidecar, "llm_sidecar_tunnels_active", host=HOST) == 0
    assert sample(sidecar, "llm_sidecar_tunnel_bytes_total", host=HOST, direction="in") > 500
    assert sample(sidecar, "llm_sidecar_tunnel_bytes_total", host=HOST, direction="out") > 500
    assert (
        sample(sidecar, "llm_sidecar_requests_total", route=HOST, upstream="openai", code="200")
        == 0
    )


# HTTPS_PROXY, interception -------------------------------------------------------------------
async def test_interception_applies_the_sidecar_policies(
    start_sidecar, tls_fake, upstream_ca_file, sidecar_ca, monkeypatch
):
    fake, port = tls_fake
    ca_cert, ca_key = sidecar_ca
    config = egress_config(
        port, upstream_ca_file, intercept={"hosts": [HOST], "ca_cert": ca_cert, "ca_key": ca_key}
    )
    config["upstreams"]["openai"]["breaker"] = {"failure_threshold": 2, "reset_timeout_s": 60}
    sidecar = await start_sidecar(config)
    monkeypatch.setenv("HTTPS_PROXY", proxy_url(sidecar))
    monkeypatch.setenv("SSL_CERT_FILE", ca_cert)  # the app trusts the sidecar's CA, not the fake's
    base_url = f"https://{HOST}:{port}/v1"

    client = openai.AsyncOpenAI(api_key="sk-app", base_url=base_url, max_retries=0)
    async with client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-request-id"]  # added by the sidecar: it saw the request
        assert raw.parse().choices[0].message.content
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        pieces = [chunk async for chunk in stream]
        assert len(pieces) > 2
        # Upstream 5xx twice: the upstream's breaker opens and the sidecar answers itself.
        for _ in range(2):
            with pytest.raises(openai.InternalServerError):
                await client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": "hi"}],
                    extra_headers={"x-fake-status": "500"},
                )
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
    assert refused.value.status_code == 503
    assert refused.value.response.headers["x-llm-sidecar-error"] == "circuit_open"
    assert fake.requests_seen == 4  # the refused request never left the sidecar
    # The upstream's configured key replaced the app's: the sidecar decrypted and re-sent it.
    assert fake.recorded[0].headers["authorization"] == "Bearer real-key"
    ok = sample(sidecar, "llm_sidecar_requests_total", route=HOST, upstream="openai", code="200")
    assert ok == 2
    assert sample(sidecar, "llm_sidecar_tunnels_total", host=HOST, mode="intercept") >= 1


async def test_interception_certificate_is_verified_by_the_client(
    start_sidecar, tls_fake, upstream_ca_file, sidecar_ca
):
    _, port = tls_fake
    ca_cert, ca_key = sidecar_ca
    intercept = {"hosts": [HOST], "ca_cert": ca_cert, "ca_key": ca_key}
    sidecar = await start_sidecar(egress_config(port, upstream_ca_file, intercept=intercept))
    url = f"https://{HOST}:{port}/v1/echo"
    trusting = ssl.create_default_context(cafile=ca_cert)
    async with httpx.AsyncClient(proxy=proxy_url(sidecar), verify=trusting) as http:
        response = await http.get(url)
    assert response.status_code == 200
    assert response.json()["headers"]["authorization"] == "Bearer real-key"
    # A client that trusts only the provider's CA refuses the sidecar's certificate.
    untrusting = ssl.create_default_context(cafile=upstream_ca_file)
    async with httpx.AsyncClient(proxy=proxy_url(sidecar), verify=untrusting) as http:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await http.get(url)


# HTTP_PROXY, absolute-form -------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_http_proxy_is_routed_by_host_with_tls_origination(
    start_sidecar, tls_fake, upstream_ca_file
):
    fake, port = tls_fake
    sidecar = await start_sidecar(egress_config(port, upstream_ca_file))
    env = {k: v for k, v in os.environ.items() if k.lower() not in {n.lower() for n in PROXY_ENV}}
    process = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--max-time",
        "20",
        "-x",
        proxy_url(sidecar),
        "-H",
        "authorization: Bearer sk-app",
        "-i",
        f"http://{HOST}/v1/echo?a=1",  # plain HTTP from the app, port 80
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"x-request-id" in head.lower()
    echoed = orjson.loads(body)
    assert echoed["raw_path"] == "/v1/echo?a=1"
    assert echoed["headers"]["host"] == f"{HOST}:{port}"  # originated as TLS to the upstream
    assert echoed["headers"]["authorization"] == "Bearer real-key"
    assert fake.requests_seen == 1
    ok = sample(sidecar, "llm_sidecar_requests_total", route=HOST, upstream="openai", code="200")
    assert ok == 1


async def test_allowed_host_without_route_is_forwarded_as_is(make_plain_fake, start_sidecar):
    fake, port = make_plain_fake
    sidecar = await start_sidecar(proxy_only_config(f"127.0.0.1:{port}", "127.0.0.2:*"))
    host, proxy_port = sidecar.proxy_address
    raw = f"GET http://127.0.0.1:{port}/v1/echo?x=1 HTTP/1.1\r\nHost: ignored\r\n\r\n".encode()
    (response,) = await exchange(host, proxy_port, raw)
    assert response.status == 200
    echoed = orjson.loads(response.body)
    assert echoed["raw_path"] == "/v1/echo?x=1"
    assert echoed["headers"]["host"] == f"127.0.0.1:{port}"
    ok = sample(
        sidecar,
        "llm_sidecar_requests_total",
        route="egress",
        upstream=f"egress:127.0.0.1:{port}",
        code="200",
    )
    assert ok == 1
    # Allowed by name, but a loopback address outside allow_addresses: refused.
    raw = f"GET http://127.0.0.2:{port}/v1/echo HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    (response,) = await exchange(host, proxy_port, raw)
    assert response.status == 403
    assert response.headers["x-llm-sidecar-error"] == "egress_denied"
    assert "loopback" in orjson.loads(response.body)["error"]["message"]
    assert fake.requests_seen == 1


@pytest.fixture
async def make_plain_fake() -> AsyncIterator[tuple[FakeUpstream, int]]:
    fake = FakeUpstream()
    url = await fake.start()
    yield fake, int(url.rsplit(":", 1)[1])
    await fake.stop()


async def test_dns_rebinding_between_check_and_connect_is_refused(make_plain_fake, start_sidecar):
    fake, port = make_plain_fake
    sidecar = await start_sidecar(proxy_only_config("rebind.test:*"), {})
    answers = iter([["127.0.0.1"], ["127.0.0.9"]])  # checked answer, then the rebound one
    resolver = sidecar.resolver
    assert isinstance(resolver, StaticResolver)

    async def rebinding(host: str, port: int) -> list[str]:
        return next(answers)

    resolver.resolve = rebinding  # type: ignore[method-assign]
    host, proxy_port = sidecar.proxy_address
    raw = f"GET http://rebind.test:{port}/v1/echo HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    (response,) = await exchange(host, proxy_port, raw)
    assert response.status == 502
    assert "127.0.0.9" in orjson.loads(response.body)["error"]["message"]
    assert fake.requests_seen == 0
    assert sample(sidecar, "llm_sidecar_egress_refused_total", reason="private_address") == 1


# Egress policy -------------------------------------------------------------------------------
async def test_hosts_not_allowed_get_403_for_connect_and_absolute_form(
    start_sidecar, tls_fake, upstream_ca_file
):
    _, port = tls_fake
    sidecar = await start_sidecar(egress_config(port, upstream_ca_file))
    for authority in ("evil.test:443", f"{HOST}:22", f"{HOST.upper()}.:{port + 1}"):
        status, raw, _, writer = await connect(sidecar, authority)
        writer.close()
        assert status == 403, authority
        assert b"x-llm-sidecar-error: egress_denied" in raw
        assert body_of(raw)["error"]["code"] == "egress_denied"
    host, proxy_port = sidecar.proxy_address
    raw_request = b"POST http://evil.test/v1/chat/completions HTTP/1.1\r\nHost: evil.test\r\nContent-Length: 2\r\n\r\n{}"
    (response,) = await exchange(host, proxy_port, raw_request)
    assert response.status == 403
    assert response.headers["x-llm-sidecar-error"] == "egress_denied"
    assert sample(sidecar, "llm_sidecar_egress_refused_total", reason="host_not_allowed") == 4
    assert "evil.test" not in sidecar.resolver.lookups  # type: ignore[attr-defined]


async def test_private_address_targets_are_refused(start_sidecar, tls_fake, upstream_ca_file):
    _, port = tls_fake
    config = egress_config(port, upstream_ca_file)
    config["egress"]["allow"] += ["127.0.0.2:*", "metadata.test", "[::1]:*"]
    names = {HOST: ["127.0.0.1"], "metadata.test": ["169.254.169.254"]}
    sidecar = await start_sidecar(config, names)
    cases = [
        (f"127.0.0.2:{port}", "loopback"),
        ("metadata.test:80", "cloud metadata"),
        (f"[::1]:{port}", "loopback"),
    ]
    for authority, why in cases:
        status, raw, _, writer = await connect(sidecar, authority)
        writer.close()
        assert status == 403, authority
        assert why in body_of(raw)["error"]["message"]
    host, proxy_port = sidecar.proxy_address
    raw_request = (
        b"GET http://metadata.test/latest/meta-data/ HTTP/1.1\r\nHost: metadata.test\r\n\r\n"
    )
    (response,) = await exchange(host, proxy_port, raw_request)
    assert response.status == 403
    assert "169.254.169.254" in orjson.loads(response.body)["error"]["message"]


@pytest.mark.parametrize(
    "line",
    [
        b"CONNECT api.openai.test HTTP/1.1",  # no port
        b"CONNECT api.openai.test:99999 HTTP/1.1",
        b"CONNECT :443 HTTP/1.1",
        b"CONNECT /v1/chat HTTP/1.1",
        b"CONNECT ::1:443 HTTP/1.1",  # unbracketed IPv6
        b"CONNECT ap%69.openai.test:443 HTTP/1.1",
        b"CONNECT api.openai.test:443:1 HTTP/1.1",
        b"CONNECT  HTTP/1.1",
    ],
)
async def test_malformed_connect_gets_400(start_sidecar, tls_fake, upstream_ca_file, line):
    _, port = tls_fake
    sidecar = await start_sidecar(egress_config(port, upstream_ca_file))
    host, proxy_port = sidecar.proxy_address
    (response,) = await exchange(host, proxy_port, line + b"\r\nHost: x\r\n\r\n")
    assert response.status == 400
    assert response.headers["x-llm-sidecar-error"] == "bad_request"
    assert sidecar.egress.tunnels.active == {}


# Tunnel mechanics ----------------------------------------------------------------------------
@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[..., Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Callable[[Any, Any], Awaitable[None]]) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()


def tunnel_config(port: int, **egress: Any) -> dict[str, Any]:
    return proxy_only_config(f"raw.test:{port}", **egress)


async def test_silent_tunnel_is_closed_by_the_idle_timeout(start_sidecar, raw_server):
    upstream_closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the sidecar closes its side
        upstream_closed.set()
        writer.close()

    port = await raw_server(silent)
    sidecar = await start_sidecar(
        tunnel_config(port, tunnel_idle_s=0.3), {"raw.test": ["127.0.0.1"]}
    )
    status, _, reader, writer = await connect(sidecar, f"raw.test:{port}")
    assert status == 200
    assert sidecar.egress.tunnels.active == {"raw.test": 1}
    assert await asyncio.wait_for(reader.read(), 10) == b""  # the sidecar hung up
    await asyncio.wait_for(upstream_closed.wait(), 10)
    await wait_for(lambda: not sidecar.egress.tunnels.active, message="tunnel freed")
    assert sample(sidecar, "llm_sidecar_tunnels_active", host="raw.test") == 0
    assert sample(sidecar, "llm_sidecar_tunnel_duration_seconds_count", host="raw.test") == 1
    writer.close()


async def test_half_close_is_passed_on_and_the_other_direction_continues(start_sidecar, raw_server):
    async def upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's half-close arrives
        writer.write(data.upper())
        await writer.drain()
        writer.close()

    port = await raw_server(upper)
    sidecar = await start_sidecar(tunnel_config(port), {"raw.test": ["127.0.0.1"]})
    status, _, reader, writer = await connect(sidecar, f"raw.test:{port}")
    assert status == 200
    writer.write(b"hello through the tunnel")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"HELLO THROUGH THE TUNNEL"
    writer.close()
    await wait_for(lambda: not sidecar.egress.tunnels.active, message="tunnel freed")
    assert sample(sidecar, "llm_sidecar_tunnel_bytes_total", host="raw.test", direction="in") == 24


async def test_tunnel_limit_per_host_and_breaker_on_connect_failures(start_sidecar, raw_server):
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    port = await raw_server(hold)
    closed_port = socket.socket()
    closed_port.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    dead = closed_port.getsockname()[1]
    config = tunnel_config(port, max_tunnels_per_host=1)
    config["egress"]["allow"].append(f"dead.test:{dead}")
    names = {"raw.test": ["127.0.0.1"], "dead.test": ["127.0.0.1"]}
    sidecar = await start_sidecar(config, names)
    status, _, _, first = await connect(sidecar, f"raw.test:{port}")
    assert status == 200
    status, raw, _, second = await connect(sidecar, f"raw.test:{port}")
    assert status == 429 and b"tunnel_limit" in raw
    first.close()
    second.close()
    await wait_for(lambda: not sidecar.egress.tunnels.active, message="tunnel freed")
    # Five refused connects (the default threshold) open dead.test's breaker.
    for _ in range(5):
        status, raw, _, writer = await connect(sidecar, f"dead.test:{dead}")
        writer.close()
        assert status == 502 and b"upstream_connect" in raw
    status, raw, _, writer = await connect(sidecar, f"dead.test:{dead}")
    writer.close()
    closed_port.close()
    assert status == 503 and b"circuit_open" in raw and b"retry-after" in raw.lower()


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_50_mb_both_ways_keeps_memory_bounded(start_sidecar, raw_server):
    total = 50 * 1024 * 1024
    block = os.urandom(256 * 1024)

    async def slow_reader(reader: asyncio.StreamReader, limit: int) -> int:
        got = 0
        while chunk := await reader.read(256 * 1024):
            got += len(chunk)
            await asyncio.sleep(0.001)  # a consumer slower than the producer: backpressure
        return got

    async def produce(writer: asyncio.StreamWriter) -> None:
        for _ in range(total // len(block)):
            writer.write(block)
            await writer.drain()
        writer.write_eof()

    server_got: list[int] = []

    async def bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received, _ = await asyncio.gather(slow_reader(reader, total), produce(writer))
        server_got.append(received)
        writer.close()

    port = await raw_server(bulk)
    sidecar = await start_sidecar(tunnel_config(port), {"raw.test": ["127.0.0.1"]})
    status, _, reader, writer = await connect(sidecar, f"raw.test:{port}")
    assert status == 200
    baseline = peak = _rss()
    done = asyncio.Event()

    async def sample_rss() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample_rss())
    received, _ = await asyncio.wait_for(
        asyncio.gather(slow_reader(reader, total), produce(writer)), 50
    )
    done.set()
    await sampler
    writer.close()
    assert received == total
    await wait_for(lambda: bool(server_got), message="server done")
    assert server_got == [total]
    assert peak - baseline < 30 * 1024 * 1024, f"RSS grew by {(peak - baseline) >> 20} MB"
    await wait_for(lambda: not sidecar.egress.tunnels.active, message="tunnel freed")
    assert (
        sample(sidecar, "llm_sidecar_tunnel_bytes_total", host="raw.test", direction="out") == total
    )


async def test_absolute_form_keeps_the_connection_for_more_requests(start_sidecar, make_plain_fake):
    fake, port = make_plain_fake
    sidecar = await start_sidecar(proxy_only_config(f"127.0.0.1:{port}"))
    host, proxy_port = sidecar.proxy_address
    reader, writer = await asyncio.open_connection(host, proxy_port)
    for i in range(3):
        writer.write(f"GET http://127.0.0.1:{port}/echo/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        (response,) = await read_responses(reader, 1)
        assert orjson.loads(response.body)["path"] == f"/echo/{i}"
    writer.close()
    assert fake.requests_seen == 3


async def test_drain_closes_an_idle_intercepted_connection_at_once(
    start_sidecar, tls_fake, upstream_ca_file, sidecar_ca
):
    _, port = tls_fake
    ca_cert, ca_key = sidecar_ca
    intercept = {"hosts": [HOST], "ca_cert": ca_cert, "ca_key": ca_key}
    config = egress_config(port, upstream_ca_file, intercept=intercept, shutdown_grace_s=10)
    sidecar = await start_sidecar(config)
    verify = ssl.create_default_context(cafile=ca_cert)
    async with httpx.AsyncClient(proxy=proxy_url(sidecar), verify=verify) as http:
        response = await http.get(f"https://{HOST}:{port}/v1/echo")
        assert response.status_code == 200
        assert sidecar.egress.tunnels.active == {HOST: 1}  # kept alive, idle
        loop = asyncio.get_running_loop()
        started = loop.time()
        await sidecar.listener.drain(10)
        assert loop.time() - started < 3  # not held for the whole grace period
    assert sidecar.egress.tunnels.active == {}


async def test_forwarded_hosts_get_tenant_limits_and_reloads_change_the_policy(
    start_sidecar, make_plain_fake
):
    fake, port = make_plain_fake
    config = proxy_only_config(f"127.0.0.1:{port}")
    config["tenants"] = {"default": {"limits": {"requests": {"per_min": 1}}}}
    sidecar = await start_sidecar(config)
    host, proxy_port = sidecar.proxy_address
    raw = f"GET http://127.0.0.1:{port}/v1/echo HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    (first,) = await exchange(host, proxy_port, raw)
    (second,) = await exchange(host, proxy_port, raw)
    assert (first.status, second.status) == (200, 429)
    assert second.headers["x-llm-sidecar-error"] == "rate_limited"
    # A reload that drops the allow entry denies the host from the next request on.
    sidecar.apply(load_text(yaml.safe_dump(proxy_only_config())))
    (third,) = await exchange(host, proxy_port, raw)
    assert third.status == 403
    assert fake.requests_seen == 1

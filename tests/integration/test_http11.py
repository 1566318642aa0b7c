"""HTTP/1.1 conformance of the proxy listener, over raw sockets."""

from __future__ import annotations

import asyncio

import orjson

from sidecar.fakeupstream import FakeUpstream
from tests.conftest import SidecarFactory, base_config, wait_for
from tests.integration.rawhttp import exchange, read_responses


async def _sidecar(make_sidecar: SidecarFactory, fake: FakeUpstream, **http: object):
    config = base_config(fake.url)
    if http:
        config["http"] = http
    sidecar = await make_sidecar(config)
    assert sidecar.proxy_address is not None
    return sidecar.proxy_address


async def test_keep_alive_reuses_the_client_connection(make_sidecar, fake):
    host, port = await _sidecar(make_sidecar, fake)
    reader, writer = await asyncio.open_connection(host, port)
    for i in range(3):
        writer.write(f"GET /openai/echo/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        (response,) = await read_responses(reader, 1)
        assert response.status == 200
        assert orjson.loads(response.body)["path"] == f"/echo/{i}"
    writer.close()


async def test_pipelined_requests_are_answered_in_order(make_sidecar, fake):
    host, port = await _sidecar(make_sidecar, fake)
    raw = b"".join(
        f"GET /openai/echo/{i} HTTP/1.1\r\nHost: x\r\nx-fake-latency-ms: {30 - i * 10}\r\n\r\n".encode()
        for i in range(3)
    )
    responses = await exchange(host, port, raw, count=3)
    assert [orjson.loads(r.body)["path"] for r in responses] == ["/echo/0", "/echo/1", "/echo/2"]


async def test_chunked_request_body_is_reframed_with_content_length(make_sidecar, fake):
    host, port = await _sidecar(make_sidecar, fake)
    raw = (
        b"POST /openai/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    (response,) = await exchange(host, port, raw)
    echoed = orjson.loads(response.body)
    assert echoed["body_length"] == 11
    assert echoed["headers"]["content-length"] == "11"
    assert "transfer-encoding" not in echoed["headers"]


async def test_expect_100_continue_gets_an_interim_response(make_sidecar, fake):
    host, port = await _sidecar(make_sidecar, fake)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /openai/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"data")
    (response,) = await read_responses(reader, 1)
    assert orjson.loads(response.body)["body_length"] == 4
    assert "expect" not in orjson.loads(response.body)["headers"]
    writer.close()


async def test_head_204_and_304_have_no_body_and_keep_the_connection(make_sidecar, fake):
    host, port = await _sidecar(make_sidecar, fake)
    reader, writer = await asyncio.open_connection(host, port)
    for method, path, status in [
        ("HEAD", "/openai/status/200", 200),
        ("GET", "/openai/status/204", 204),
        ("GET", "/openai/status/304", 304),
        ("GET", "/openai/echo", 200),  # the connection is still in sync afterwards
    ]:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        if method == "HEAD":
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            assert head.startswith(b"HTTP/1.1 200")
            continue
        (response,) = await read_responses(reader, 1)
        assert response.status == status
        if status != 200:
            assert response.body == b""
    writer.close()


async def test_oversized_head_gets_431(make_sidecar, fake):
    host, port = await _sidecar(make_sidecar, fake, max_header_bytes=2048)
    raw = b"GET /openai/echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n"
    (response,) = await exchange(host, port, raw)
    assert response.status == 431
    assert response.headers["x-llm-sidecar-error"] == "headers_too_large"


async def test_too_many_headers_get_431(make_sidecar, fake):
    host, port = await _sidecar(make_sidecar, fake, max_headers=10)
    fields = "".join(f"X-H{i}: v\r\n" for i in range(20))
    raw = f"GET /openai/echo HTTP/1.1\r\nHost: x\r\n{fields}\r\n".encode()
    (response,) = await exchange(host, port, raw)
    assert response.status == 431


async def test_oversized_body_gets_413_by_length_and_by_chunks(make_sidecar, fake):
    host, port = await _sidecar(make_sidecar, fake, max_request_body_bytes=1000)
    raw = b"POST /openai/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
    (response,) = await exchange(host, port, raw)
    assert response.status == 413
    error = orjson.loads(response.body)["error"]
    assert error["code"] == "body_too_large" and "1000" in error["message"]
    chunk = b"a" * 600
    raw = (
        b"POST /openai/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"258\r\n"
        + chunk
        + b"\r\n"
        + b"258\r\n"
        + chunk
        + b"\r\n0\r\n\r\n"
    )
    (response,) = await exchange(host, port, raw)
    assert response.status == 413
    assert fake.requests_seen == 0


async def test_smuggling_with_both_content_length_and_chunked_is_rejected(make_sidecar, fake):
    host, port = await _sidecar(make_sidecar, fake)
    raw = (
        b"POST /openai/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /openai/echo HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    responses = await exchange(host, port, raw, count=2)
    assert responses[0].status == 400
    assert len(responses) == 1  # the smuggled request never reaches the upstream
    assert fake.requests_seen == 0


async def test_malformed_request_line_gets_400(make_sidecar, fake):
    host, port = await _sidecar(make_sidecar, fake)
    (response,) = await exchange(host, port, b"GARBAGE\r\n\r\n")
    assert response.status == 400
    assert response.headers["x-llm-sidecar-error"] == "bad_request"


async def test_http10_client_gets_a_close_delimited_response(make_sidecar, fake):
    host, port = await _sidecar(make_sidecar, fake)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /openai/echo HTTP/1.0\r\n\r\n")
    data = await asyncio.wait_for(reader.read(-1), 5)  # server closes after the body
    assert data.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_idle_pooled_connection_closed_by_the_upstream_is_not_reused(make_sidecar):
    # The upstream closes each connection after its response: the sidecar sees the EOF while
    # the connection is idle and opens a fresh one for the next request.
    accepted = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sidecar = await make_sidecar(base_config(f"http://127.0.0.1:{port}"))
    host, proxy_port = sidecar.proxy_address
    pool = sidecar.snapshot.upstreams["fake"].pool
    for _ in range(3):
        (response,) = await exchange(host, proxy_port, b"GET /openai/x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert response.status == 200 and response.body == b"ok"
        await wait_for(
            lambda: all(not c.is_usable() for c in pool._idle), message="upstream close seen"
        )
    assert accepted == 3
    server.close()


async def test_pooled_connection_dying_on_reuse_is_retried_on_a_fresh_one(make_sidecar):
    # The upstream keeps the connection open after the first response, then closes it
    # without answering when the next request arrives: the reused connection fails before any
    # response byte, so the sidecar must resend on a fresh connection, invisibly to the client.
    accepted = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the reuse: hang up without a response
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sidecar = await make_sidecar(base_config(f"http://127.0.0.1:{port}"))
    host, proxy_port = sidecar.proxy_address
    for _ in range(3):
        (response,) = await exchange(host, proxy_port, b"GET /openai/x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert response.status == 200 and response.body == b"ok"
    # Request 1 opened a connection; requests 2 and 3 each found it dead and opened another.
    assert accepted == 3
    assert sidecar.snapshot.upstreams["fake"].pool.opened == 3
    server.close()


async def test_an_idle_client_connection_is_closed_but_a_busy_or_active_one_is_not(
    make_sidecar, fake
):
    host, port = await _sidecar(make_sidecar, fake, client_idle_s=0.4)
    reader, writer = await asyncio.open_connection(host, port)
    loop = asyncio.get_running_loop()
    # Active: requests 0.15 s apart keep the connection open well past client_idle_s.
    started = loop.time()
    for i in range(6):
        writer.write(f"GET /openai/echo/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        (response,) = await read_responses(reader, 1)
        assert response.status == 200
        await asyncio.sleep(0.15)
    assert loop.time() - started > 0.8
    # Busy: a request that takes longer than client_idle_s is answered, not cut.
    writer.write(b"GET /openai/echo/slow HTTP/1.1\r\nHost: x\r\nx-fake-latency-ms: 700\r\n\r\n")
    (response,) = await read_responses(reader, 1)
    assert response.status == 200
    # Idle: then the sidecar closes it, about client_idle_s after the last response.
    idle_from = loop.time()
    assert await asyncio.wait_for(reader.read(1), 3) == b""
    assert 0.3 < loop.time() - idle_from < 1.5
    writer.close()

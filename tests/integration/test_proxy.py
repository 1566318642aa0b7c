"""End to end through the sidecar: headers, bodies, pooling, streaming, timeouts, disconnects."""

from __future__ import annotations

import asyncio
import gzip
import time

import aiohttp
import openai
import orjson
import pytest

from sidecar.fakeupstream import FakeUpstream
from tests.conftest import SidecarFactory, base_config, proxy_url, wait_for


@pytest.fixture
async def sidecar(make_sidecar: SidecarFactory, fake: FakeUpstream):
    config = base_config(fake.url, headers={"authorization": "Bearer real-key"})
    return await make_sidecar(config)


async def test_request_is_forwarded_with_prefix_stripped_and_headers_rewritten(sidecar, fake):
    async with aiohttp.ClientSession() as session:
        async with session.post(
            proxy_url(sidecar) + "/openai/v1/echo?a=1&b=2",
            data=b"payload",
            headers={
                "authorization": "Bearer placeholder",
                "connection": "keep-alive, x-drop-me",
                "x-drop-me": "1",
                "keep-alive": "timeout=5",
                "x-custom": "kept",
            },
        ) as response:
            echoed = await response.json()
            request_id = response.headers["x-request-id"]
    assert echoed["path"] == "/v1/echo"
    assert echoed["query"] == "a=1&b=2"
    headers = echoed["headers"]
    assert headers["host"] == fake.url.removeprefix("http://")
    assert headers["authorization"] == "Bearer real-key"  # the app never holds the real key
    assert headers["x-custom"] == "kept"
    assert "x-drop-me" not in headers and "keep-alive" not in headers
    assert headers["x-request-id"] == request_id and len(request_id) == 24
    assert echoed["body_length"] == 7


async def test_client_request_id_is_kept(sidecar):
    async with aiohttp.ClientSession() as session:
        async with session.get(
            proxy_url(sidecar) + "/openai/echo", headers={"x-request-id": "abc-123"}
        ) as response:
            assert response.headers["x-request-id"] == "abc-123"
            assert (await response.json())["headers"]["x-request-id"] == "abc-123"


async def test_upstream_status_headers_and_encoded_body_come_back_unchanged(sidecar, fake):
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.post(
            proxy_url(sidecar) + "/openai/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-fake-status": "418", "accept-encoding": "gzip"},
        ) as response:
            assert response.status == 418
            body = await response.read()
    assert orjson.loads(body)["error"]
    # A large body passes byte for byte, with its content-length.
    payload = gzip.compress(b"x" * 100_000)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.post(
            proxy_url(sidecar) + "/openai/echo",
            data=payload,
            headers={"content-type": "application/octet-stream"},
        ) as response:
            echoed = await response.json()
    import hashlib

    assert echoed["body_sha256"] == hashlib.sha256(payload).hexdigest()


async def test_large_response_body_streams_through(sidecar):
    async with aiohttp.ClientSession() as session:
        async with session.post(
            proxy_url(sidecar) + "/openai/v1/chat/completions",
            json={"model": "m", "messages": []},
            headers={"x-fake-body-bytes": str(20 * 1024 * 1024)},
        ) as response:
            assert int(response.headers["content-length"]) == 20 * 1024 * 1024
            assert len(await response.read()) == 20 * 1024 * 1024


async def test_hundred_sequential_requests_reuse_a_handful_of_connections(sidecar, fake):
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            async with session.get(proxy_url(sidecar) + "/openai/echo") as response:
                assert response.status == 200
                await response.read()
    pool = sidecar.snapshot.upstreams["fake"].pool
    assert fake.requests_seen == 100
    assert pool.opened <= 3, pool.snapshot()


async def test_openai_sdk_chat_completion_and_paced_stream(sidecar):
    client = openai.AsyncOpenAI(base_url=proxy_url(sidecar) + "/openai/v1", api_key="placeholder")
    completion = await client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hello there"}]
    )
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens > 0

    started = time.monotonic()
    arrivals: list[float] = []
    stream = await client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        extra_headers={"x-fake-chunks": "6", "x-fake-chunk-interval-ms": "100"},
    )
    text = ""
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
            text += chunk.choices[0].delta.content
    await client.close()
    assert len(arrivals) == 6
    # Chunks arrive at the upstream's pace, not all at the end (no buffering).
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert all(0.05 < gap < 0.3 for gap in gaps), gaps
    assert arrivals[0] < 0.3


async def test_client_disconnect_mid_stream_closes_the_upstream(sidecar, fake):
    reader, writer = await asyncio.open_connection(*sidecar.proxy_address)
    body = orjson.dumps({"model": "m", "stream": True, "messages": []})
    writer.write(
        b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"x-fake-chunks: 200\r\nx-fake-chunk-interval-ms: 50\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await reader.readuntil(b"data:")  # the stream is flowing
    await wait_for(lambda: fake.open_streams == 1, message="stream open upstream")
    writer.close()
    closed_at = asyncio.get_running_loop().time()
    await wait_for(lambda: fake.closed_by_peer, timeout=2, message="upstream sees the close")
    assert fake.closed_by_peer[0] - closed_at < 1.0
    upstream = sidecar.snapshot.upstreams["fake"]
    await wait_for(lambda: upstream.pool.active == 0, message="connection freed")


async def test_upstream_reset_mid_stream_ends_with_an_error_event(sidecar):
    async with aiohttp.ClientSession() as session:
        async with session.post(
            proxy_url(sidecar) + "/openai/v1/chat/completions",
            json={"model": "m", "stream": True, "messages": []},
            headers={"x-fake-reset-after-chunks": "3"},
        ) as response:
            received = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async for data in response.content.iter_any():
                    received += data
    assert received.count(b"data: {") >= 3
    assert b"event: error" in received and b"upstream_reset" in received
    assert b"[DONE]" not in received


async def test_openai_sdk_sees_a_cut_stream_as_an_error(sidecar):
    client = openai.AsyncOpenAI(
        base_url=proxy_url(sidecar) + "/openai/v1", api_key="x", max_retries=0
    )
    stream = await client.chat.completions.create(
        model="m",
        messages=[],
        stream=True,
        extra_headers={"x-fake-reset-after-chunks": "2"},
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    await client.close()


async def test_first_byte_timeout_gives_504(make_sidecar, fake):
    sidecar = await make_sidecar(base_config(fake.url, timeouts={"first_byte_s": 0.2}))
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(
            proxy_url(sidecar) + "/openai/v1/chat/completions",
            json={"model": "m", "messages": []},
            headers={"x-fake-latency-ms": "2000"},
        ) as response:
            assert response.status == 504
            assert response.headers["x-llm-sidecar-error"] == "upstream_timeout"
            assert (await response.json())["error"]["code"] == "upstream_timeout"
        assert time.monotonic() - started < 1.5


async def test_idle_gap_timeout_cuts_a_stalled_stream(make_sidecar, fake):
    sidecar = await make_sidecar(base_config(fake.url, timeouts={"idle_s": 0.3}))
    async with aiohttp.ClientSession() as session:
        async with session.post(
            proxy_url(sidecar) + "/openai/v1/chat/completions",
            json={"model": "m", "stream": True, "messages": []},
            headers={"x-fake-chunks": "3", "x-fake-chunk-interval-ms": "2000"},
        ) as response:
            assert response.status == 200
            received = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async for data in response.content.iter_any():
                    received += data
    assert b"upstream_timeout" in received


async def test_a_stream_longer_than_idle_s_with_regular_chunks_is_not_cut(make_sidecar, fake):
    # The read timer is re-armed lazily: a stream whose whole length is many idle_s but whose
    # gaps are each shorter must pass untouched, and the connection must be reusable after.
    sidecar = await make_sidecar(base_config(fake.url, timeouts={"idle_s": 0.3}))
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(
                proxy_url(sidecar) + "/openai/v1/chat/completions",
                json={"model": "m", "stream": True, "messages": []},
                headers={"x-fake-chunks": "12", "x-fake-chunk-interval-ms": "100"},
            ) as response:
                assert response.status == 200
                body = await response.read()
            assert body.count(b"data: ") == 13  # 12 chunks and [DONE]
            assert b"upstream_timeout" not in body


async def test_connect_error_gives_502(make_sidecar):
    from tests.conftest import free_port

    sidecar = await make_sidecar(base_config(f"http://127.0.0.1:{free_port()}"))
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy_url(sidecar) + "/openai/v1/models") as response:
            assert response.status == 502
            assert response.headers["x-llm-sidecar-error"] == "upstream_connect"


async def test_slow_client_applies_backpressure_to_the_upstream(sidecar):
    # The client reads nothing for a while: the sidecar must stop reading the upstream rather
    # than buffer the 64 MiB body in memory.
    reader, writer = await asyncio.open_connection(*sidecar.proxy_address, limit=1024)
    body = orjson.dumps({"model": "m", "messages": []})
    writer.write(
        b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        + f"x-fake-body-bytes: {64 * 1024 * 1024}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await reader.readuntil(b"\r\n\r\n")
    connection = next(iter(sidecar.listener.connections))
    await asyncio.sleep(0.5)  # give an unbounded proxy time to buffer everything
    buffered = connection.writer.transport.get_write_buffer_size()
    assert buffered < 4 * 1024 * 1024, buffered
    writer.close()

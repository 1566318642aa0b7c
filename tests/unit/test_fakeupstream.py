"""Tests for the fake LLM upstream, over real sockets, raw and through the official SDKs."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from sidecar.fakeupstream import FakeUpstream, FakeUpstreamSettings

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
PROMPT: Any = [{"role": "user", "content": "x" * 40}]  # 40 chars -> 10 prompt tokens
ROOT = Path(__file__).resolve().parents[2]
REPLY = "This is a fake reply from the fake upstream."
has_openai = importlib.util.find_spec("openai") is not None
has_anthropic = importlib.util.find_spec("anthropic") is not None


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream(FakeUpstreamSettings(seed=1))
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
async def http(fake: FakeUpstream) -> AsyncIterator[aiohttp.ClientSession]:
    assert fake.url is not None
    async with aiohttp.ClientSession(base_url=fake.url) as session:
        yield session


async def wait_for(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll `predicate` until true; fail if it is still false after `within` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def sse_data(resp: aiohttp.ClientResponse) -> list[Any]:
    """Decode every `data:` record of an SSE body ([DONE] kept as the string)."""
    records = []
    async for line in resp.content:
        if line.startswith(b"data: "):
            payload = line[6:].strip()
            records.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return records


async def test_chat_completion_json(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    body = {"model": "gpt-x", "messages": PROMPT}
    async with http.post(CHAT, json=body, headers={"X-Trace": "t1"}) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        data = await resp.json()
    assert data["object"] == "chat.completion" and data["model"] == "gpt-x"
    assert data["id"].startswith("chatcmpl-") and isinstance(data["created"], int)
    assert data["choices"][0]["message"] == {"role": "assistant", "content": REPLY}
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"] == {"prompt_tokens": 10, "completion_tokens": 9, "total_tokens": 19}
    assert fake.requests_seen == 1 and fake.last_request is not None
    assert fake.last_request.method == "POST" and fake.last_request.path == CHAT
    assert fake.last_request.headers["x-trace"] == "t1"
    assert fake.last_request.json() == body and fake.recorded == [fake.last_request]


async def test_chat_stream_with_usage(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    body = {"messages": PROMPT, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(CHAT, json=body) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        records = await sse_data(resp)
    assert records[-1] == "[DONE]"
    *chunks, usage = records[:-1]
    assert len(chunks) == 9 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == REPLY
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "stop"]
    assert usage["choices"] == [] and usage["model"] == "fake-model"
    assert usage["usage"] == {"prompt_tokens": 10, "completion_tokens": 9, "total_tokens": 19}
    assert fake.open_streams == 0 and fake.closed_by_peer == []


async def test_chat_stream_without_usage_and_chunk_count(http: aiohttp.ClientSession) -> None:
    async with http.post(CHAT, json={"stream": True}, headers={"x-fake-chunks": "25"}) as resp:
        records = await sse_data(resp)
    assert len(records) == 26 and records[-1] == "[DONE]"
    assert all(r["choices"] for r in records[:-1])


async def test_stream_is_paced(http: aiohttp.ClientSession) -> None:
    loop = asyncio.get_running_loop()
    headers = {"x-fake-chunks": "6", "x-fake-chunk-interval-ms": "50"}
    started = loop.time()
    arrivals = []
    async with http.post(CHAT, json={"stream": True}, headers=headers) as resp:
        async for line in resp.content:
            if line.startswith(b"data: {"):
                arrivals.append(loop.time() - started)
    assert len(arrivals) == 6
    assert arrivals[4] >= 0.19 and arrivals[4] - arrivals[0] >= 0.19


async def test_anthropic_json(http: aiohttp.ClientSession) -> None:
    async with http.post(MESSAGES, json={"model": "claude-x", "messages": PROMPT}) as resp:
        data = await resp.json()
    assert data["type"] == "message" and data["role"] == "assistant"
    assert data["model"] == "claude-x" and data["id"].startswith("msg_")
    assert data["content"] == [{"type": "text", "text": REPLY}]
    assert data["stop_reason"] == "end_turn"
    assert data["usage"] == {"input_tokens": 10, "output_tokens": 9}


async def test_anthropic_stream_events(http: aiohttp.ClientSession) -> None:
    body = {"messages": PROMPT, "stream": True}
    async with http.post(MESSAGES, json=body, headers={"x-fake-chunks": "3"}) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        text = (await resp.read()).decode()
    events = [block.split("\n") for block in text.strip().split("\n\n")]
    names = [lines[0].removeprefix("event: ") for lines in events]
    assert names == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    data = [orjson.loads(lines[1].removeprefix("data: ")) for lines in events]
    assert all(d["type"] == name for d, name in zip(data, names, strict=True))
    assert data[0]["message"]["usage"]["input_tokens"] == 10
    assert "".join(d["delta"]["text"] for d in data[2:5]) == "This is a"
    assert data[6]["usage"] == {"output_tokens": 3}


async def test_embeddings_responses_models(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/embeddings", json={"input": ["abcd", "efgh"]}) as resp:
        emb = await resp.json()
    assert emb["object"] == "list" and [d["index"] for d in emb["data"]] == [0, 1]
    assert all(len(d["embedding"]) == 8 for d in emb["data"])
    assert emb["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    async with http.post("/openai/v1/responses", json={"model": "m", "input": "y" * 20}) as resp:
        rsp = await resp.json()
    assert rsp["object"] == "response" and rsp["status"] == "completed"
    assert rsp["output"][0]["content"][0] == {
        "type": "output_text",
        "text": REPLY,
        "annotations": [],
    }
    assert rsp["usage"] == {"input_tokens": 5, "output_tokens": 9, "total_tokens": 14}
    async with http.get("/v1/models") as resp:
        models = await resp.json()
    assert models["data"][0]["id"] == "fake-model"


async def test_status_and_retry_after_and_ratelimit_headers(http: aiohttp.ClientSession) -> None:
    headers = {
        "x-fake-status": "503",
        "x-fake-retry-after": "2",
        "x-fake-ratelimit-remaining-requests": "7",
        "x-fake-ratelimit-remaining-tokens": "900",
        "x-fake-ratelimit-reset-requests": "1s",
    }
    async with http.post(CHAT, json={}, headers=headers) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "2"
        assert resp.headers["x-ratelimit-remaining-requests"] == "7"
        assert resp.headers["x-ratelimit-remaining-tokens"] == "900"
        assert resp.headers["x-ratelimit-reset-requests"] == "1s"
        error = (await resp.json())["error"]
    assert error["type"] == "api_error" and error["message"]
    async with http.post(MESSAGES, json={}, headers={"x-fake-status": "429"}) as resp:
        assert resp.status == 429
        assert await resp.json() == {
            "type": "error",
            "error": {"type": "rate_limit_error", "message": "fake upstream error 429"},
        }
    del headers["x-fake-status"]
    async with http.post(CHAT, json={}, headers=headers) as resp:
        assert resp.status == 200 and resp.headers["x-ratelimit-remaining-tokens"] == "900"


async def test_latency_header_and_setting(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with http.post(CHAT, json={}, headers={"x-fake-latency-ms": "200"}) as resp:
        assert resp.status == 200
    assert loop.time() - started >= 0.19
    fake.settings.latency_ms = 100
    started = loop.time()
    async with http.get("/v1/models") as resp:
        assert resp.status == 200
    assert loop.time() - started >= 0.09


async def test_body_bytes(http: aiohttp.ClientSession) -> None:
    for size in (5, 1000, 3_000_000):
        async with http.post(CHAT, json={}, headers={"x-fake-body-bytes": str(size)}) as resp:
            assert resp.content_length == size
            body = await resp.read()
        assert len(body) == size
        if size > 500:
            assert orjson.loads(body)["choices"][0]["message"]["content"] == REPLY


async def test_stall_sends_head_then_waits(http: aiohttp.ClientSession) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with http.post(CHAT, json={}, headers={"x-fake-stall-ms": "500"}) as resp:
        head_at = loop.time() - started
        data = await resp.json()
        body_at = loop.time() - started
    assert head_at < 0.4 and body_at >= 0.49
    assert data["object"] == "chat.completion"
    started = loop.time()
    headers = {"x-fake-stall-ms": "500", "x-fake-chunks": "2"}
    async with http.post(CHAT, json={"stream": True}, headers=headers) as resp:
        assert loop.time() - started < 0.4
        assert len(await sse_data(resp)) == 3
    assert loop.time() - started >= 0.49


async def test_error_rate_switched_at_runtime(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.settings.error_rate, fake.settings.error_status = 1.0, 502
    for path in (CHAT, MESSAGES, "/v1/embeddings", "/v1/responses"):
        async with http.post(path, json={}) as resp:
            assert resp.status == 502
    async with http.get("/v1/models") as resp:
        assert resp.status == 502
    fake.settings.error_rate = 0.0
    async with http.post(CHAT, json={}) as resp:
        assert resp.status == 200


async def test_error_rate_is_seeded() -> None:
    async def statuses() -> list[int]:
        upstream = FakeUpstream(FakeUpstreamSettings(error_rate=0.5, seed=42))
        url = await upstream.start()
        try:
            async with aiohttp.ClientSession(base_url=url) as session:
                results = []
                for _ in range(20):
                    async with session.post(CHAT, json={}) as resp:
                        results.append(resp.status)
                return results
        finally:
            await upstream.stop()

    first = await statuses()
    assert first == await statuses()
    assert {200, 500} == set(first)


async def test_reset_after_chunks_breaks_the_body(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    records: list[bytes] = []
    headers = {"x-fake-reset-after-chunks": "3"}
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(CHAT, json={"stream": True}, headers=headers) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.startswith(b"data: "):
                    records.append(line)
    assert len(records) == 3
    await wait_for(lambda: fake.open_streams == 0)


async def test_client_disconnect_is_noticed(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    headers = {"x-fake-chunks": "1000", "x-fake-chunk-interval-ms": "20"}
    resp = await http.post(MESSAGES, json={"stream": True}, headers=headers)
    async for line in resp.content:
        if line.startswith(b"event: content_block_delta"):
            break
    assert fake.open_streams == 1
    resp.close()
    await wait_for(lambda: len(fake.closed_by_peer) == 1 and fake.open_streams == 0)


async def test_echo(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    payload = b"\x00binary\xff" * 1000
    headers = {"X-Custom": "a", "Content-Type": "application/octet-stream"}
    async with http.put("/base/echo/deep?a=1&a=2", data=payload, headers=headers) as resp:
        echo = await resp.json()
    assert echo["method"] == "PUT" and echo["path"] == "/base/echo/deep"
    assert echo["query"] == "a=1&a=2" and echo["raw_path"] == "/base/echo/deep?a=1&a=2"
    assert echo["headers"]["x-custom"] == "a" and ["X-Custom", "a"] in echo["header_list"]
    assert echo["body_length"] == len(payload)
    assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert fake.last_request is not None and fake.last_request.body == payload


async def test_status_route(http: aiohttp.ClientSession) -> None:
    for code in (204, 304):
        async with http.get(f"/status/{code}") as resp:
            assert resp.status == code and await resp.read() == b""
    async with http.get("/x/status/418") as resp:
        assert resp.status == 418 and (await resp.json())["status"] == 418
    async with http.head("/status/200") as resp:
        assert resp.status == 200 and await resp.read() == b""


async def test_unknown_route_wrong_method_and_bad_input(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/nothing") as resp:
        assert resp.status == 404 and "error" in await resp.json()
    async with http.get(CHAT) as resp:
        assert resp.status == 405
    async with http.post(CHAT, data=b"not json") as resp:
        assert resp.status == 400 and (await resp.json())["error"]["type"]
    async with http.post(CHAT, json={}, headers={"x-fake-chunks": "lots"}) as resp:
        assert resp.status == 400


async def test_recorded_is_capped(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    fake.max_recorded = 3
    for i in range(5):
        async with http.get(f"/echo/{i}") as resp:
            assert resp.status == 200
    assert [r.path for r in fake.recorded] == ["/echo/2", "/echo/3", "/echo/4"]
    assert fake.requests_seen == 5


@pytest.mark.skipif(not has_openai, reason="openai SDK not installed")
async def test_openai_sdk(fake: FakeUpstream) -> None:
    import openai

    async with openai.AsyncOpenAI(
        base_url=f"{fake.url}/v1", api_key="sk-fake", max_retries=0
    ) as client:
        completion = await client.chat.completions.create(model="gpt-x", messages=PROMPT)
        assert completion.choices[0].message.content == REPLY
        assert completion.usage is not None and completion.usage.total_tokens == 19
        stream = await client.chat.completions.create(
            model="gpt-x",
            messages=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts, usage = [], None
        async for chunk in stream:
            parts += [c.delta.content or "" for c in chunk.choices]
            usage = chunk.usage or usage
        assert "".join(parts) == REPLY and usage is not None and usage.completion_tokens == 9
        embedding = await client.embeddings.create(model="e", input="hello")
        assert len(embedding.data[0].embedding) == 8
        response = await client.responses.create(model="r", input="hi")
        assert response.output_text == REPLY
        assert response.usage is not None and response.usage.output_tokens == 9
        assert [m.id async for m in client.models.list()] == ["fake-model"]
        with pytest.raises(openai.InternalServerError) as raised:
            await client.chat.completions.create(
                model="gpt-x",
                messages=PROMPT,
                extra_headers={"x-fake-status": "503"},
            )
        assert raised.value.status_code == 503


@pytest.mark.skipif(not has_anthropic, reason="anthropic SDK not installed")
async def test_anthropic_sdk(fake: FakeUpstream) -> None:
    import anthropic

    async with anthropic.AsyncAnthropic(base_url=fake.url, api_key="fake", max_retries=0) as client:
        message = await client.messages.create(model="claude-x", max_tokens=50, messages=PROMPT)
        assert message.content[0].type == "text" and message.content[0].text == REPLY
        assert message.usage.input_tokens == 10 and message.usage.output_tokens == 9
        async with client.messages.stream(
            model="claude-x",
            max_tokens=50,
            messages=PROMPT,
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text == REPLY and final.usage.output_tokens == 9
        with pytest.raises(anthropic.RateLimitError):
            await client.messages.create(
                model="claude-x",
                max_tokens=50,
                messages=PROMPT,
                extra_headers={"x-fake-status": "429"},
            )


async def test_tls() -> None:
    trustme = pytest.importorskip("trustme")
    import ssl

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    upstream = FakeUpstream()
    url = await upstream.start(ssl_context=server_ctx)
    try:
        assert url.startswith("https://127.0.0.1:")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/v1/models", ssl=client_ctx) as resp:
                assert resp.status == 200
    finally:
        await upstream.stop()


async def test_main_serves_until_sigterm() -> None:
    args = ["--port", "0", "--error-rate", "1", "--error-status", "502"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar.fakeupstream",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode().strip()
        assert url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}{CHAT}", json={}) as resp:
                assert resp.status == 502
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

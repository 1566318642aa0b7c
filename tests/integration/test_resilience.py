"""Breakers, retries, fallbacks and honest failures, through a real sidecar and real upstreams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from sidecar.fakeupstream import FakeUpstream, FakeUpstreamSettings
from tests.conftest import SidecarFactory, admin_url, proxy_url, wait_for

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def config(routes: list[dict[str, Any]], **upstreams: dict[str, Any]) -> dict[str, Any]:
    return {
        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "shutdown_grace_s": 1,
        "access_log": {"enabled": False},
        "upstreams": upstreams,
        "routes": routes,
    }


@pytest.fixture
async def flaky() -> AsyncIterator[dict[str, Any]]:
    """An upstream that answers 503 (Retry-After 0.2 s) ``fail`` times, then 200."""
    state: dict[str, Any] = {"fail": 2, "seen": 0, "times": []}

    async def handler(request: web.Request) -> web.Response:
        state["seen"] += 1
        state["times"].append(time.monotonic())
        await request.read()
        if state["seen"] <= state["fail"]:
            return web.json_response(
                {"error": {"message": "overloaded"}}, status=503, headers={"retry-after": "0.2"}
            )
        return web.json_response({"ok": True, "attempt": state["seen"]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state["url"] = f"http://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


async def post(url: str, body: Any = CHAT, **headers: str) -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body, headers=headers) as response:
            return response.status, response.headers.copy(), await response.read()


async def test_breaker_opens_fails_fast_half_opens_and_closes(
    make_sidecar: SidecarFactory, fake: FakeUpstream
):
    sidecar = await make_sidecar(
        config(
            [{"path_prefix": "/openai", "upstreams": ["fake"]}],
            fake={"url": fake.url, "breaker": {"failure_threshold": 3, "reset_timeout_s": 0.5}},
        )
    )
    url = proxy_url(sidecar) + "/openai/v1/chat/completions"
    for _ in range(3):
        status, _, _ = await post(url, **{"x-fake-status": "500"})
        assert status == 500
    assert fake.requests_seen == 3
    started = time.monotonic()
    status, headers, body = await post(url)
    elapsed = time.monotonic() - started
    assert status == 503
    assert headers["x-llm-sidecar-error"] == "circuit_open"
    assert headers["x-should-retry"] == "false"
    assert int(headers["retry-after"]) >= 1
    assert orjson.loads(body)["error"]["code"] == "circuit_open"
    assert fake.requests_seen == 3  # failed fast: the upstream saw nothing
    assert elapsed < 0.1
    async with aiohttp.ClientSession() as session:
        async with session.get(admin_url(sidecar) + "/upstreams") as response:
            breaker = (await response.json())["fake"]["breaker"]
    assert breaker["state"] == "open" and "3 consecutive" in breaker["last_transition_reason"]

    breaker_state = sidecar.snapshot.upstreams["fake"].breaker
    await wait_for(lambda: breaker_state.retry_after_s() == 0, message="open period over")
    status, _, _ = await post(url)  # the trial succeeds
    assert status == 200
    assert sidecar.snapshot.upstreams["fake"].breaker.state.name == "CLOSED"
    metrics = await _metrics(sidecar)
    assert 'llm_sidecar_circuit_transitions_total{from_state="closed",to_state="open"' in metrics
    assert 'llm_sidecar_circuit_rejections_total{upstream="fake"} 1.0' in metrics
    assert 'llm_sidecar_circuit_state{upstream="fake"} 0.0' in metrics


async def test_failed_trial_reopens_the_breaker(make_sidecar: SidecarFactory, fake: FakeUpstream):
    sidecar = await make_sidecar(
        config(
            [{"path_prefix": "/openai", "upstreams": ["fake"]}],
            fake={"url": fake.url, "breaker": {"failure_threshold": 1, "reset_timeout_s": 0.3}},
        )
    )
    url = proxy_url(sidecar) + "/openai/v1/chat/completions"
    assert (await post(url, **{"x-fake-status": "502"}))[0] == 502
    breaker = sidecar.snapshot.upstreams["fake"].breaker
    await wait_for(lambda: breaker.retry_after_s() == 0, message="open period over")
    assert (await post(url, **{"x-fake-status": "502"}))[0] == 502  # the trial fails
    status, headers, _ = await post(url)
    assert status == 503 and headers["x-llm-sidecar-error"] == "circuit_open"
    assert fake.requests_seen == 2


async def test_retries_honour_retry_after_then_succeed(make_sidecar: SidecarFactory, flaky):
    sidecar = await make_sidecar(
        config(
            [
                {
                    "path_prefix": "/openai",
                    "upstreams": ["flaky"],
                    "retry": {"attempts": 3, "backoff_s": 5, "max_backoff_s": 1},
                }
            ],
            flaky={"url": flaky["url"]},
        )
    )
    status, headers, body = await post(proxy_url(sidecar) + "/openai/v1/chat/completions")
    assert status == 200 and orjson.loads(body)["attempt"] == 3
    assert headers["x-llm-sidecar-attempts"] == "3"
    assert headers["x-llm-sidecar-upstream"] == "flaky"
    gaps = [b - a for a, b in zip(flaky["times"], flaky["times"][1:], strict=False)]
    assert all(0.18 < gap < 0.9 for gap in gaps), gaps  # Retry-After 0.2 s, not backoff_s 5
    metrics = await _metrics(sidecar)
    assert 'llm_sidecar_retries_total{reason="503",route="/openai",upstream="flaky"} 2.0' in metrics


async def test_exhausted_retries_say_so_and_tell_sdks_not_to_retry(
    make_sidecar: SidecarFactory, flaky
):
    flaky["fail"] = 100
    sidecar = await make_sidecar(
        config(
            [{"path_prefix": "/openai", "upstreams": ["flaky"], "retry": {"attempts": 2}}],
            flaky={"url": flaky["url"]},
        )
    )
    status, headers, _ = await post(proxy_url(sidecar) + "/openai/v1/chat/completions")
    # The last upstream answer is returned as it is, with how many tries it took.
    assert status == 503 and headers["x-llm-sidecar-attempts"] == "2"
    assert flaky["seen"] == 2


async def test_retry_budget_caps_concurrent_retries(make_sidecar: SidecarFactory, flaky):
    flaky["fail"] = 1000
    sidecar = await make_sidecar(
        config(
            [
                {
                    "path_prefix": "/openai",
                    "upstreams": ["flaky"],
                    "retry": {"attempts": 2, "budget_percent": 0, "max_backoff_s": 0.5},
                }
            ],
            flaky={"url": flaky["url"], "breaker": {"enabled": False}},
        )
    )
    url = proxy_url(sidecar) + "/openai/v1/chat/completions"
    results = await asyncio.gather(*(post(url) for _ in range(8)))
    assert all(status == 503 for status, _, _ in results)
    # 8 first tries; the budget (0 % of active, floor of 3 concurrent) admits 3 retries.
    assert flaky["seen"] == 8 + 3


async def test_no_retry_once_the_response_started(make_sidecar: SidecarFactory, fake: FakeUpstream):
    sidecar = await make_sidecar(
        config(
            [
                {
                    "path_prefix": "/openai",
                    "upstreams": ["fake"],
                    "retry": {"attempts": 3, "on": ["reset", "5xx"]},
                }
            ],
            fake={"url": fake.url, "breaker": {"failure_threshold": 10}},
        )
    )
    async with aiohttp.ClientSession() as session:
        async with session.post(
            proxy_url(sidecar) + "/openai/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={"x-fake-reset-after-chunks": "2"},
        ) as response:
            received = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async for data in response.content.iter_any():
                    received += data
    assert fake.requests_seen == 1
    assert b"event: error" in received
    # The cut stream is a breaker failure, not a success.
    breaker = sidecar.snapshot.upstreams["fake"].breaker
    assert breaker.snapshot()["failures"] == 1


async def test_fallback_with_model_rewrite_through_the_openai_sdk(make_sidecar: SidecarFactory):
    primary = FakeUpstream(FakeUpstreamSettings(error_rate=1.0, error_status=503))
    secondary = FakeUpstream()
    await primary.start()
    await secondary.start()
    try:
        sidecar = await make_sidecar(
            config(
                [
                    {
                        "path_prefix": "/openai",
                        "upstreams": ["primary", {"name": "azure", "model": "gpt-4o-mini-eu"}],
                    }
                ],
                primary={"url": primary.url, "breaker": {"failure_threshold": 2}},
                azure={"url": secondary.url},
            )
        )
        client = openai.AsyncOpenAI(
            base_url=proxy_url(sidecar) + "/openai/v1", api_key="x", max_retries=0
        )
        for _ in range(3):
            raw = await client.chat.completions.with_raw_response.create(**CHAT)
            completion = raw.parse()
            assert completion.choices[0].message.content
            assert raw.headers["x-llm-sidecar-upstream"] == "azure"
        await client.close()
        assert secondary.last_request is not None
        assert secondary.last_request.json()["model"] == "gpt-4o-mini-eu"
        # Two failures opened the primary's breaker; the third request skipped it entirely.
        assert primary.requests_seen == 2
        assert secondary.requests_seen == 3
        metrics = await _metrics(sidecar)
        assert (
            'llm_sidecar_fallbacks_total{from_upstream="primary",route="/openai",'
            'to_upstream="azure"} 3.0' in metrics
        )
    finally:
        await primary.stop()
        await secondary.stop()


async def test_models_map_routes_by_model_glob_and_aliases(make_sidecar: SidecarFactory):
    one, two = FakeUpstream(), FakeUpstream()
    await one.start()
    await two.start()
    try:
        sidecar = await make_sidecar(
            config(
                [
                    {
                        "path_prefix": "/v",
                        "upstreams": ["one"],
                        "models": {"claude-*": ["two"]},
                        "model_aliases": {"smart": {"one": "gpt-4o", "two": "claude-x"}},
                    }
                ],
                one={"url": one.url},
                two={"url": two.url},
            )
        )
        url = proxy_url(sidecar) + "/v/v1/chat/completions"
        await post(url, {**CHAT, "model": "claude-3"})
        assert two.requests_seen == 1 and one.requests_seen == 0
        await post(url, {**CHAT, "model": "smart"})
        assert one.last_request is not None and one.last_request.json()["model"] == "gpt-4o"
    finally:
        await one.stop()
        await two.stop()


async def test_all_breakers_open_gives_anthropic_shaped_error(make_sidecar: SidecarFactory, fake):
    sidecar = await make_sidecar(
        config(
            [{"path_prefix": "/anthropic", "upstreams": ["claude"]}],
            claude={"url": fake.url, "api": "anthropic", "breaker": {"failure_threshold": 1}},
        )
    )
    url = proxy_url(sidecar) + "/anthropic/v1/messages"
    await post(url, **{"x-fake-status": "500"})
    status, headers, body = await post(url)
    assert status == 503
    assert orjson.loads(body)["type"] == "error"
    assert orjson.loads(body)["error"]["type"] == "overloaded_error"


async def _metrics(sidecar) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(admin_url(sidecar) + "/metrics") as response:
            return await response.text()


async def test_sse_keepalive_comments_while_waiting_for_a_slow_token(
    make_sidecar: SidecarFactory, fake: FakeUpstream
):
    sidecar = await make_sidecar(
        config(
            [{"path_prefix": "/openai", "upstreams": ["fake"], "stream": {"keepalive_s": 0.1}}],
            fake={"url": fake.url},
        )
    )
    async with aiohttp.ClientSession() as session:
        async with session.post(
            proxy_url(sidecar) + "/openai/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={"x-fake-stall-ms": "550", "x-fake-chunks": "2"},
        ) as response:
            body = await response.read()
    assert body.startswith(b": keep-alive\n\n")
    assert 3 <= body.count(b": keep-alive") <= 7
    assert body.rstrip().endswith(b"data: [DONE]")


async def test_a_stream_counts_in_flight_until_its_last_byte(
    make_sidecar: SidecarFactory, fake: FakeUpstream
):
    sidecar = await make_sidecar(
        config([{"path_prefix": "/openai", "upstreams": ["fake"]}], fake={"url": fake.url})
    )
    upstream = sidecar.snapshot.upstreams["fake"]
    async with aiohttp.ClientSession() as session:
        async with session.post(
            proxy_url(sidecar) + "/openai/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={"x-fake-chunks": "5", "x-fake-chunk-interval-ms": "100"},
        ) as response:
            await response.content.readline()
            assert upstream.inflight == 1
            await response.read()
    await wait_for(lambda: upstream.inflight == 0, message="in-flight back to zero")

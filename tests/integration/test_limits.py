"""Rate limits end to end: real sidecar, real fake upstream, real SDKs.

Scopes (upstream, route, tenant), reject and queue modes, max_in_flight, token reservation and
reconciliation (JSON, OpenAI and Anthropic streams, injected include_usage), budgets, provider
pacing, state across reloads, and the metrics that report them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
import yaml
from prometheus_client import generate_latest

from sidecar.app import Sidecar
from sidecar.config.loader import load_text
from sidecar.fakeupstream import FakeUpstream
from tests.conftest import SidecarFactory, base_config, proxy_url, wait_for

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello there"}]}
CHAT_PATH = "/openai/v1/chat/completions"


def with_limits(
    url: str,
    route: dict[str, Any] | None = None,
    upstream: dict[str, Any] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """base_config with `limits` on the route and/or the upstream, plus top-level keys."""
    config = base_config(url, **({"limits": upstream} if upstream else {}))
    if route:
        config["routes"][0]["limits"] = route
    return config | top


async def post(
    sidecar: Sidecar, body: Any = CHAT, path: str = CHAT_PATH, **headers: str
) -> tuple[int, aiohttp.typedefs.LooseHeaders, bytes]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy_url(sidecar) + path, data=data, headers=headers) as response:
            return response.status, response.headers, await response.read()


async def idle(sidecar: Sidecar) -> None:
    """Wait until no request is in flight: every response settled its usage and leases."""
    await wait_for(lambda: sidecar.proxy.inflight == 0, message="no request in flight")


def scope(sidecar: Sidecar, key: str) -> dict[str, Any]:
    return sidecar.policies.snapshot()["limiters"][key]  # type: ignore[index,no-any-return]


def metrics(sidecar: Sidecar) -> str:
    return generate_latest(sidecar.metrics.registry).decode()


def token_level(sidecar: Sidecar, key: str = "route:/openai") -> float:
    return scope(sidecar, key)["tokens"]["level"]  # type: ignore[no-any-return]


# A token bucket that refills 1 token a minute: its level only moves by what requests take.
STILL_TOKENS = {"tokens": {"per_min": 1, "burst": 100_000}}


# -- reject: 429 with Retry-After and x-ratelimit-*, through the openai SDK ------------------


async def test_openai_sdk_gets_429_with_retry_after_and_headers_then_retries_to_success(
    make_sidecar: SidecarFactory, fake: FakeUpstream
):
    sidecar = await make_sidecar(
        with_limits(
            fake.url,
            route={"requests": {"per_s": 1, "burst": 1}, "tokens": {"per_min": 60_000}},
        )
    )
    base_url = proxy_url(sidecar) + "/openai/v1"
    async with openai.AsyncOpenAI(base_url=base_url, api_key="sk-x", max_retries=0) as strict:
        await strict.chat.completions.create(**CHAT)  # takes the one request of the burst
        with pytest.raises(openai.RateLimitError) as refused:
            await strict.chat.completions.create(**CHAT)
    error = refused.value
    assert error.status_code == 429
    headers = error.response.headers
    assert headers["retry-after"] == "1" and headers["retry-after-ms"] == "1000"
    assert headers["x-llm-sidecar-error"] == "rate_limited"
    assert headers["x-ratelimit-limit-requests"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-limit-tokens"] == "60000"
    assert 59_000 < int(headers["x-ratelimit-remaining-tokens"]) <= 60_000
    assert headers["x-ratelimit-reset-requests"].endswith(("ms", "s"))
    assert headers["x-ratelimit-reset-tokens"].endswith(("ms", "s"))
    assert error.body["type"] == "rate_limit_error"  # type: ignore[index]
    assert fake.requests_seen == 1  # the refusal never reached the upstream

    # The SDK's default retries honour Retry-After: refused once, then admitted.
    async with openai.AsyncOpenAI(base_url=base_url, api_key="sk-x", max_retries=2) as patient:
        started = time.monotonic()
        raw = await patient.chat.completions.with_raw_response.create(**CHAT)
        elapsed = time.monotonic() - started
    assert raw.parse().choices[0].message.content
    assert 0.9 <= elapsed < 5, elapsed
    assert fake.last_request is not None
    assert fake.last_request.headers["x-stainless-retry-count"] == "1"
    assert fake.requests_seen == 2
    # Successful responses show the tightest limit too.
    assert raw.headers["x-ratelimit-limit-requests"] == "1"
    text = metrics(sidecar)
    assert 'llm_sidecar_ratelimit_rejections_total{limit="requests",scope="route:/openai"} 2.0' in (
        text
    )


async def test_openai_sdk_retries_until_the_token_bucket_refills(
    make_sidecar: SidecarFactory, fake: FakeUpstream
):
    # 100 tokens a second, 60 at most; each request reserves ~57 (max_tokens 50) and uses 52.
    limits = {"tokens": {"per_min": 6000, "burst": 60}}
    sidecar = await make_sidecar(with_limits(fake.url, route=limits))
    async with openai.AsyncOpenAI(
        base_url=proxy_url(sidecar) + "/openai/v1", api_key="sk-x", max_retries=2
    ) as client:
        request = {**CHAT, "max_tokens": 50, "extra_headers": {"x-fake-chunks": "50"}}
        first = await client.chat.completions.create(**request)
        assert first.usage is not None and first.usage.total_tokens == 52
        await idle(sidecar)  # 8 tokens left: the next reservation must wait for the refill
        started = time.monotonic()
        raw = await client.chat.completions.with_raw_response.create(**request)
        elapsed = time.monotonic() - started
    assert raw.parse().usage is not None
    assert 0.9 <= elapsed < 5, elapsed
    assert fake.last_request is not None
    assert fake.last_request.headers["x-stainless-retry-count"] == "1"
    assert 'limit="tokens",scope="route:/openai"} 1.0' in metrics(sidecar)


async def test_anthropic_route_refuses_in_anthropic_shape(
    make_sidecar: SidecarFactory, fake: FakeUpstream
):
    config = base_config(fake.url)
    config["routes"] = [
        {"path_prefix": "/anthropic", "api": "anthropic", "upstreams": ["fake"]},
    ]
    config["routes"][0]["limits"] = {"requests": {"per_min": 1}}
    sidecar = await make_sidecar(config)
    body = {"model": "claude", "max_tokens": 10, "messages": CHAT["messages"]}
    assert (await post(sidecar, body, "/anthropic/v1/messages"))[0] == 200
    status, headers, raw = await post(sidecar, body, "/anthropic/v1/messages")
    assert status == 429 and int(headers["retry-after"]) >= 59
    assert orjson.loads(raw)["error"]["type"] == "rate_limit_error"


async def test_a_refusal_at_the_upstream_scope_costs_the_route_and_tenant_nothing(
    make_sidecar: SidecarFactory, fake: FakeUpstream
):
    config = with_limits(
        fake.url,
        route={"requests": {"per_min": 1, "burst": 10}, **STILL_TOKENS},
        upstream={"requests": {"per_min": 1}},
        tenants={"default": {"limits": {"requests": {"per_min": 1, "burst": 10}}}},
    )
    sidecar = await make_sidecar(config)
    assert (await post(sidecar))[0] == 200
    await idle(sidecar)
    used = 100_000 - token_level(sidecar)
    status, headers, _ = await post(sidecar, {**CHAT, "max_tokens": 5000})
    assert status == 429 and headers["x-ratelimit-limit-requests"] == "1"  # the upstream's
    await idle(sidecar)
    for key in ("route:/openai", "tenant:default"):
        assert scope(sidecar, key)["requests"]["level"] == pytest.approx(9, abs=0.01)
    assert token_level(sidecar) == pytest.approx(100_000 - used, abs=0.01)


# -- queue mode: FIFO, bounded queue, bounded wait ------------------------------------------


async def test_queue_mode_admits_in_arrival_order_and_refuses_a_full_queue(
    make_sidecar: SidecarFactory, fake: FakeUpstream
):
    limits = {
        "requests": {"per_s": 4, "burst": 1},
        "on_limit": "queue",
        "max_wait_s": 10,
        "max_queue": 3,
    }
    sidecar = await make_sidecar(with_limits(fake.url, route=limits))
    assert (await post(sidecar))[0] == 200  # empties the bucket
    tasks = []
    for seq in range(3):  # enqueue one at a time, so arrival order is known
        tasks.append(asyncio.create_task(post(sidecar, **{"x-seq": str(seq)})))
        await wait_for(lambda n=seq + 1: scope(sidecar, "route:/openai")["queued"] == n)
    status, headers, body = await post(sidecar, **{"x-seq": "late"})  # the queue is full
    assert status == 429 and orjson.loads(body)["error"]["code"] == "rate_limited"
    assert "queue_full" in orjson.loads(body)["error"]["message"]
    results = await asyncio.gather(*tasks)
    assert [r[0] for r in results] == [200, 200, 200]
    seen = [r.headers.get("x-seq") for r in fake.recorded if r.headers.get("x-seq")]
    assert seen == ["0", "1", "2"]
    text = metrics(sidecar)
    assert 'llm_sidecar_ratelimit_queue_wait_seconds_count{scope="route:/openai"} 4.0' in text
    assert 'limit="queue_full",scope="route:/openai"} 1.0' in text


async def test_queue_mode_gives_up_after_max_wait(make_sidecar: SidecarFactory, fake: FakeUpstream):
    limits = {"max_in_flight": 1, "on_limit": "queue", "max_wait_s": 0.3}
    sidecar = await make_sidecar(with_limits(fake.url, upstream=limits))
    slow = asyncio.create_task(post(sidecar, **{"x-fake-latency-ms": "3000"}))
    await wait_for(lambda: scope(sidecar, "upstream:fake")["in_flight"] == 1)
    started = time.monotonic()
    status, headers, body = await post(sidecar)
    waited = time.monotonic() - started
    assert status == 429 and "queue_timeout" in orjson.loads(body)["error"]["message"]
    assert 0.25 <= waited < 2.0, waited
    assert headers["x-llm-sidecar-error"] == "rate_limited"
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow


async def test_queue_refuses_at_once_what_could_never_be_admitted_in_time(
    make_sidecar: SidecarFactory, fake: FakeUpstream
):
    limits = {"requests": {"per_min": 1}, "on_limit": "queue", "max_wait_s": 1}
    sidecar = await make_sidecar(with_limits(fake.url, route=limits))
    assert (await post(sidecar))[0] == 200
    started = time.monotonic()
    status, headers, _ = await post(sidecar)
    assert status == 429 and time.monotonic() - started < 0.5
    assert int(headers["retry-after"]) >= 59


# -- max_in_flight under concurrent load ----------------------------------------------------


async def _peak_open_streams(fake: FakeUpstream, done: asyncio.Event) -> int:
    peak = 0
    while not done.is_set():
        peak = max(peak, fake.open_streams)
        await asyncio.sleep(0.005)
    return peak


async def _stream(sidecar: Sidecar) -> int:
    headers = {"x-fake-chunks": "3", "x-fake-chunk-interval-ms": "60"}
    status, _, body = await post(sidecar, {**CHAT, "stream": True}, **headers)
    if status == 200:
        assert body.rstrip().endswith(b"[DONE]")
    return status


async def test_max_in_flight_caps_concurrent_streams_in_queue_mode(
    make_sidecar: SidecarFactory, fake: FakeUpstream
):
    limits = {"max_in_flight": 3, "on_limit": "queue", "max_wait_s": 30}
    sidecar = await make_sidecar(with_limits(fake.url, upstream=limits))
    done = asyncio.Event()
    watcher = asyncio.create_task(_peak_open_streams(fake, done))
    statuses = await asyncio.gather(*(_stream(sidecar) for _ in range(15)))
    done.set()
    peak = await watcher
    assert statuses == [200] * 15
    assert peak == 3  # the cap was reached and never exceeded
    assert scope(sidecar, "upstream:fake")["in_flight"] == 0


async def test_max_in_flight_rejects_the_excess_in_reject_mode(
    make_sidecar: SidecarFactory, fake: FakeUpstream
):
    sidecar = await make_sidecar(with_limits(fake.url, route={"max_in_flight": 2}))
    headers = {"x-fake-chunks": "3", "x-fake-chunk-interval-ms": "300"}
    statuses = await asyncio.gather(
        *(post(sidecar, {**CHAT, "stream": True}, **headers) for _ in range(6))
    )
    assert sorted(s for s, _, _ in statuses) == [200, 200, 429, 429, 429, 429]
    refused = [h for s, h, _ in statuses if s == 429]
    assert all(h["x-llm-sidecar-error"] == "rate_limited" for h in refused)
    assert 'limit="in_flight",scope="route:/openai"} 4.0' in metrics(sidecar)


# -- token accounting -----------------------------------------------------------------------


async def test_tokens_reserved_up_front_and_reconciled_from_json_usage(
    make_sidecar: SidecarFactory, fake: FakeUpstream
):
    sidecar = await make_sidecar(with_limits(fake.url, route=STILL_TOKENS))
    finished: list[Any] = []
    from sidecar.events import RequestFinished

    sidecar.events.subscribe(RequestFinished, lambda e: finished.append(e.exchange))
    status, headers, body = await post(sidecar, {**CHAT, "max_tokens": 5000})
    assert status == 200
    # While in flight, the estimate (prompt + max_tokens) was reserved...
    assert 94_900 <= int(headers["x-ratelimit-remaining-tokens"]) <= 95_000
    usage = orjson.loads(body)["usage"]
    # ...and afterwards only the real usage is charged.
    await wait_for(lambda: token_level(sidecar) > 99_000)
    assert token_level(sidecar) == pytest.approx(100_000 - usage["total_tokens"], abs=1)
    exchange = finished[-1]
    assert exchange.tokens == (usage["prompt_tokens"], usage["completion_tokens"])
    assert exchange.model == "fake-model" and exchange.tenant == "default"


async def test_openai_stream_injected_usage_is_counted_and_hidden_from_the_client(
    make_sidecar: SidecarFactory, fake: FakeUpstream
):
    config = with_limits(fake.url, route=STILL_TOKENS)
    config["routes"][0]["stream"] = {"include_usage": True}
    sidecar = await make_sidecar(config)
    async with openai.AsyncOpenAI(
        base_url=proxy_url(sidecar) + "/openai/v1", api_key="sk-x", max_retries=0
    ) as client:
        stream = await client.chat.completions.create(**CHAT, stream=True, max_tokens=3000)
        chunks = [chunk async for chunk in stream]
        assert fake.last_request is not None
        assert fake.last_request.json()["stream_options"] == {"include_usage": True}
        assert chunks and all(chunk.choices for chunk in chunks)  # no usage-only chunk
        assert all(chunk.usage is None for chunk in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        await wait_for(lambda: token_level(sidecar) > 99_000)
        hidden = 100_000 - token_level(sidecar)
        assert hidden == pytest.approx(2 + len(text.split()), abs=1)  # fake: chars // 4 + words

        # A client that asks for usage itself gets its usage chunk, unchanged.
        stream = await client.chat.completions.create(
            **CHAT, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == pytest.approx(hidden, abs=0.5)  # the bucket refills
    await wait_for(lambda: token_level(sidecar) == pytest.approx(100_000 - 2 * hidden, abs=1))


async def test_anthropic_stream_usage_is_reconciled(
    make_sidecar: SidecarFactory, fake: FakeUpstream
):
    config = base_config(fake.url, api="anthropic")
    config["routes"] = [
        {"path_prefix": "/anthropic", "upstreams": ["fake"], "limits": STILL_TOKENS},
    ]
    sidecar = await make_sidecar(config)
    async with anthropic.AsyncAnthropic(
        base_url=proxy_url(sidecar) + "/anthropic", api_key="sk-ant", max_retries=0
    ) as client:
        async with client.messages.stream(
            model="claude-x", max_tokens=4000, messages=CHAT["messages"]
        ) as stream:
            message = await stream.get_final_message()
    used = message.usage.input_tokens + message.usage.output_tokens
    assert used > 0
    await wait_for(lambda: token_level(sidecar, "route:/anthropic") > 99_000)
    assert token_level(sidecar, "route:/anthropic") == pytest.approx(100_000 - used, abs=1)


async def test_a_body_that_is_not_json_is_counted_not_refused(
    make_sidecar: SidecarFactory, fake: FakeUpstream
):
    limits = {"requests": {"per_min": 1, "burst": 10}, **STILL_TOKENS}
    sidecar = await make_sidecar(with_limits(fake.url, route=limits))
    status, _, _ = await post(sidecar, b"\xff\x00 not json", "/openai/v1/echo")
    assert status == 200
    await idle(sidecar)
    state = scope(sidecar, "route:/openai")
    assert state["requests"]["level"] == pytest.approx(9, abs=0.1)
    assert state["tokens"]["level"] == pytest.approx(100_000, abs=0.1)


# -- tenants and budgets --------------------------------------------------------------------


async def test_tenant_limits_default_per_tenant_and_overrides(
    make_sidecar: SidecarFactory, fake: FakeUpstream
):
    tenants = {
        "default": {"limits": {"requests": {"per_min": 1}}},
        "overrides": {"vip": {"limits": {"requests": {"per_min": 100}}}},
    }
    sidecar = await make_sidecar(with_limits(fake.url, tenants=tenants))
    for tenant in ("a", "b"):  # unknown tenants: the default, each its own bucket
        assert (await post(sidecar, **{"x-tenant-id": tenant}))[0] == 200
    status, headers, _ = await post(sidecar, **{"x-tenant-id": "a"})
    assert status == 429 and headers["x-ratelimit-limit-requests"] == "1"
    assert (await post(sidecar))[0] == 200  # no header: the `default` tenant, limited too
    assert (await post(sidecar))[0] == 429
    for _ in range(3):
        assert (await post(sidecar, **{"x-tenant-id": "vip"}))[0] == 200
    assert 'limit="requests",scope="tenant:a"} 1.0' in metrics(sidecar)


async def test_tenant_from_api_key_hash(make_sidecar: SidecarFactory, fake: FakeUpstream):
    tenants = {"from_api_key": True, "default": {"limits": {"requests": {"per_min": 1}}}}
    sidecar = await make_sidecar(with_limits(fake.url, tenants=tenants))
    assert (await post(sidecar, authorization="Bearer sk-one"))[0] == 200
    assert (await post(sidecar, authorization="Bearer sk-two"))[0] == 200
    assert (await post(sidecar, authorization="Bearer sk-one"))[0] == 429
    keys = [k for k in sidecar.policies.snapshot()["limiters"] if k.startswith("tenant:key-")]  # type: ignore[union-attr]
    assert len(keys) == 2 and not any("sk-" in k for k in keys)


async def test_budget_exhaustion_for_one_tenant_does_not_affect_another(
    make_sidecar: SidecarFactory, fake: FakeUpstream
):
    config = base_config(fake.url)
    # $1 per token: one request (a few tokens) spends a $3 daily budget.
    config["prices"] = {"fake-model": {"input_per_mtok": 1e6, "output_per_mtok": 1e6}}
    config["tenants"] = {
        "default": {"budget_usd": {"per_day": 3}},
        "overrides": {"big": {"budget_usd": {"per_day": 1000, "per_month": 5000}}},
    }
    sidecar = await make_sidecar(config)
    status, _, body = await post(sidecar, **{"x-tenant-id": "small"})
    assert status == 200
    cost = orjson.loads(body)["usage"]["total_tokens"]
    await idle(sidecar)
    status, headers, body = await post(sidecar, **{"x-tenant-id": "small"})
    assert status == 429
    assert headers["x-llm-sidecar-error"] == "budget_exceeded"
    assert headers["x-should-retry"] == "false"  # the SDKs must not retry into it
    assert 0 < int(headers["retry-after"]) <= 86_400  # until UTC midnight
    assert orjson.loads(body)["error"]["type"] == "insufficient_quota"
    for n in range(3):  # other tenants are unaffected, with their own budget or the default
        assert (await post(sidecar, **{"x-tenant-id": "big"}))[0] == 200
        assert (await post(sidecar, **{"x-tenant-id": f"new{n}"}))[0] == 200
    assert fake.requests_seen == 7
    await idle(sidecar)
    text = metrics(sidecar)
    assert 'llm_sidecar_budget_remaining_usd{period="day",tenant="small"} 0.0' in text
    remaining = 1000 - 3 * cost
    assert f'llm_sidecar_budget_remaining_usd{{period="day",tenant="big"}} {remaining:.1f}' in text
    assert f'llm_sidecar_cost_usd_total{{model="fake-model",tenant="small"}} {cost:.1f}' in text
    assert 'limit="budget_day",scope="tenant:small"} 1.0' in text


# -- provider-header pacing -----------------------------------------------------------------


async def test_pacing_holds_requests_until_the_provider_reset(
    make_sidecar: SidecarFactory, fake: FakeUpstream
):
    sidecar = await make_sidecar(base_config(fake.url))
    exhausted = {
        "x-fake-ratelimit-remaining-requests": "0",
        "x-fake-ratelimit-reset-requests": "600ms",
    }
    assert (await post(sidecar, **exhausted))[0] == 200
    started = time.monotonic()
    assert (await post(sidecar))[0] == 200
    assert time.monotonic() - started >= 0.45
    assert fake.requests_seen == 2
    assert 'llm_sidecar_ratelimit_queue_wait_seconds_count{scope="provider:fake"} 1.0' in (
        metrics(sidecar)
    )

    # A reset further off than the wait bound: refused here, not sent to collect a 429.
    far = {"x-fake-ratelimit-remaining-requests": "0", "x-fake-ratelimit-reset-requests": "30s"}
    assert (await post(sidecar, **far))[0] == 200
    started = time.monotonic()
    status, headers, _ = await post(sidecar)
    assert status == 429 and time.monotonic() - started < 1
    assert 29 <= int(headers["retry-after"]) <= 30
    assert fake.requests_seen == 3
    assert 'limit="provider",scope="provider:fake"} 1.0' in metrics(sidecar)


async def test_pacing_can_be_turned_off(make_sidecar: SidecarFactory, fake: FakeUpstream):
    sidecar = await make_sidecar(base_config(fake.url, pacing=False))
    far = {"x-fake-ratelimit-remaining-requests": "0", "x-fake-ratelimit-reset-requests": "30s"}
    assert (await post(sidecar, **far))[0] == 200
    assert (await post(sidecar))[0] == 200
    assert fake.requests_seen == 2


# -- state across reloads -------------------------------------------------------------------


async def test_buckets_and_budgets_survive_a_reload(
    make_sidecar: SidecarFactory, fake: FakeUpstream
):
    config = with_limits(
        fake.url,
        route={"requests": {"per_min": 2}},
        upstream={"requests": {"per_min": 3}},
        prices={"fake-model": {"input_per_mtok": 1e6, "output_per_mtok": 1e6}},
        tenants={"default": {"budget_usd": {"per_day": 1e9}}},
    )
    sidecar = await make_sidecar(config)
    assert (await post(sidecar))[0] == 200
    assert (await post(sidecar))[0] == 200
    await idle(sidecar)
    spent = sidecar.policies.snapshot()["budgets"]["default"]["spent_usd"]["day"]  # type: ignore[index]
    assert spent > 0
    # Change the upstream (a new runtime object) and the route's limit.
    config["upstreams"]["fake"]["headers"] = {"x-changed": "1"}
    config["routes"][0]["limits"] = {"requests": {"per_min": 2, "burst": 5}}
    sidecar.apply(load_text(yaml.safe_dump(config)))
    status, headers, _ = await post(sidecar)
    assert status == 429 and headers["x-ratelimit-limit-requests"] == "5"  # retuned, not reset
    assert scope(sidecar, "upstream:fake")["requests"]["level"] < 2  # carried over too
    after = sidecar.policies.snapshot()["budgets"]["default"]["spent_usd"]["day"]  # type: ignore[index]
    assert after == spent


# -- metrics cardinality --------------------------------------------------------------------


async def test_metric_labels_are_capped_for_tenants_and_unpriced_models(
    make_sidecar: SidecarFactory, fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr("sidecar.metrics.MAX_UNPRICED_MODELS", 1)
    config = with_limits(
        fake.url,
        route=STILL_TOKENS,
        tenants={"max_label_values": 2},
        prices={"priced": {"input_per_mtok": 1, "output_per_mtok": 1}},
    )
    sidecar = await make_sidecar(config)
    for tenant, model in [("t1", "m1"), ("t2", "m2"), ("t3", "priced"), ("t4", "m1")]:
        body = {**CHAT, "model": model}
        assert (await post(sidecar, body, **{"x-tenant-id": tenant}))[0] == 200
    await idle(sidecar)
    lines = [
        line
        for line in metrics(sidecar).splitlines()
        if line.startswith('llm_sidecar_tokens_total{kind="prompt"')
    ]
    labels = {line.split("{", 1)[1].split("}", 1)[0] for line in lines}
    assert labels == {
        'kind="prompt",model="m1",tenant="t1",upstream="fake"',
        'kind="prompt",model="other",tenant="t2",upstream="fake"',
        'kind="prompt",model="priced",tenant="other",upstream="fake"',
        'kind="prompt",model="m1",tenant="other",upstream="fake"',
    }

"""The request ledger and the usage tap: settled leases, stripped usage chunks, no sockets."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from sidecar.config.model import Accounting, Budget, Limits, Price
from sidecar.events import BudgetUpdated, EventBus, UsageRecorded
from sidecar.exchange import Exchange
from sidecar.http.message import Headers, Request, Response
from sidecar.policies import accounting
from sidecar.policies.accounting import Ledger
from sidecar.policies.budget import BudgetTracker
from sidecar.policies.ratelimit import Limiter


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


CHAT = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 100}


def exchange(body: Any = CHAT, path: str = "/v1/chat/completions") -> Exchange:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    ex = Exchange(Request("POST", path, Headers(), raw), "rid", "client", 0.0)
    ex.tenant = "t"
    return ex


def token_limiter(clock: FakeClock) -> Limiter:
    # 1 token per minute back: levels stay where the test leaves them.
    settings = Limits.model_validate({"tokens": {"per_min": 1, "burst": 10_000}})
    return Limiter("route:x", settings, clock=clock)


def level(limiter: Limiter) -> float:
    return limiter.snapshot()["tokens"]["level"]  # type: ignore[index,no-any-return]


def ledger_for(ex: Exchange, events: EventBus | None = None, **kw: Any) -> Ledger:
    prices = kw.pop("prices", {})
    budget = kw.pop("budget", None)
    return Ledger(ex, Accounting.model_validate({}), prices, budget, events or EventBus())


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def drain(response: Response) -> bytes:
    return b"".join([chunk async for chunk in response.body])


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def test_estimate_is_lazy_and_sets_the_model() -> None:
    ex = exchange()
    ledger = ledger_for(ex)
    assert ex.model is None
    assert ledger.tokens == 100 + 100 + 4  # 400 chars / 4, max_tokens, message overhead
    assert ex.model == "m"


async def test_json_usage_reconciles_every_lease_and_records_cost() -> None:
    clock = FakeClock()
    limiter = token_limiter(clock)
    ex = exchange()
    events = EventBus()
    seen: list[object] = []
    events.subscribe(UsageRecorded, seen.append)
    events.subscribe(BudgetUpdated, seen.append)
    budget = BudgetTracker(Budget.model_validate({"per_day": 1.0}))
    prices = {"m": Price.model_validate({"input_per_mtok": 1e6, "output_per_mtok": 2e6})}
    ledger = ledger_for(ex, events, prices=prices, budget=budget)
    ledger.leases.append(limiter.try_acquire(ledger.tokens))
    assert level(limiter) == 10_000 - 204
    body = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    response = ledger.watch(
        Response(200, Headers([("content-type", "application/json")]), chunks(body[:5], body[5:]))
    )
    assert await drain(response) == body
    assert level(limiter) == 10_000 - 10
    assert limiter.in_flight == 0
    assert ex.tokens == (7, 3) and ex.cost_usd == pytest.approx(13.0)
    assert budget.spent()["day"] == pytest.approx(13.0)
    update, usage = seen  # the budget first, then the usage report
    assert usage == UsageRecorded("none", "m", "t", 7, 3, pytest.approx(13.0))
    assert update == BudgetUpdated("t", {"day": 0.0})


async def test_gzip_json_usage_is_read_from_a_decompressed_copy() -> None:
    clock = FakeClock()
    limiter = token_limiter(clock)
    ex = exchange()
    ledger = ledger_for(ex)
    ledger.leases.append(limiter.try_acquire(ledger.tokens))
    body = gzip.compress(orjson.dumps({"usage": {"input_tokens": 5, "output_tokens": 6}}))
    headers = Headers([("content-type", "application/json"), ("content-encoding", "gzip")])
    response = ledger.watch(Response(200, headers, chunks(body)))
    assert await drain(response) == body  # the client gets the bytes as sent
    assert ex.tokens == (5, 6) and level(limiter) == 10_000 - 11


async def test_a_json_body_over_the_cap_keeps_the_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounting, "MAX_JSON_BYTES", 10)
    clock = FakeClock()
    limiter = token_limiter(clock)
    ex = exchange()
    ledger = ledger_for(ex)
    ledger.leases.append(limiter.try_acquire(ledger.tokens))
    body = orjson.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    await drain(ledger.watch(Response(200, Headers(), chunks(body))))
    assert ex.tokens is None and level(limiter) == 10_000 - 204


async def test_injected_usage_chunk_is_stripped_even_when_split_across_chunks() -> None:
    ex = exchange({**CHAT, "stream": True})
    ledger = ledger_for(ex)
    ledger.ask_for_usage()
    sent = orjson.loads(ex.request.body)
    assert sent["stream_options"] == {"include_usage": True} and ledger.strip_usage
    assert ex.request.headers.get("accept-encoding") == "identity"
    content = sse({"choices": [{"index": 0, "delta": {"content": "hi"}}]})
    usage = sse({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}})
    done = b"data: [DONE]\n\n"
    stream = content + usage + done
    headers = Headers([("content-type", "text/event-stream"), ("content-length", "999")])
    response = ledger.watch(
        Response(200, headers, chunks(*(stream[i : i + 7] for i in range(0, len(stream), 7))))
    )
    assert "content-length" not in response.headers
    assert await drain(response) == content + done
    assert ex.tokens == (4, 2)


async def test_a_client_that_asked_for_usage_gets_its_chunk() -> None:
    ex = exchange({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    ledger = ledger_for(ex)
    ledger.ask_for_usage()
    assert not ledger.strip_usage
    usage = sse({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}})
    headers = Headers([("content-type", "text/event-stream")])
    assert await drain(ledger.watch(Response(200, headers, chunks(usage)))) == usage
    assert ex.tokens == (4, 2)


def test_include_usage_is_not_added_to_anthropic_or_unstreamed_requests() -> None:
    for ex in (exchange({**CHAT, "stream": True}, "/v1/messages"), exchange(CHAT)):
        body = ex.request.body
        ledger = ledger_for(ex)
        ledger.ask_for_usage()
        assert ex.request.body is body and not ledger.strip_usage


async def test_anthropic_stream_usage() -> None:
    clock = FakeClock()
    limiter = token_limiter(clock)
    ex = exchange({**CHAT, "stream": True}, "/v1/messages")
    ledger = ledger_for(ex)
    ledger.leases.append(limiter.try_acquire(ledger.tokens))
    start = {
        "type": "message_start",
        "message": {"usage": {"input_tokens": 12, "output_tokens": 1}},
    }
    delta = {"type": "message_delta", "usage": {"output_tokens": 30}}
    body = b"event: message_start\n" + sse(start) + b"event: message_delta\n" + sse(delta)
    headers = Headers([("content-type", "text/event-stream; charset=utf-8")])
    assert await drain(ledger.watch(Response(200, headers, chunks(body)))) == body
    assert ex.tokens == (12, 30) and level(limiter) == 10_000 - 42


def test_settle_rules_for_refusals_errors_and_cut_streams() -> None:
    clock = FakeClock()
    settings = Limits.model_validate(
        {"tokens": {"per_min": 1, "burst": 10_000}, "requests": {"per_min": 1, "burst": 10}}
    )

    def settled(**kw: Any) -> Limiter:
        limiter = Limiter("x", settings, clock=clock)
        ledger = ledger_for(exchange())
        ledger.leases.append(limiter.try_acquire(ledger.tokens))
        ledger.settle(**kw)
        ledger.settle(status=200, usage=None)  # only the first settle counts
        assert limiter.in_flight == 0
        return limiter

    from sidecar.policies.usage import Usage

    made_here = settled(status=429, usage=None, sent=False).snapshot()
    assert made_here["tokens"]["level"] == 10_000 and made_here["requests"]["level"] == 10  # type: ignore[index]
    error = settled(status=500, usage=None).snapshot()
    assert error["tokens"]["level"] == 10_000 and error["requests"]["level"] == 9  # type: ignore[index]
    unknown = settled(status=200, usage=None).snapshot()
    assert unknown["tokens"]["level"] == 10_000 - 204  # type: ignore[index]
    cut = settled(status=200, usage=Usage(50, 1), completed=False).snapshot()
    assert cut["tokens"]["level"] == 10_000 - 204  # type: ignore[index]
    overrun = settled(status=200, usage=Usage(500, 10), completed=False).snapshot()
    assert overrun["tokens"]["level"] == 10_000 - 510  # type: ignore[index]


async def test_a_body_that_is_not_json_reserves_nothing_and_pays_what_is_reported() -> None:
    clock = FakeClock()
    limiter = token_limiter(clock)
    ex = exchange(b"\x00 not json", "/v1/audio/transcriptions")
    ledger = ledger_for(ex)
    assert ledger.tokens == 0
    ledger.leases.append(limiter.try_acquire(ledger.tokens))
    body = orjson.dumps({"text": "hi", "usage": {"input_tokens": 9, "output_tokens": 1}})
    await drain(ledger.watch(Response(200, Headers(), chunks(body))))
    assert level(limiter) == 10_000 - 10


async def test_the_model_that_answered_is_read_from_the_response_not_the_request() -> None:
    ex = exchange()
    prices = {"m": Price.model_validate({"input_per_mtok": 1e6, "output_per_mtok": 1e6})}
    ledger = ledger_for(ex, prices=prices)
    body = orjson.dumps(
        {"model": "m-2024-07-18", "usage": {"prompt_tokens": 2, "completion_tokens": 1}}
    )
    await drain(ledger.watch(Response(200, Headers(), chunks(body))))
    assert ex.model == "m-2024-07-18"  # no estimate was needed to learn it
    assert ex.cost_usd == pytest.approx(3.0)  # priced by the longest price-name prefix


@pytest.mark.parametrize(
    "record",
    [
        {"model": "gpt-x", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
        {"type": "message_start", "message": {"model": "gpt-x", "usage": {"input_tokens": 1}}},
    ],
)
async def test_stream_usage_records_name_the_model(record: dict[str, Any]) -> None:
    ex = exchange({**CHAT, "stream": True})
    ledger = ledger_for(ex)
    headers = Headers([("content-type", "text/event-stream")])
    await drain(ledger.watch(Response(200, headers, chunks(sse(record)))))
    assert ex.model == "gpt-x" and ex.tokens is not None

"""Token buckets, limiters and budgets: driven by a fake clock, no sockets, no sleeps."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest

from sidecar.config.model import Budget, Limits
from sidecar.policies.budget import BudgetExceeded, BudgetTracker
from sidecar.policies.ratelimit import (
    Lease,
    Limiter,
    LimitExceeded,
    TokenBucket,
    format_duration,
    merge_headers,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def loop_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """A fake clock that is also the running loop's clock, so call_later follows it."""
    loop = asyncio.get_running_loop()
    fake = FakeClock(loop.time())
    monkeypatch.setattr(loop, "time", fake)
    return fake


async def settle() -> None:
    """Let ready callbacks and woken tasks run (due timers fire on the first pass)."""
    for _ in range(5):
        await asyncio.sleep(0)


def limits(**kw: object) -> Limits:
    return Limits.model_validate(kw)


# -- TokenBucket ---------------------------------------------------------------------------


def test_bucket_starts_full_and_refills_continuously(clock: FakeClock) -> None:
    bucket = TokenBucket(2.0, 10.0, clock=clock)
    assert bucket.level == 10.0
    assert bucket.try_take(10) == 0.0
    assert bucket.level == 0.0
    clock.advance(1.5)
    assert bucket.level == pytest.approx(3.0)
    clock.advance(100)
    assert bucket.level == 10.0  # capped at the capacity


def test_bucket_try_take_reports_wait_and_takes_nothing(clock: FakeClock) -> None:
    bucket = TokenBucket(2.0, 10.0, clock=clock)
    bucket.try_take(8)
    assert bucket.try_take(5) == pytest.approx(1.5)
    assert bucket.level == pytest.approx(2.0)
    clock.advance(1.5)
    assert bucket.try_take(5) == 0.0
    assert bucket.level == pytest.approx(0.0)


def test_bucket_refund_is_capped(clock: FakeClock) -> None:
    bucket = TokenBucket(1.0, 10.0, clock=clock)
    bucket.try_take(4)
    bucket.refund(3)
    assert bucket.level == 9.0
    bucket.refund(50)
    assert bucket.level == 10.0


def test_bucket_charge_makes_debt_that_delays_later_takers(clock: FakeClock) -> None:
    bucket = TokenBucket(1.0, 10.0, clock=clock)
    bucket.charge(15)
    assert bucket.level == -5.0
    assert bucket.try_take(1) == pytest.approx(6.0)
    assert bucket.try_take(0) == pytest.approx(5.0)  # even nothing waits for the debt
    clock.advance(6)
    assert bucket.try_take(1) == 0.0


def test_bucket_admits_oversized_take_when_full_and_goes_into_debt(clock: FakeClock) -> None:
    bucket = TokenBucket(1.0, 10.0, clock=clock)
    bucket.try_take(1)
    assert bucket.try_take(25) == pytest.approx(1.0)  # waits for a full bucket, not forever
    clock.advance(1)
    assert bucket.try_take(25) == 0.0
    assert bucket.level == pytest.approx(-15.0)


def test_bucket_reset_after_and_rejects_bad_values(clock: FakeClock) -> None:
    bucket = TokenBucket(2.0, 10.0, clock=clock)
    assert bucket.reset_after_s() == 0.0
    bucket.try_take(6)
    assert bucket.reset_after_s() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        bucket.try_take(-1)
    with pytest.raises(ValueError):
        TokenBucket(0, 10)
    with pytest.raises(ValueError):
        TokenBucket(1, 0)


def test_bucket_ignores_a_clock_going_backwards(clock: FakeClock) -> None:
    bucket = TokenBucket(1.0, 10.0, clock=clock)
    bucket.try_take(10)
    clock.advance(-5)
    clock.advance(5)
    assert bucket.level == 0.0


def test_bucket_reconfigure_keeps_level_clamped(clock: FakeClock) -> None:
    bucket = TokenBucket(1.0, 10.0, clock=clock)
    bucket.try_take(4)
    bucket.reconfigure(5.0, 100.0)
    assert (bucket.level, bucket.capacity, bucket.rate_per_s) == (6.0, 100.0, 5.0)
    clock.advance(2)
    assert bucket.level == pytest.approx(16.0)
    bucket.reconfigure(1.0, 3.0)
    assert bucket.level == 3.0


# -- Limiter: reject mode ------------------------------------------------------------------


def test_requests_rate_and_burst_then_reject_with_headers(clock: FakeClock) -> None:
    limiter = Limiter("upstream:a", limits(requests={"per_s": 2}), clock=clock)
    first = limiter.try_acquire(0)
    assert first.headers == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "500ms",
    }
    limiter.try_acquire(0)
    with pytest.raises(LimitExceeded) as info:
        limiter.try_acquire(0)
    exc = info.value
    assert (exc.scope, exc.limit) == ("upstream:a", "requests")
    assert exc.retry_after_s == 1.0  # 0.5 s, but never advertise less than a second
    assert exc.headers["retry-after"] == "1"
    assert exc.headers["x-ratelimit-remaining-requests"] == "0"
    assert exc.headers["x-ratelimit-reset-requests"] == "1s"
    clock.advance(0.5)
    limiter.try_acquire(0)


def test_per_min_rate_refills_per_second(clock: FakeClock) -> None:
    limiter = Limiter("r", limits(requests={"per_min": 60, "burst": 1}), clock=clock)
    limiter.try_acquire(0)
    with pytest.raises(LimitExceeded):
        limiter.try_acquire(0)
    clock.advance(1)
    limiter.try_acquire(0)


async def test_reject_mode_acquire_raises_at_once(clock: FakeClock) -> None:
    limiter = Limiter("r", limits(requests={"per_s": 1}), clock=clock)
    await limiter.acquire(0)
    with pytest.raises(LimitExceeded) as info:
        await limiter.acquire(0)
    assert info.value.limit == "requests"
    assert limiter.queued == 0


def test_tokens_reservation_is_refunded_on_reconcile(clock: FakeClock) -> None:
    limiter = Limiter("t", limits(tokens={"per_min": 600, "burst": 1000}), clock=clock)
    lease = limiter.try_acquire(800)
    assert lease.headers["x-ratelimit-remaining-tokens"] == "200"
    assert lease.headers["x-ratelimit-reset-tokens"] == "1m20s"
    lease.reconcile(300)
    assert limiter.snapshot()["tokens"] == {
        "level": 700.0,
        "capacity": 1000.0,
        "rate_per_s": 10.0,
        "reset_after_s": 30.0,
    }
    lease.reconcile(0)  # idempotent: the first reconcile counts
    lease.release()
    assert limiter.headers()["x-ratelimit-remaining-tokens"] == "700"


def test_overrun_is_charged_as_debt(clock: FakeClock) -> None:
    limiter = Limiter("t", limits(tokens={"per_min": 600, "burst": 1000}), clock=clock)
    lease = limiter.try_acquire(100)
    lease.reconcile(1100)
    lease.release()
    assert limiter.headers()["x-ratelimit-remaining-tokens"] == "0"
    with pytest.raises(LimitExceeded) as info:
        limiter.try_acquire(1)
    assert info.value.limit == "tokens"
    assert info.value.retry_after_s == pytest.approx(10.1)
    assert info.value.headers["retry-after"] == "11"
    clock.advance(10.1)
    limiter.try_acquire(1)


def test_both_buckets_are_taken_atomically(clock: FakeClock) -> None:
    limiter = Limiter(
        "a",
        limits(requests={"per_s": 1, "burst": 5}, tokens={"per_min": 60, "burst": 100}),
        clock=clock,
    )
    limiter.try_acquire(100)
    with pytest.raises(LimitExceeded) as info:
        limiter.try_acquire(50)  # tokens refuse: the request bucket must not be charged
    assert info.value.limit == "tokens"
    assert limiter.headers()["x-ratelimit-remaining-requests"] == "4"

    limiter = Limiter(
        "b",
        limits(requests={"per_s": 1, "burst": 1}, tokens={"per_min": 60, "burst": 100}),
        clock=clock,
    )
    limiter.try_acquire(10)
    with pytest.raises(LimitExceeded) as info:
        limiter.try_acquire(10)  # requests refuse: the token bucket must not be charged
    assert info.value.limit == "requests"
    assert limiter.headers()["x-ratelimit-remaining-tokens"] == "90"


def test_the_longest_wait_names_the_limit(clock: FakeClock) -> None:
    limiter = Limiter(
        "a",
        limits(requests={"per_s": 1, "burst": 1}, tokens={"per_min": 60, "burst": 10}),
        clock=clock,
    )
    limiter.try_acquire(10)
    with pytest.raises(LimitExceeded) as info:
        limiter.try_acquire(5)
    assert info.value.limit == "tokens"
    assert info.value.retry_after_s == pytest.approx(5.0)


def test_max_in_flight_caps_concurrency_and_release_is_idempotent(clock: FakeClock) -> None:
    limiter = Limiter("c", limits(max_in_flight=2), clock=clock)
    first, _second = limiter.try_acquire(0), limiter.try_acquire(0)
    with pytest.raises(LimitExceeded) as info:
        limiter.try_acquire(0)
    assert (info.value.limit, info.value.headers) == ("in_flight", {"retry-after": "1"})
    first.release()
    first.release()
    assert limiter.in_flight == 1
    limiter.try_acquire(0)
    with pytest.raises(LimitExceeded):
        limiter.try_acquire(0)


def test_cancel_gives_back_request_tokens_and_slot(clock: FakeClock) -> None:
    limiter = Limiter(
        "x",
        limits(
            requests={"per_s": 1, "burst": 3}, tokens={"per_min": 60, "burst": 100}, max_in_flight=1
        ),
        clock=clock,
    )
    lease = limiter.try_acquire(40)
    lease.cancel()
    lease.cancel()
    assert limiter.in_flight == 0
    headers = limiter.headers()
    assert headers["x-ratelimit-remaining-requests"] == "3"
    assert headers["x-ratelimit-remaining-tokens"] == "100"


def test_unlimited_limiter_always_admits(clock: FakeClock) -> None:
    limiter = Limiter("none", limits(), clock=clock)
    leases = [limiter.try_acquire(10**9) for _ in range(100)]
    assert leases[0].headers == {}
    assert limiter.in_flight == 100


def test_negative_tokens_are_refused(clock: FakeClock) -> None:
    with pytest.raises(ValueError):
        Limiter("x", limits(), clock=clock).try_acquire(-1)


def test_snapshot_is_json_and_repr_shows_state(clock: FakeClock) -> None:
    limiter = Limiter(
        "tenant:acme",
        limits(requests={"per_s": 5}, tokens={"per_min": 6000}, max_in_flight=4),
        clock=clock,
    )
    limiter.try_acquire(1000)
    snap = limiter.snapshot()
    json.dumps(snap)
    assert snap["in_flight"] == 1
    assert snap["max_in_flight"] == 4
    assert snap["queued"] == 0
    assert snap["requests"] == {
        "level": 4.0,
        "capacity": 5.0,
        "rate_per_s": 5.0,
        "reset_after_s": 0.2,
    }
    assert repr(limiter) == (
        "<Limiter 'tenant:acme', requests 4.0/5, tokens 5000.0/6000, in_flight 1/4, queued 0>"
    )


def test_reconfigure_keeps_levels_and_in_flight(clock: FakeClock) -> None:
    limiter = Limiter("u", limits(tokens={"per_min": 600, "burst": 1000}), clock=clock)
    lease = limiter.try_acquire(700)
    limiter.reconfigure(limits(tokens={"per_min": 1200, "burst": 2000}, requests={"per_s": 1}))
    snap = limiter.snapshot()
    assert snap["tokens"] == {
        "level": 300.0,
        "capacity": 2000.0,
        "rate_per_s": 20.0,
        "reset_after_s": 85.0,
    }
    assert snap["requests"] is not None  # a new bucket starts full
    assert limiter.headers()["x-ratelimit-remaining-requests"] == "1"
    assert limiter.in_flight == 1
    limiter.reconfigure(limits(tokens={"per_min": 60, "burst": 100}))
    assert limiter.snapshot()["requests"] is None
    assert limiter.headers()["x-ratelimit-remaining-tokens"] == "100"  # clamped
    lease.release()
    assert limiter.in_flight == 0


def test_format_duration() -> None:
    assert format_duration(0) == "0s"
    assert format_duration(-3) == "0s"
    assert format_duration(0.0201) == "21ms"
    assert format_duration(1) == "1s"
    assert format_duration(1.5) == "1.5s"
    assert format_duration(8.64) == "8.64s"
    assert format_duration(360) == "6m0s"
    assert format_duration(3723) == "1h2m3s"


def test_merge_headers_keeps_the_tightest_scope() -> None:
    tenant = {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "1s",
    }
    upstream = {
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "50",
        "x-ratelimit-reset-requests": "5s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "10",
        "x-ratelimit-reset-tokens": "1m0s",
        "retry-after": "3",
    }
    assert merge_headers([tenant, upstream]) == {**upstream, **tenant}
    assert merge_headers([]) == {}


# -- Limiter: queue mode -------------------------------------------------------------------


def queue_limits(**kw: object) -> Limits:
    return limits(on_limit="queue", **kw)


async def test_queue_is_fifo_small_late_request_does_not_overtake(loop_clock: FakeClock) -> None:
    limiter = Limiter(
        "q", queue_limits(tokens={"per_min": 600, "burst": 100}, max_wait_s=30), clock=loop_clock
    )
    lease = await limiter.acquire(100)
    big = asyncio.create_task(limiter.acquire(50))
    await settle()
    small = asyncio.create_task(limiter.acquire(1))
    await settle()
    assert limiter.queued == 2
    lease.reconcile(90)  # refund 10: enough for `small`, not for `big` at the head
    await settle()
    assert not big.done() and not small.done()
    with pytest.raises(LimitExceeded):
        limiter.try_acquire(1)  # the sync path does not overtake either
    loop_clock.advance(4)  # 10 + 40 refilled: `big` fits
    await settle()
    assert big.done() and not small.done()
    loop_clock.advance(0.1)
    await settle()
    assert small.done()
    assert limiter.queued == 0
    assert limiter.in_flight == 3
    for task in (big, small):
        task.result().release()
    lease.release()


async def test_queue_wait_is_bounded(loop_clock: FakeClock) -> None:
    limiter = Limiter("q", queue_limits(max_in_flight=1, max_wait_s=2), clock=loop_clock)
    holder = await limiter.acquire(0)
    waiter = asyncio.create_task(limiter.acquire(0))
    await settle()
    loop_clock.advance(1.9)
    await settle()
    assert not waiter.done()
    loop_clock.advance(0.2)
    await settle()
    with pytest.raises(LimitExceeded) as info:
        waiter.result()
    assert info.value.limit == "queue_timeout"
    assert info.value.headers["retry-after"] == "1"
    assert limiter.queued == 0
    holder.release()
    assert limiter.in_flight == 0


async def test_queue_is_bounded_by_max_queue(loop_clock: FakeClock) -> None:
    limiter = Limiter("q", queue_limits(max_in_flight=1, max_queue=1), clock=loop_clock)
    holder = await limiter.acquire(0)
    waiter = asyncio.create_task(limiter.acquire(0))
    await settle()
    with pytest.raises(LimitExceeded) as info:
        await limiter.acquire(0)
    assert info.value.limit == "queue_full"
    holder.release()  # wakes the waiter synchronously
    await settle()
    waiter.result().release()
    assert limiter.in_flight == 0


async def test_queue_refuses_at_once_when_refill_exceeds_max_wait(loop_clock: FakeClock) -> None:
    limiter = Limiter(
        "q", queue_limits(tokens={"per_min": 60, "burst": 100}, max_wait_s=5), clock=loop_clock
    )
    await limiter.acquire(100)
    with pytest.raises(LimitExceeded) as info:
        await limiter.acquire(10)  # 10 s of refill > 5 s of patience
    assert (info.value.limit, info.value.headers["retry-after"]) == ("tokens", "10")
    assert limiter.queued == 0


async def test_cancelled_waiter_leaves_the_queue(loop_clock: FakeClock) -> None:
    limiter = Limiter("q", queue_limits(max_in_flight=1), clock=loop_clock)
    holder = await limiter.acquire(0)
    first = asyncio.create_task(limiter.acquire(0))
    second = asyncio.create_task(limiter.acquire(0))
    await settle()
    first.cancel()
    await settle()
    assert first.cancelled()
    assert limiter.queued == 1
    holder.release()
    await settle()
    lease = second.result()
    assert isinstance(lease, Lease)
    lease.release()
    assert limiter.in_flight == 0


async def test_granted_lease_of_a_cancelled_waiter_is_given_back(loop_clock: FakeClock) -> None:
    limiter = Limiter(
        "q",
        queue_limits(max_in_flight=1, tokens={"per_min": 60, "burst": 100}),
        clock=loop_clock,
    )
    holder = await limiter.acquire(10)
    waiter = asyncio.create_task(limiter.acquire(30))
    await settle()
    holder.release()  # grants the waiter before its task runs again ...
    waiter.cancel()  # ... which is then cancelled
    await settle()
    assert waiter.cancelled()
    assert limiter.in_flight == 0
    assert limiter.headers()["x-ratelimit-remaining-tokens"] == "90"


async def test_queued_waiter_is_woken_by_a_refund(loop_clock: FakeClock) -> None:
    limiter = Limiter(
        "q", queue_limits(tokens={"per_min": 60, "burst": 100}, max_wait_s=60), clock=loop_clock
    )
    lease = await limiter.acquire(100)
    waiter = asyncio.create_task(limiter.acquire(20))
    await settle()
    assert not waiter.done()
    lease.reconcile(50)
    await settle()
    waiter.result().release()
    lease.release()


async def test_reconfigure_wakes_waiters(loop_clock: FakeClock) -> None:
    limiter = Limiter("q", queue_limits(max_in_flight=1), clock=loop_clock)
    holder = await limiter.acquire(0)
    waiter = asyncio.create_task(limiter.acquire(0))
    await settle()
    limiter.reconfigure(queue_limits(max_in_flight=2))
    await settle()
    waiter.result().release()
    holder.release()
    assert limiter.in_flight == 0


# -- BudgetTracker -------------------------------------------------------------------------


def wall(year: int, month: int, day: int, hour: int = 0) -> FakeClock:
    return FakeClock(datetime(year, month, day, hour, tzinfo=UTC).timestamp())


def budget_of(**kw: float) -> Budget:
    return Budget.model_validate(kw)


def test_budget_rejects_once_spent_until_the_next_utc_day() -> None:
    clock = wall(2024, 5, 10, 23)
    budget = BudgetTracker(budget_of(per_day=1.0), clock_wall=clock)
    budget.check()
    budget.spend(0.6)
    budget.check()
    assert budget.remaining() == {"day": pytest.approx(0.4)}
    budget.spend(0.4)
    with pytest.raises(BudgetExceeded) as info:
        budget.check()
    assert (info.value.period, info.value.retry_after_s) == ("day", 3600.0)
    assert info.value.headers == {"retry-after": "3600"}
    clock.advance(3600)
    budget.check()
    assert budget.remaining() == {"day": 1.0}


def test_budget_month_rolls_over_including_december() -> None:
    clock = wall(2024, 12, 31, 12)
    budget = BudgetTracker(budget_of(per_day=10, per_month=5), clock_wall=clock)
    budget.spend(5)
    with pytest.raises(BudgetExceeded) as info:
        budget.check()
    assert (info.value.period, info.value.retry_after_s) == ("month", 12 * 3600.0)
    clock.advance(12 * 3600)
    budget.check()
    assert budget.spent() == {"day": 0.0, "month": 0.0}
    assert budget.snapshot()["month"] == "2025-01"


def test_budget_both_spent_reports_the_later_renewal() -> None:
    clock = wall(2024, 2, 10)
    budget = BudgetTracker(budget_of(per_day=1, per_month=1), clock_wall=clock)
    budget.spend(2)
    with pytest.raises(BudgetExceeded) as info:
        budget.check()
    assert info.value.period == "month"
    assert info.value.retry_after_s == 20 * 86400  # 2024 is a leap year: Feb has 29 days
    assert budget.remaining() == {"day": 0.0, "month": 0.0}


def test_budget_edge_cases() -> None:
    clock = wall(2024, 1, 1)
    BudgetTracker(budget_of(), clock_wall=clock).check()  # no limits: never refuses
    zero = BudgetTracker(budget_of(per_day=0), clock_wall=clock)
    with pytest.raises(BudgetExceeded):
        zero.check()
    budget = BudgetTracker(budget_of(per_day=1), clock_wall=clock)
    budget.spend(-5)
    budget.spend(float("nan"))
    assert budget.spent()["day"] == 0.0
    budget.spend(0.5)
    budget.reconfigure(budget_of(per_day=0.5))
    with pytest.raises(BudgetExceeded):
        budget.check()
    json.dumps(budget.snapshot())
    assert "day $0.5000/0.5" in repr(budget)

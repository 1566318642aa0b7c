"""Circuit breaker state machine: driven by a fake clock, no sockets, no sleeps."""

from __future__ import annotations

import asyncio
import gc
import json
import logging

import pytest

from sidecar.config.model import Breaker
from sidecar.policies.breaker import (
    BreakerState,
    CircuitBreaker,
    Outcome,
    Permit,
    Transition,
)

CLOSED, HALF_OPEN, OPEN = BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def settings(**kw: object) -> Breaker:
    return Breaker.model_validate(kw)


def make(
    clock: FakeClock, transitions: list[Transition] | None = None, /, **kw: object
) -> CircuitBreaker:
    sink = transitions.append if transitions is not None else None
    base = settings(**{"failure_threshold": 3, "reset_timeout_s": 30, **kw})
    return CircuitBreaker("openai", base, clock=clock, on_transition=sink)


def permit(breaker: CircuitBreaker) -> Permit:
    p = breaker.acquire()
    assert p is not None
    return p


def fail(breaker: CircuitBreaker, times: int = 1, retry_after_s: float | None = None) -> None:
    for _ in range(times):
        permit(breaker).record(Outcome.FAILURE, retry_after_s)


def open_then_half_open(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker, breaker.settings.failure_threshold)
    clock.advance(breaker.settings.reset_timeout_s)
    assert breaker.state is HALF_OPEN


def test_opens_after_exactly_failure_threshold_failures(clock: FakeClock) -> None:
    seen: list[Transition] = []
    b = make(clock, seen)
    fail(b, 2)
    assert b.state is CLOSED and seen == []
    fail(b)
    assert b.state is OPEN
    assert seen == [Transition("openai", CLOSED, OPEN, "3 consecutive failure(s)", clock.now)]


def test_success_resets_the_count(clock: FakeClock) -> None:
    b = make(clock)
    fail(b, 2)
    permit(b).record(Outcome.SUCCESS)
    fail(b, 2)
    assert b.state is CLOSED and b.snapshot()["failures"] == 2


def test_rejects_while_open_and_counts_rejections(clock: FakeClock) -> None:
    b = make(clock)
    fail(b, 3)
    assert b.acquire() is None
    clock.advance(29.9)
    assert b.acquire() is None
    assert b.rejections == 2
    assert b.retry_after_s() == pytest.approx(0.1)


def test_half_open_once_the_reset_timeout_elapsed(clock: FakeClock) -> None:
    seen: list[Transition] = []
    b = make(clock, seen)
    fail(b, 3)
    clock.advance(30)
    assert b.state is HALF_OPEN and b.retry_after_s() == 0.0
    assert seen[-1] == Transition("openai", OPEN, HALF_OPEN, "open period elapsed", clock.now)


def test_half_open_admits_a_bounded_probe(clock: FakeClock) -> None:
    b = make(clock)
    open_then_half_open(b, clock)
    trial = b.acquire()
    assert trial is not None
    assert b.acquire() is None
    assert b.rejections == 1 and b.snapshot()["half_open_in_flight"] == 1


def test_half_open_max_requests_is_the_bound(clock: FakeClock) -> None:
    b = make(clock, half_open_max_requests=2)
    open_then_half_open(b, clock)
    trials = [b.acquire(), b.acquire(), b.acquire()]
    assert [t is not None for t in trials] == [True, True, False]


async def test_concurrent_requests_in_half_open_get_one_trial(clock: FakeClock) -> None:
    # pybreaker's `with calling(): await ...` lets all five through.
    b = make(clock)
    open_then_half_open(b, clock)
    gate = asyncio.Event()
    admitted = 0

    async def request() -> None:
        nonlocal admitted
        p = b.acquire()
        if p is None:
            return
        admitted += 1
        await gate.wait()
        p.record(Outcome.SUCCESS)

    async with asyncio.TaskGroup() as tg:
        for _ in range(5):
            tg.create_task(request())
        await asyncio.sleep(0)
        gate.set()
    assert admitted == 1 and b.rejections == 4 and b.state is CLOSED


def test_first_trial_success_closes(clock: FakeClock) -> None:
    seen: list[Transition] = []
    b = make(clock, seen, half_open_max_requests=2)
    open_then_half_open(b, clock)
    first, second = permit(b), permit(b)
    first.record(Outcome.SUCCESS)
    assert b.state is CLOSED and b.snapshot()["failures"] == 0
    assert seen[-1].reason == "trial request succeeded"
    second.record(Outcome.FAILURE)  # now an ordinary closed-state failure
    assert b.state is CLOSED and b.snapshot()["failures"] == 1


def test_trial_failure_reopens_for_a_full_period(clock: FakeClock) -> None:
    seen: list[Transition] = []
    b = make(clock, seen)
    open_then_half_open(b, clock)
    permit(b).record(Outcome.FAILURE)
    assert b.state is OPEN and b.retry_after_s() == 30
    assert (seen[-1].from_state, seen[-1].reason) == (HALF_OPEN, "trial request failed")


@pytest.mark.parametrize("outcome", [Outcome.NEUTRAL, Outcome.CANCELLED])
def test_neutral_or_cancelled_trial_frees_the_slot(clock: FakeClock, outcome: Outcome) -> None:
    b = make(clock)
    open_then_half_open(b, clock)
    permit(b).record(outcome)
    assert b.state is HALF_OPEN
    assert b.acquire() is not None


def test_release_and_dropped_permits_free_the_trial_slot(clock: FakeClock) -> None:
    b = make(clock)
    open_then_half_open(b, clock)
    permit(b).release()
    trial = permit(b)
    del trial
    gc.collect()
    assert b.snapshot()["half_open_in_flight"] == 0
    assert b.acquire() is not None and b.state is HALF_OPEN


def test_cancelled_does_not_count(clock: FakeClock) -> None:
    b = make(clock)
    fail(b, 2)
    for _ in range(10):
        permit(b).record(Outcome.CANCELLED)
    assert b.state is CLOSED and b.snapshot()["failures"] == 2
    fail(b)
    assert b.state is OPEN


async def test_cancelled_tasks_do_not_open_the_breaker(clock: FakeClock) -> None:
    # pybreaker's `calling()` counts the CancelledError as a failure.
    b = make(clock, failure_threshold=1)

    async def request() -> None:
        p = permit(b)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            p.record(Outcome.CANCELLED)
            raise

    for _ in range(3):
        task = asyncio.create_task(request())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert b.state is CLOSED and b.snapshot()["failures"] == 0


def test_neutral_does_not_reset_the_count(clock: FakeClock) -> None:
    # pybreaker treats an `exclude`d error as a success and resets the counter.
    b = make(clock)
    fail(b, 2)
    permit(b).record(Outcome.NEUTRAL)
    fail(b)
    assert b.state is OPEN


def test_retry_after_lengthens_the_open_period(clock: FakeClock) -> None:
    seen: list[Transition] = []
    b = make(clock, seen, failure_threshold=1)
    fail(b, retry_after_s=120)
    assert b.retry_after_s() == 120
    assert seen[-1].reason == "1 consecutive failure(s), upstream Retry-After 120s"
    clock.advance(30)
    assert b.state is OPEN
    clock.advance(90)
    assert b.state is HALF_OPEN


def test_retry_after_earlier_in_the_failure_run_still_applies(clock: FakeClock) -> None:
    b = make(clock)
    fail(b, retry_after_s=100)
    clock.advance(10)
    fail(b, 2)
    assert b.retry_after_s() == 90


def test_shorter_retry_after_than_reset_timeout_does_not_shorten(clock: FakeClock) -> None:
    b = make(clock, failure_threshold=1)
    fail(b, retry_after_s=5)
    assert b.retry_after_s() == 30


def test_a_late_failure_never_shortens_the_open_deadline(clock: FakeClock) -> None:
    b = make(clock)
    early = [permit(b) for _ in range(3)]  # issued while closed
    fail(b, 3, retry_after_s=120)
    clock.advance(10)
    early[0].record(Outcome.FAILURE)
    early[1].record(Outcome.FAILURE, retry_after_s=5)
    assert b.retry_after_s() == 110
    early[2].record(Outcome.FAILURE, retry_after_s=300)  # but may lengthen it
    assert b.retry_after_s() == 300


def test_a_late_failure_does_not_reopen_a_half_open_breaker(clock: FakeClock) -> None:
    b = make(clock)
    early = permit(b)
    open_then_half_open(b, clock)
    trial = permit(b)
    early.record(Outcome.FAILURE, retry_after_s=60)
    assert b.state is HALF_OPEN
    trial.record(Outcome.SUCCESS)
    assert b.state is CLOSED


def test_record_is_idempotent(clock: FakeClock) -> None:
    b = make(clock)
    p = permit(b)
    for _ in range(5):
        p.record(Outcome.FAILURE)
    assert b.snapshot()["failures"] == 1


def test_reconfigure_keeps_state(clock: FakeClock) -> None:
    b = make(clock)
    fail(b, 3)
    b.reconfigure(settings(failure_threshold=10, reset_timeout_s=5))
    assert b.state is OPEN and b.retry_after_s() == 30  # the running deadline is kept
    clock.advance(30)
    permit(b).record(Outcome.SUCCESS)
    fail(b, 9)
    assert b.state is CLOSED
    fail(b)
    assert b.state is OPEN and b.retry_after_s() == 5


def test_reconfigure_keeps_the_failure_count(clock: FakeClock) -> None:
    b = make(clock)
    fail(b, 2)
    b.reconfigure(settings(failure_threshold=3, reset_timeout_s=60))
    fail(b)
    assert b.state is OPEN and b.retry_after_s() == 60


def test_disabled_breaker_never_opens(clock: FakeClock) -> None:
    seen: list[Transition] = []
    b = make(clock, seen, enabled=False, failure_threshold=1)
    for _ in range(20):
        fail(b, retry_after_s=60)
    assert b.state is CLOSED and seen == [] and b.rejections == 0


def test_disabling_an_open_breaker_closes_it(clock: FakeClock) -> None:
    seen: list[Transition] = []
    b = make(clock, seen)
    fail(b, 3)
    b.reconfigure(settings(enabled=False))
    assert b.state is CLOSED and seen[-1].reason == "breaker disabled"
    assert b.acquire() is not None


def test_a_raising_listener_is_logged_not_raised(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(_: Transition) -> None:
        raise RuntimeError("listener bug")

    b = CircuitBreaker("openai", settings(failure_threshold=1), clock=clock, on_transition=boom)
    with caplog.at_level(logging.ERROR):
        fail(b)
    assert b.state is OPEN
    assert "on_transition callback failed" in caplog.text


def test_snapshot_is_json_and_describes_the_state(clock: FakeClock) -> None:
    b = make(clock)
    assert b.snapshot()["last_transition_reason"] is None
    fail(b, 3)
    clock.advance(10)
    assert b.acquire() is None
    snap = json.loads(json.dumps(b.snapshot()))
    assert snap == {
        "upstream": "openai",
        "enabled": True,
        "state": "open",
        "failures": 3,
        "threshold": 3,
        "last_transition_reason": "3 consecutive failure(s)",
        "last_transition_at": 1000.0,
        "last_transition_age_s": 10.0,
        "opens_until": 20.0,
        "half_open_in_flight": 0,
        "rejections": 1,
    }
    assert repr(b) == "<CircuitBreaker 'openai' open, 3/3 failures, trial in 20.0s>"


@pytest.mark.parametrize(
    ("status", "error_kind", "failure_on", "expected"),
    [
        (200, None, None, Outcome.SUCCESS),
        (204, None, None, Outcome.SUCCESS),
        (304, None, None, Outcome.SUCCESS),
        (400, None, None, Outcome.NEUTRAL),
        (401, None, None, Outcome.NEUTRAL),
        (404, None, None, Outcome.NEUTRAL),
        (429, None, None, Outcome.NEUTRAL),
        (429, None, ("429",), Outcome.FAILURE),
        (500, None, None, Outcome.FAILURE),
        (503, None, None, Outcome.FAILURE),
        (503, None, ("timeout",), Outcome.NEUTRAL),
        (None, "timeout", None, Outcome.FAILURE),
        (None, "timeout", ("5xx",), Outcome.NEUTRAL),
        (None, "connect_error", None, Outcome.FAILURE),
        (None, "connect_error", ("5xx",), Outcome.NEUTRAL),
        (None, "reset", None, Outcome.FAILURE),
        (200, "reset", None, Outcome.FAILURE),
        (None, "reset", ("timeout",), Outcome.NEUTRAL),
        (None, None, None, Outcome.NEUTRAL),
    ],
)
def test_classify(
    clock: FakeClock,
    status: int | None,
    error_kind: str | None,
    failure_on: tuple[str, ...] | None,
    expected: Outcome,
) -> None:
    kw: dict[str, object] = {} if failure_on is None else {"failure_on": failure_on}
    assert make(clock, **kw).classify(status, error_kind) is expected

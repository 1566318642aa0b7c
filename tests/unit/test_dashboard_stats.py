"""Rolling per-upstream statistics of the live dashboard, on a hand-driven clock."""

from __future__ import annotations

from typing import Any

from sidecar.admin.stats import WINDOW_S, LiveStats, Rolling, _limit_fill, is_failure, table
from sidecar.events import (
    BreakerTransitioned,
    EventBus,
    FellBack,
    Retried,
    UpstreamAttempted,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def attempt(upstream: str, status: int, error: str | None = None, seconds: float = 0.1) -> Any:
    return UpstreamAttempted(upstream, "r", status, error, seconds)


def test_failures_rejections_and_latency_over_the_window():
    clock, events = Clock(), EventBus()
    stats = LiveStats(events, clock)
    for ms in range(1, 101):  # 100 successes, 1..100 ms
        events.emit(attempt("a", 200, seconds=ms / 1000))
    events.emit(attempt("a", 503))
    events.emit(attempt("a", 0, "timeout"))
    events.emit(attempt("a", 400))  # the client's fault: not a failure
    events.emit(attempt("a", 0, "circuit_open"))  # refused: not judged
    events.emit(Retried("r", "a", "503"))
    events.emit(FellBack("r", "a", "b"))
    summary = stats.upstreams["a"].summary()
    assert summary["requests"] == 104 and summary["rejected"] == 1
    assert summary["failures"] == 2 and summary["error_pct"] == round(200 / 103, 1)
    assert summary["retries"] == 1 and summary["fallbacks"] == 1
    assert summary["rate_per_s"] == 10.4
    # 103 latencies judged (1..100 ms, and three of 100 ms): the 52nd is the median
    assert summary["latency_ms"]["p50"] == 52.0 and summary["latency_ms"]["max"] == 100.0
    clock.now += WINDOW_S + 1  # the window moves on; the totals stay
    later = stats.upstreams["a"].summary()
    assert later["requests"] == 0 and later["error_pct"] == 0.0
    assert later["latency_ms"]["p50"] is None
    assert later["total"] == 104 and later["total_failures"] == 2 and later["total_rejected"] == 1


def test_buckets_per_second_keep_only_the_window():
    clock = Clock()
    rolling = Rolling(clock)
    for _ in range(30):
        rolling.current().count += 1
        clock.now += 1
    assert len(rolling.window()) == WINDOW_S - 1
    assert rolling.summary()["requests"] == WINDOW_S - 1


def test_failure_kinds():
    assert is_failure(500, None) and is_failure(429, None) and is_failure(0, "reset")
    assert not is_failure(404, None) and not is_failure(200, None)
    assert not is_failure(0, "circuit_open") and not is_failure(0, "rate_limited")


def test_transitions_newest_first():
    events = EventBus()
    stats = LiveStats(events, Clock())
    events.emit(BreakerTransitioned("a", "closed", "open", "3 consecutive failure(s)"))
    events.emit(BreakerTransitioned("a", "open", "half_open", "open period elapsed"))
    assert [t["to"] for t in stats.transitions] == ["open", "half_open"]


def test_limit_fill():
    limiter = {
        "requests": {"level": 2.5, "capacity": 10.0},
        "tokens": {"level": -5.0, "capacity": 1000.0},  # in debt: full
        "in_flight": 3,
        "max_in_flight": 4,
        "queued": 0,
        "max_queue": None,
    }
    assert _limit_fill(limiter) == [
        {"limit": "requests", "fill": 0.75, "capacity": 10.0},
        {"limit": "tokens", "fill": 1.0, "capacity": 1000.0},
        {"limit": "in_flight", "fill": 0.75},
    ]
    assert _limit_fill(None) == []


def test_table():
    report = {
        "version": "1.2.3",
        "uptime_s": 12.0,
        "window_s": 10,
        "config": {"hash": "abc", "last_error": {"message": "bad"}},
        "upstreams": [
            {
                "name": "primary",
                "breaker": {"state": "half_open", "next_trial_in_s": None},
                "rate_per_s": 1.5,
                "error_pct": 50.0,
                "rejected": 3,
                "latency_ms": {"p50": 12.5, "p99": None},
                "inflight": 2,
                "pool": {"active": 1, "idle": 4},
                "limits": [{"limit": "requests", "fill": 0.5}],
            }
        ],
    }
    lines = table(report).splitlines()
    assert lines[0].startswith("llm-sidecar 1.2.3, up 12s, config abc (LAST RELOAD FAILED)")
    assert lines[2].split() == [
        "primary",
        "HALF-OPEN",
        "-",
        "1.5",
        "50.0",
        "3",
        "12.5",
        "-",
        "2",
        "1/4",
        "50%",
    ]

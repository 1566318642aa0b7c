"""Provider-header pacing: driven by fake clocks, no sockets, no sleeps."""

from __future__ import annotations

import pytest

from sidecar.http.message import Headers
from sidecar.policies.pacing import ProviderPacer, parse_duration


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def pacer(clock: FakeClock, wall: FakeClock) -> ProviderPacer:
    return ProviderPacer(clock=clock, wall=wall)


def h(**fields: str) -> Headers:
    return Headers([(k.replace("_", "-"), v) for k, v in fields.items()])


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("20ms", 0.02),
        ("1.5s", 1.5),
        ("6m0s", 360.0),
        ("1h2m3s", 3723.0),
        ("7.66s", 7.66),
        ("2", 2.0),
        ("0.25", 0.25),
        ("", None),
        (None, None),
        ("soon", None),
        ("5x", None),
        ("1s junk", None),
    ],
)
def test_parse_duration(text: str | None, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_no_news_means_no_pacing(pacer: ProviderPacer) -> None:
    assert pacer.admit(10_000) == 0.0
    pacer.observe(200, h(content_type="application/json"))
    assert pacer.admit(10_000) == 0.0
    assert not pacer.tracks_tokens


def test_remaining_requests_are_counted_down_then_wait_until_reset(
    pacer: ProviderPacer, clock: FakeClock
) -> None:
    pacer.observe(200, h(x_ratelimit_remaining_requests="2", x_ratelimit_reset_requests="3s"))
    assert pacer.admit(0) == 0.0
    assert pacer.admit(0) == 0.0
    assert pacer.admit(0) == pytest.approx(3.0)  # no limit given: wait for the reset itself
    clock.advance(2.0)
    assert pacer.admit(0) == pytest.approx(1.0)
    clock.advance(1.0)
    assert pacer.admit(0) == 0.0  # reset passed: the window is forgotten
    assert pacer.admit(0) == 0.0


def test_with_a_limit_the_window_refills_continuously(
    pacer: ProviderPacer, clock: FakeClock
) -> None:
    # 60 requests per minute, none left, full again in 60 s: one comes back every second.
    pacer.observe(
        200,
        h(
            x_ratelimit_limit_requests="60",
            x_ratelimit_remaining_requests="0",
            x_ratelimit_reset_requests="1m0s",
        ),
    )
    assert pacer.admit(0) == pytest.approx(1.0)
    clock.advance(1.0)
    assert pacer.admit(0) == 0.0
    assert pacer.admit(0) == pytest.approx(1.0)  # the admitted request was counted


def test_tokens_window_holds_a_request_larger_than_what_is_left(
    pacer: ProviderPacer, clock: FakeClock
) -> None:
    pacer.observe(
        200,
        h(
            x_ratelimit_limit_tokens="10000",
            x_ratelimit_remaining_tokens="500",
            x_ratelimit_reset_tokens="9.5s",  # 9500 tokens back in 9.5 s: 1000/s
        ),
    )
    assert pacer.tracks_tokens
    assert pacer.admit(400) == 0.0  # fits; 100 left
    assert pacer.admit(600) == pytest.approx(0.5)
    clock.advance(0.5)
    assert pacer.admit(600) == 0.0
    # More than the whole bucket: goes at the reported reset (full again), not never.
    assert pacer.admit(50_000) == pytest.approx(9.0)


def test_anthropic_headers_with_rfc3339_reset(
    pacer: ProviderPacer, clock: FakeClock, wall: FakeClock
) -> None:
    from datetime import UTC, datetime

    reset = datetime.fromtimestamp(wall.now + 4, UTC).isoformat().replace("+00:00", "Z")
    pacer.observe(
        200,
        h(
            anthropic_ratelimit_requests_remaining="0",
            anthropic_ratelimit_requests_reset=reset,
            anthropic_ratelimit_tokens_remaining="90000",
            anthropic_ratelimit_tokens_reset=reset,
            anthropic_ratelimit_input_tokens_remaining="10",
            anthropic_ratelimit_input_tokens_reset=reset,
        ),
    )
    assert pacer.admit(0) == pytest.approx(4.0)
    snap = pacer.snapshot()
    assert snap["tokens"]["remaining"] == 10  # type: ignore[index]  # the tighter input window


def test_429_retry_after_blocks_until_then(pacer: ProviderPacer, clock: FakeClock) -> None:
    pacer.observe(429, h(retry_after="7"))
    assert pacer.admit(0) == pytest.approx(7.0)
    pacer.observe(200, h(retry_after="100"))  # only a 429 says "not before"
    clock.advance(7.0)
    assert pacer.admit(0) == 0.0


def test_newer_headers_replace_the_estimate(pacer: ProviderPacer, clock: FakeClock) -> None:
    pacer.observe(200, h(x_ratelimit_remaining_requests="0", x_ratelimit_reset_requests="20s"))
    assert pacer.admit(0) > 0
    pacer.observe(200, h(x_ratelimit_remaining_requests="5", x_ratelimit_reset_requests="20s"))
    assert pacer.admit(0) == 0.0


def test_malformed_headers_are_ignored(pacer: ProviderPacer) -> None:
    pacer.observe(
        200,
        h(
            x_ratelimit_remaining_requests="lots",
            x_ratelimit_reset_requests="1s",
            x_ratelimit_remaining_tokens="0",
            x_ratelimit_reset_tokens="whenever",
            anthropic_ratelimit_requests_remaining="0",
            anthropic_ratelimit_requests_reset="not-a-date",
        ),
    )
    assert pacer.admit(100) == 0.0
    assert "requests" not in repr(pacer)

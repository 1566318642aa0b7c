"""Circuit breaker of one upstream: a synchronous state machine on an injected clock, no I/O.

The pipeline calls `acquire()` before it connects (None: fail fast, nothing is sent upstream)
and reports how the request ended on the returned `Permit`. CLOSED counts consecutive failures;
at the threshold it opens for max(reset_timeout_s, Retry-After); after that the first `acquire()`
moves it to HALF_OPEN, which admits at most `half_open_max_requests` concurrent trials. The first
trial success closes it, a trial failure reopens it. NEUTRAL (a 4xx) and CANCELLED (the client
went away) change nothing. Outcomes of permits that are not current trials never reopen a
half-open breaker and never shorten an open deadline (a Retry-After may lengthen it).
Native rather than on pybreaker: see docs/ARCHITECTURE.md. One event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import logging
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.config.model import Breaker
from sidecar.events import BreakerRejected
from sidecar.exchange import Exchange
from sidecar.http.message import Headers, Response
from sidecar.upstream.errors import UpstreamError

if TYPE_CHECKING:
    from sidecar.pipeline import Handler
    from sidecar.runtime import UpstreamRuntime

log = logging.getLogger(__name__)


class BreakerState(enum.IntEnum):
    """State of a breaker; the value is what `llm_sidecar_circuit_state` reports."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Outcome(enum.Enum):
    """How one permitted request ended, as far as the breaker is concerned."""

    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"  # says nothing about upstream health (a 4xx): the count is kept
    CANCELLED = "cancelled"  # the client went away before the upstream answered


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change, handed to `on_transition` (metrics, logs); `at` is the breaker's clock."""

    upstream: str
    from_state: BreakerState
    to_state: BreakerState
    reason: str
    at: float


class Permit:
    """Leave to send one request upstream; report how it ended with `record()`.

    Only the first `record()` (or `release()`) counts. A half-open trial slot is held while the
    permit is alive and unrecorded. `release()` is `record(Outcome.NEUTRAL)`; a permit dropped
    without either also frees its slot, since the breaker holds trials only weakly.
    """

    __slots__ = ("_breaker", "_done", "trial", "__weakref__")

    def __init__(self, breaker: CircuitBreaker, trial: bool = False) -> None:
        self._breaker = breaker
        self._done = False
        self.trial = trial  # a half-open trial: only these are ever in the breaker's WeakSet

    def record(self, outcome: Outcome, retry_after_s: float | None = None) -> None:
        """Report the outcome; `retry_after_s` (from a 429/503) only matters for FAILURE."""
        if not self._done:
            self._done = True
            self._breaker._record(self, outcome, retry_after_s)

    def release(self) -> None:
        """Give the permit back without a verdict (same as `record(Outcome.NEUTRAL)`)."""
        self.record(Outcome.NEUTRAL)


class CircuitBreaker:
    """The breaker of one upstream; kept across config reloads, retuned with `reconfigure()`."""

    def __init__(
        self,
        upstream: str,
        settings: Breaker,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[Transition], None] | None = None,
    ) -> None:
        self.upstream = upstream
        self.rejections = 0
        self._settings = settings
        self._clock = clock
        self._on_transition = on_transition
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._open_until = 0.0  # when OPEN: the clock value from which a trial may go
        self._backoff_until = 0.0  # while CLOSED: latest Retry-After deadline of this failure run
        self._trials: weakref.WeakSet[Permit] = weakref.WeakSet()
        self._last: Transition | None = None

    @property
    def settings(self) -> Breaker:
        return self._settings

    @property
    def state(self) -> BreakerState:
        """The current state; an elapsed open period turns into HALF_OPEN here, lazily."""
        if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
            self._move(BreakerState.HALF_OPEN, "open period elapsed")
        return self._state

    def acquire(self) -> Permit | None:
        """A permit to send, or None (open, or all trial slots taken): a counted rejection."""
        if not self._settings.enabled:
            return Permit(self)
        state = self.state
        if state is BreakerState.CLOSED:
            return Permit(self)
        if (
            state is BreakerState.HALF_OPEN
            and len(self._trials) < self._settings.half_open_max_requests
        ):
            permit = Permit(self, trial=True)
            self._trials.add(permit)
            return permit
        self.rejections += 1
        return None

    def retry_after_s(self) -> float:
        """Seconds until a trial may be admitted; 0 unless OPEN (also when trial slots are full)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._open_until - self._clock())

    def classify(self, status: int | None, error_kind: str | None) -> Outcome:
        """Outcome of a response status or transport error, per `settings.failure_on`.

        A transport error wins over the status. "reset" (the upstream died mid-stream) and any
        unknown error kind count like a 5xx. 1xx-3xx succeed; a 4xx other than 429 is neutral;
        a failure kind not in `failure_on` is neutral too, so it never resets the count.
        """
        kind: str
        if error_kind is not None:
            kind = error_kind if error_kind in ("timeout", "connect_error") else "5xx"
        elif status is None:
            return Outcome.NEUTRAL
        elif status == 429:
            kind = "429"
        elif status >= 500:
            kind = "5xx"
        elif status >= 400:
            return Outcome.NEUTRAL
        else:
            return Outcome.SUCCESS
        return Outcome.FAILURE if kind in self._settings.failure_on else Outcome.NEUTRAL

    def snapshot(self) -> dict[str, object]:
        """JSON-able description for the admin API (`GET /upstreams`)."""
        state, now, last = self.state, self._clock(), self._last
        return {
            "upstream": self.upstream,
            "enabled": self._settings.enabled,
            "state": state.name.lower(),
            "failures": self._failures,
            "threshold": self._settings.failure_threshold,
            "last_transition_reason": last.reason if last else None,
            "last_transition_at": last.at if last else None,
            "last_transition_age_s": round(now - last.at, 3) if last else None,
            "opens_until": (
                round(self._open_until - now, 3) if state is BreakerState.OPEN else None
            ),
            "half_open_in_flight": len(self._trials),
            "rejections": self.rejections,
        }

    def reconfigure(self, settings: Breaker) -> None:
        """Take new settings and keep the state: a running open deadline and trials stay as
        they are, a new threshold applies from the next failure. Disabling closes the breaker."""
        self._settings = settings
        if not settings.enabled:
            self._failures = 0
            self._backoff_until = 0.0
            if self._state is not BreakerState.CLOSED:
                self._move(BreakerState.CLOSED, "breaker disabled")

    def __repr__(self) -> str:
        state = self.state
        detail = f"{self._failures}/{self._settings.failure_threshold} failures"
        if state is BreakerState.OPEN:
            detail += f", trial in {self.retry_after_s():.1f}s"
        elif state is BreakerState.HALF_OPEN:
            detail += f", {len(self._trials)}/{self._settings.half_open_max_requests} trials"
        return f"<CircuitBreaker {self.upstream!r} {state.name.lower()}, {detail}>"

    def _record(self, permit: Permit, outcome: Outcome, retry_after_s: float | None) -> None:
        state = self.state
        was_trial = False
        if permit.trial:  # WeakSet look-ups make a weakref each: only trials are in there
            was_trial = permit in self._trials
            self._trials.discard(permit)
        if not self._settings.enabled or outcome in (Outcome.NEUTRAL, Outcome.CANCELLED):
            return
        if state is BreakerState.CLOSED and outcome is Outcome.SUCCESS:
            self._failures, self._backoff_until = 0, 0.0  # the common case: no clock needed
            return
        now = self._clock()
        backoff = 0.0
        if outcome is Outcome.FAILURE and retry_after_s is not None:
            if math.isfinite(retry_after_s) and retry_after_s > 0:
                backoff = now + retry_after_s
        if state is BreakerState.CLOSED:
            self._failures += 1
            self._backoff_until = max(self._backoff_until, backoff)
            if self._failures >= self._settings.failure_threshold:
                self._open(f"{self._failures} consecutive failure(s)", now)
        elif state is BreakerState.OPEN:
            if outcome is Outcome.FAILURE:  # a late failure may lengthen, never shorten
                self._open_until = max(self._open_until, backoff)
        elif was_trial:
            if outcome is Outcome.SUCCESS:
                self._failures = 0
                self._move(BreakerState.CLOSED, "trial request succeeded")
            else:
                self._backoff_until = backoff
                self._open("trial request failed", now)
        # else: HALF_OPEN and not a current trial (sent before the circuit opened): the trial
        # alone decides, so this outcome is ignored.

    def _open(self, reason: str, now: float) -> None:
        until = now + self._settings.reset_timeout_s
        if self._backoff_until > until:
            until = self._backoff_until
            reason += f", upstream Retry-After {until - now:g}s"
        self._open_until = max(self._open_until, until)
        self._backoff_until = 0.0
        self._move(BreakerState.OPEN, reason)

    def _move(self, to_state: BreakerState, reason: str) -> None:
        transition = Transition(self.upstream, self._state, to_state, reason, self._clock())
        self._state = to_state
        self._trials = weakref.WeakSet()
        self._last = transition
        level = logging.WARNING if to_state is BreakerState.OPEN else logging.INFO
        log.log(
            level,
            "circuit %s: %s -> %s (%s)",
            self.upstream,
            transition.from_state.name,
            to_state.name,
            reason,
        )
        if self._on_transition is not None:
            try:
                self._on_transition(transition)
            except Exception:
                log.exception("on_transition callback failed for upstream %s", self.upstream)


# The pipeline stage ------------------------------------------------------------------------------

# Enum .name is a descriptor call; this runs on every attempt.
_STATE_NAMES = {state: state.name.lower() for state in BreakerState}
_MID_STREAM_FAILURES = frozenset({"upstream_reset", "upstream_timeout", "upstream_protocol"})


class CircuitOpen(Exception):
    """Raised by the breaker stage instead of calling the upstream: fail fast, no connection."""

    def __init__(self, upstream: str, retry_after_s: float) -> None:
        super().__init__(f"circuit breaker for upstream {upstream!r} is open")
        self.upstream = upstream
        self.retry_after_s = retry_after_s


def parse_retry_after(headers: Headers) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class BreakerStage:
    """Upstream-tier stage: ask the breaker, fail fast when open, report every outcome.

    Failures visible in the response head (5xx, 429, transport errors) are recorded at once.
    A success is recorded when the body has been relayed to its end, so a stream that the
    upstream cuts midway counts as a failure, and a client that leaves counts as neither.
    """

    def __init__(self, upstream: UpstreamRuntime) -> None:
        self.upstream = upstream
        self.breaker = upstream.breaker

    async def __call__(self, exchange: Exchange, call_next: Handler) -> Response:
        breaker = self.breaker
        permit = breaker.acquire()
        if permit is None:
            exchange.breaker = "rejected"
            self.upstream.events.emit(BreakerRejected(self.upstream.name))
            raise CircuitOpen(self.upstream.name, breaker.retry_after_s())
        exchange.breaker = _STATE_NAMES[breaker.state]
        try:
            response = await call_next(exchange)
        except UpstreamError as exc:
            permit.record(breaker.classify(None, exc.kind))
            raise
        except asyncio.CancelledError:
            permit.record(Outcome.CANCELLED)
            raise
        except BaseException:
            permit.release()
            raise
        outcome = breaker.classify(response.status, None)
        if outcome is Outcome.FAILURE:
            permit.record(outcome, parse_retry_after(response.headers))
            return response
        status = response.status

        def verdict(ex: Exchange) -> None:
            if ex.client_gone:
                permit.record(Outcome.CANCELLED)
            elif ex.error in _MID_STREAM_FAILURES and ex.upstream is self.upstream:
                permit.record(Outcome.FAILURE)
            else:
                permit.record(breaker.classify(status, None))

        exchange.on_finish(verdict)
        return response

"""Rate limits of one scope (an upstream, a route or a tenant): requests, LLM tokens, concurrency.

State without I/O, as aiolimiter: buckets read time from an injected clock, so tests drive time
by hand. A :class:`Limiter` holds one ``limits`` block. The rate-limit stage acquires a
:class:`Lease` from every scope that applies (reserving 1 request and the token estimate in one
atomic step per scope), forwards the request, reconciles each lease with the real usage and
releases it in ``finally``. A scope that refuses raises :class:`LimitExceeded`; the stage then
``cancel()``s the leases it already holds, so a refused request costs nothing anywhere.

Queue mode waits FIFO: the head of the queue blocks everyone behind it, so a small late request
never overtakes a large early one. Waiters are woken synchronously when capacity comes back
(release, refund) and by one loop timer for refill, computed from the injected clock; the loop
clock and the injected clock must agree (both ``time.monotonic`` in production, both the fake
clock in tests). One event loop; not thread-safe.

Headers (names lower-case, as everywhere in the sidecar): ``x-ratelimit-limit-<r>`` is the
bucket capacity, ``x-ratelimit-remaining-<r>`` its level rounded down (0 while in debt), and
``x-ratelimit-reset-<r>`` the time until it is full again, written as OpenAI does ("20ms",
"1.5s", "6m0s", "1h2m3s"); ``<r>`` is ``requests`` or ``tokens``, present only when that bucket
is configured. ``retry-after`` is whole seconds rounded up, at least 1.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from sidecar.config.model import Limits

Clock = Callable[[], float]
LimitName = Literal["requests", "tokens", "in_flight", "queue_full", "queue_timeout"]
_EPSILON = 1e-9  # float slack: a refill computed to the exact wait may land a hair short
_MIN_TIMER_S = 0.001
_REQUEST_HEADERS = tuple(f"x-ratelimit-{kind}-requests" for kind in ("limit", "remaining", "reset"))
_TOKEN_HEADERS = tuple(f"x-ratelimit-{kind}-tokens" for kind in ("limit", "remaining", "reset"))


class TokenBucket:
    """Continuous-refill token bucket: `capacity` at most, `rate_per_s` back per second.

    Starts full. :meth:`charge` may push the level below zero (debt); takers then wait until
    the refill has paid it back. A take larger than the capacity is admitted once the bucket is
    full and leaves it in debt, so an oversized request is delayed, never refused forever.
    """

    __slots__ = ("_rate", "_capacity", "_level", "_last", "_clock", "capacity_text")

    def __init__(
        self, rate_per_s: float, capacity: float, *, clock: Clock = time.monotonic
    ) -> None:
        _check(rate_per_s, capacity)
        self._rate = rate_per_s
        self._capacity = capacity
        self.capacity_text = _number(capacity)  # x-ratelimit-limit-*, on every response
        self._level = capacity
        self._clock = clock
        self._last = clock()

    @property
    def rate_per_s(self) -> float:
        return self._rate

    @property
    def capacity(self) -> float:
        return self._capacity

    @property
    def level(self) -> float:
        """Tokens available now; negative while in debt."""
        return self._refill()

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` could be taken (0.0: now); takes nothing."""
        if amount < 0:
            raise ValueError(f"amount must be >= 0, got {amount}")
        level = self._refill()
        need = min(amount, self._capacity)
        if level + _EPSILON >= need:
            return 0.0
        return (need - level) / self._rate

    def has_room(self, amount: float) -> bool:
        """Refill, then whether `amount` could be taken now (the admission fast path)."""
        now = self._clock()
        level = self._level
        if now > self._last:
            level = self._level = min(self._capacity, level + (now - self._last) * self._rate)
            self._last = now
        return level + _EPSILON >= (amount if amount < self._capacity else self._capacity)

    def try_take(self, amount: float) -> float:
        """Take `amount` and return 0.0, or return the seconds until it could be (nothing taken)."""
        wait = self.wait_s(amount)
        if wait == 0.0:
            self._level -= amount
        return wait

    def charge(self, amount: float) -> None:
        """Take `amount` unconditionally; the level may go negative (an overrun becomes debt)."""
        self._refill()
        self._level -= amount

    def refund(self, amount: float) -> None:
        """Give `amount` back, up to the capacity."""
        self._level = min(self._capacity, self._refill() + amount)

    def reset_after_s(self) -> float:
        """Seconds until the bucket is full."""
        return max(0.0, (self._capacity - self._refill()) / self._rate)

    def reconfigure(self, rate_per_s: float, capacity: float) -> None:
        """New rate and capacity (config reload); the level is kept, clamped to the capacity."""
        _check(rate_per_s, capacity)
        self._refill()
        self._rate = rate_per_s
        self._capacity = capacity
        self.capacity_text = _number(capacity)
        self._level = min(self._level, capacity)

    def snapshot(self) -> dict[str, object]:
        level = self._refill()
        return {
            "level": round(level, 3),
            "capacity": self._capacity,
            "rate_per_s": self._rate,
            "reset_after_s": round(self.reset_after_s(), 3),
        }

    def __repr__(self) -> str:
        return f"<TokenBucket {self._refill():.1f}/{self._capacity:g} +{self._rate:g}/s>"

    def _refill(self) -> float:
        now = self._clock()
        if now > self._last:
            self._level = min(self._capacity, self._level + (now - self._last) * self._rate)
            self._last = now
        return self._level


def _check(rate_per_s: float, capacity: float) -> None:
    if not (rate_per_s > 0 and capacity > 0):
        raise ValueError(f"rate and capacity must be > 0, got {rate_per_s}, {capacity}")


class LimitExceeded(Exception):
    """A scope refused a request: map to 429 with `headers` (x-ratelimit-* and retry-after)."""

    def __init__(
        self, scope: str, limit: LimitName, retry_after_s: float, headers: dict[str, str]
    ) -> None:
        super().__init__(f"{scope}: {limit} limit reached, retry after {retry_after_s:.3g}s")
        self.scope = scope
        self.limit: LimitName = limit
        self.retry_after_s = retry_after_s
        self.headers = headers


class Lease:
    """One admitted request at one scope: 1 request and `tokens` reserved, one in-flight slot.

    Call :meth:`release` exactly once, in ``finally``. :meth:`reconcile` with the real usage
    when it is known (refunds the unused reservation, charges an overrun as debt); without it the
    whole estimate stays charged, the safe default when usage is unknown. :meth:`cancel` undoes
    everything for a request that was never sent. All three are idempotent.
    """

    __slots__ = ("_limiter", "tokens", "headers", "_reconciled", "_released")

    def __init__(self, limiter: Limiter, tokens: int, headers: dict[str, str]) -> None:
        self._limiter = limiter
        self.tokens = tokens
        self.headers = headers  # x-ratelimit-* after this request, for the response
        self._reconciled = False
        self._released = False

    def reconcile(self, actual_tokens: int) -> None:
        """Settle the reservation with the real token count; only the first call counts."""
        if not self._reconciled:
            self._reconciled = True
            if self._limiter._tokens is not None:  # a requests-only limit has nothing to settle
                self._limiter._adjust_tokens(self.tokens - max(0, actual_tokens))

    def release(self) -> None:
        """Free the in-flight slot (and wake waiters)."""
        if not self._released:
            self._released = True
            self._limiter._release_slot()

    def body_done(self, completed: bool) -> None:
        """The response body ended (see ``Response.watch``): free the slot."""
        self.release()

    def cancel(self) -> None:
        """The request never went out: give back the request, the reservation and the slot."""
        if not self._released:
            self._limiter._refund_request()
            self.reconcile(0)
            self.release()


@dataclass(eq=False, slots=True)
class _Waiter:
    tokens: int
    future: asyncio.Future[Lease]


class Limiter:
    """One ``limits`` block at one scope; kept across reloads, retuned with `reconfigure()`."""

    def __init__(self, scope: str, settings: Limits, *, clock: Clock = time.monotonic) -> None:
        self.scope = scope
        self.in_flight = 0
        self._clock = clock
        self._settings = settings
        self._requests: TokenBucket | None = None
        self._tokens: TokenBucket | None = None
        self._waiters: deque[_Waiter] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self.reconfigure(settings)

    @property
    def settings(self) -> Limits:
        return self._settings

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def is_idle(self) -> bool:
        """Nothing in flight or queued and every bucket full: as good as a new limiter, so a
        registry may drop it without changing what anyone is admitted."""
        if self.in_flight or self._waiters:
            return False
        buckets = (self._requests, self._tokens)
        return all(b is None or b.level + _EPSILON >= b.capacity for b in buckets)

    def try_acquire(self, tokens: int) -> Lease:
        """Admit now or raise :class:`LimitExceeded`: the synchronous path, reject semantics.

        Never overtakes queued waiters: while anyone waits, a newcomer is refused with the
        blocking limit of the head of the queue.
        """
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if self._waiters:
            self._dispatch()
        if self._waiters:
            limit, wait = self._blocked(self._waiters[0].tokens) or ("in_flight", 0.0)
            own = self._blocked(tokens)
            raise self._exceeded(limit, max(wait, own[1] if own else 0.0))
        blocked = self._blocked(tokens)
        if blocked is not None:
            raise self._exceeded(*blocked)
        return self._grant(tokens)

    async def acquire(self, tokens: int) -> Lease:
        """Admit, waiting FIFO in queue mode; raise :class:`LimitExceeded` when refused.

        reject: refuse at once. queue: refuse at once when the queue is full, or when the queue
        is empty and the buckets alone would need longer than ``max_wait_s``; otherwise wait
        behind earlier waiters and refuse with ``queue_timeout`` after ``max_wait_s``.
        """
        settings = self._settings
        if settings.on_limit == "reject":
            return self.try_acquire(tokens)
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if self._waiters:
            self._dispatch()
        if not self._waiters:
            blocked = self._blocked(tokens)
            if blocked is None:
                return self._grant(tokens)
            if blocked[0] != "in_flight" and blocked[1] > settings.max_wait_s:
                raise self._exceeded(*blocked)
        if len(self._waiters) >= settings.max_queue:
            raise self._exceeded("queue_full", self._wait_hint(tokens))
        loop = asyncio.get_running_loop()
        waiter = _Waiter(tokens, loop.create_future())
        self._waiters.append(waiter)
        expiry = loop.call_later(settings.max_wait_s, self._expire, waiter)
        self._dispatch()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().cancel()  # granted, but the caller is gone: give it back
            else:
                self._remove(waiter)
            raise
        finally:
            expiry.cancel()

    def snapshot(self) -> dict[str, object]:
        """JSON-able state for the admin API and dashboard: how close each limit is."""
        settings = self._settings
        return {
            "scope": self.scope,
            "on_limit": settings.on_limit,
            "requests": self._requests.snapshot() if self._requests else None,
            "tokens": self._tokens.snapshot() if self._tokens else None,
            "in_flight": self.in_flight,
            "max_in_flight": settings.max_in_flight,
            "queued": len(self._waiters),
            "max_queue": settings.max_queue if settings.on_limit == "queue" else None,
        }

    def reconfigure(self, settings: Limits) -> None:
        """Take new settings, keeping bucket levels, in-flight count and waiters.

        A bucket that appears starts full; one that disappears is dropped. Waiters keep their
        original deadline and are re-examined at once (capacity may have grown).
        """
        self._settings = settings
        self._requests = self._rebucket(
            self._requests,
            None if settings.requests is None else settings.requests.rate_per_s,
            None if settings.requests is None else settings.requests.capacity,
        )
        self._tokens = self._rebucket(
            self._tokens,
            None if settings.tokens is None else settings.tokens.rate_per_s,
            None if settings.tokens is None else settings.tokens.capacity,
        )
        pairs = ((_REQUEST_HEADERS, self._requests), (_TOKEN_HEADERS, self._tokens))
        self._header_buckets = [(names, bucket) for names, bucket in pairs if bucket is not None]
        if self._waiters:
            self._dispatch()

    def headers(self) -> dict[str, str]:
        """The x-ratelimit-* headers of the current state."""
        for _, bucket in self._header_buckets:
            bucket._refill()
        return self._headers_as_is()

    def _headers_as_is(self) -> dict[str, str]:
        # Every granted request builds these right after charging its buckets (which refilled
        # them): levels as they stand, constant names, no f-strings.
        out: dict[str, str] = {}
        for (limit, remaining, reset), bucket in self._header_buckets:
            level, capacity = bucket._level, bucket._capacity
            out[limit] = bucket.capacity_text
            left = level + _EPSILON
            out[remaining] = str(int(left)) if left > 0 else "0"  # floor, 0 while in debt
            wait = (capacity - level) / bucket._rate
            ms = math.ceil(wait * 1000 - 1e-6)  # as format_duration, inline for < 1 s
            out[reset] = f"{ms}ms" if 0 < ms < 1000 else format_duration(wait)
        return out

    def __repr__(self) -> str:
        parts = [f"<Limiter {self.scope!r}"]
        for name, bucket in (("requests", self._requests), ("tokens", self._tokens)):
            if bucket is not None:
                parts.append(f"{name} {bucket.level:.1f}/{bucket.capacity:g}")
        limit = self._settings.max_in_flight
        parts.append(f"in_flight {self.in_flight}/{limit if limit is not None else '-'}")
        parts.append(f"queued {len(self._waiters)}>")
        return ", ".join(parts)

    # -- internals -------------------------------------------------------------------------

    def _rebucket(
        self, bucket: TokenBucket | None, rate: float | None, capacity: float | None
    ) -> TokenBucket | None:
        if rate is None or capacity is None:
            return None
        if bucket is None:
            return TokenBucket(rate, capacity, clock=self._clock)
        bucket.reconfigure(rate, capacity)
        return bucket

    def _blocked(self, tokens: int) -> tuple[LimitName, float] | None:
        """What stops a request of `tokens` now and the bucket wait; None if it may go.

        Refills the buckets. The answer "go" (nearly every request) costs one refill per
        bucket; waits are computed only for a bucket that has no room.
        """
        limit = self._settings.max_in_flight
        full = limit is not None and self.in_flight >= limit
        requests, token_bucket = self._requests, self._tokens
        req_room = requests is None or requests.has_room(1)
        tok_room = token_bucket is None or token_bucket.has_room(tokens)
        if req_room and tok_room and not full:
            return None
        req_wait = 0.0 if requests is None or req_room else requests.wait_s(1)
        tok_wait = 0.0 if token_bucket is None or tok_room else token_bucket.wait_s(tokens)
        wait = max(req_wait, tok_wait)
        if full:
            return "in_flight", wait
        return ("tokens" if tok_wait >= req_wait else "requests"), wait

    def _grant(self, tokens: int) -> Lease:
        # Always called in the same synchronous step as `_blocked`, which just refilled the
        # buckets: charge without another refill (and clock read).
        if self._requests is not None:
            self._requests._level -= 1
        if self._tokens is not None:
            self._tokens._level -= tokens
        self.in_flight += 1
        return Lease(self, tokens, self._headers_as_is())

    def _wait_hint(self, tokens: int) -> float:
        blocked = self._blocked(tokens)
        return blocked[1] if blocked else 0.0

    def _exceeded(self, limit: LimitName, wait_s: float) -> LimitExceeded:
        retry_after = max(1.0, wait_s)
        headers = self.headers()
        headers["retry-after"] = str(math.ceil(retry_after - _EPSILON))
        return LimitExceeded(self.scope, limit, retry_after, headers)

    def _dispatch(self) -> None:
        """Grant waiters in FIFO order while the head fits; arm a timer for the head's refill."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiters:
            head = self._waiters[0]
            if head.future.done():  # cancelled or expired, not yet removed
                self._waiters.popleft()
                continue
            blocked = self._blocked(head.tokens)
            if blocked is None:
                self._waiters.popleft()
                head.future.set_result(self._grant(head.tokens))
                continue
            if blocked[1] > 0:
                delay = max(blocked[1], _MIN_TIMER_S)
                self._timer = head.future.get_loop().call_later(delay, self._dispatch)
            return

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.future.done():
            self._remove(waiter)
            waiter.future.set_exception(
                self._exceeded("queue_timeout", self._wait_hint(waiter.tokens))
            )

    def _remove(self, waiter: _Waiter) -> None:
        was_head = bool(self._waiters) and self._waiters[0] is waiter
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return
        if was_head:
            self._dispatch()

    def _adjust_tokens(self, delta: float) -> None:
        if self._tokens is None or delta == 0:
            return
        if delta > 0:
            self._tokens.refund(delta)
            self._dispatch()
        else:
            self._tokens.charge(-delta)

    def _refund_request(self) -> None:
        if self._requests is not None:
            self._requests.refund(1)

    def _release_slot(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        if self._waiters or self._timer is not None:
            self._dispatch()


def merge_headers(all_headers: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """Combine the headers of several scopes: per resource, those of the tightest scope.

    For requests and for tokens separately, the scope with the fewest remaining wins; the
    greatest ``retry-after`` is kept.
    """
    best: dict[str, tuple[float, Mapping[str, str]]] = {}
    retry_after: int | None = None
    for headers in all_headers:
        for name in ("requests", "tokens"):
            remaining = headers.get(f"x-ratelimit-remaining-{name}")
            if remaining is not None:
                value = float(remaining)
                if name not in best or value < best[name][0]:
                    best[name] = (value, headers)
        if "retry-after" in headers:
            retry_after = max(retry_after or 0, int(headers["retry-after"]))
    out: dict[str, str] = {}
    for name, (_, headers) in best.items():
        for kind in ("limit", "remaining", "reset"):
            key = f"x-ratelimit-{kind}-{name}"
            if key in headers:
                out[key] = headers[key]
    if retry_after is not None:
        out["retry-after"] = str(retry_after)
    return out


def format_duration(seconds: float) -> str:
    """A duration as OpenAI writes x-ratelimit-reset-*: "0s", "20ms", "1.5s", "6m0s", "1h0m0s"."""
    ms = math.ceil(seconds * 1000 - 1e-6)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"

"""Provider-header pacing: send no request an upstream has just said it would refuse.

Providers report their own rate-limit state on every response: OpenAI (and most compatible
servers) as ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` with durations such as
"6m0s", Anthropic as ``anthropic-ratelimit-{requests,tokens,input-tokens}-{limit,remaining,reset}``
with RFC 3339 instants, and a 429 adds ``retry-after``. :class:`ProviderPacer` keeps the last
word per resource as a window and answers, for the next request, "go now" or "wait this long".

A window with a known limit refills continuously, like the provider's own bucket: from the
reported remaining at the report time towards the limit at the reset time (OpenAI's reset is the
time until the bucket is full again), so a request waits only as long as the provider needs to
have room for it. Without a limit, the remaining count holds until the reset instant. Every
request admitted is counted against the windows, so concurrent requests do not all rush into
the last free slot; the next response's headers replace the estimate. After its reset a window
is forgotten: no news means no pacing.

State without I/O: an injected monotonic clock, and a wall clock only to read Anthropic's
instants. The upstream limit stage asks :meth:`ProviderPacer.admit` and waits or refuses.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Literal

from sidecar.http.message import Headers
from sidecar.policies.breaker import parse_retry_after
from sidecar.policies.ratelimit import format_duration

Clock = Callable[[], float]
Resource = Literal["requests", "tokens"]
_REPORT_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")


class _Window:
    """What the provider last said about one resource, refilled towards its limit."""

    __slots__ = ("level", "limit", "rate", "at", "reset_at")

    def __init__(self, remaining: float, limit: float | None, reset_s: float, now: float) -> None:
        self.level = remaining
        self.limit = limit
        self.at = now
        self.reset_at = now + reset_s
        gap = None if limit is None else limit - remaining
        self.rate = gap / reset_s if gap is not None and gap > 0 else None

    def level_at(self, now: float) -> float:
        if self.rate is None or self.limit is None:
            return self.level
        return min(self.limit, self.level + (now - self.at) * self.rate)

    def wait_s(self, need: float, now: float) -> float:
        if self.limit is not None:
            need = min(need, self.limit)  # an oversized request goes once the bucket is full
        level = self.level_at(now)
        if level >= need:
            return 0.0
        until_reset = self.reset_at - now
        if self.rate is None:
            return until_reset
        return min(until_reset, (need - level) / self.rate)

    def take(self, amount: float, now: float) -> None:
        self.level = self.level_at(now) - amount
        self.at = now


class ProviderPacer:
    """One upstream's rate-limit state as its responses report it; kept across reloads."""

    __slots__ = ("_clock", "_wall", "_windows", "_blocked_until")

    def __init__(self, *, clock: Clock = time.monotonic, wall: Clock = time.time) -> None:
        self._clock = clock
        self._wall = wall
        self._windows: dict[Resource, _Window] = {}
        self._blocked_until = 0.0

    @property
    def tracks_tokens(self) -> bool:
        """Whether a token window is held (only then does a request's estimate matter)."""
        return "tokens" in self._windows

    def observe(self, status: int, headers: Headers) -> None:
        """Read a response head's rate-limit headers (and Retry-After on a 429)."""
        if status != 429 and not headers.has_prefix(_REPORT_PREFIXES):
            return  # most responses (and every non-LLM one) report nothing: one scan, no clock
        now = self._clock()
        for resource in ("requests", "tokens"):
            window = self._openai(headers, resource, now) or self._anthropic(headers, resource, now)
            if window is not None:
                self._windows[resource] = window
        if status == 429:
            retry = parse_retry_after(headers)
            if retry:
                self._blocked_until = max(self._blocked_until, now + retry)

    def admit(self, tokens: int) -> float:
        """0.0: go, and the request (1, plus `tokens` estimated) is counted against the windows;
        else the seconds until the provider should have room (nothing counted)."""
        if not self._windows and not self._blocked_until:
            return 0.0
        now = self._clock()
        wait = self._blocked_until - now
        if wait <= 0:
            self._blocked_until = 0.0
            wait = 0.0
        needs: dict[Resource, float] = {"requests": 1.0, "tokens": float(max(tokens, 1))}
        for resource, window in list(self._windows.items()):
            if now >= window.reset_at:
                del self._windows[resource]
                continue
            wait = max(wait, window.wait_s(needs[resource], now))
        if wait > 0:
            return wait
        for resource, window in self._windows.items():
            window.take(needs[resource] if resource == "requests" else tokens, now)
        return 0.0

    def snapshot(self) -> dict[str, object]:
        """JSON-able state for the admin API."""
        now = self._clock()
        out: dict[str, object] = {
            "blocked_for_s": round(max(0.0, self._blocked_until - now), 3),
        }
        for resource, window in self._windows.items():
            if now < window.reset_at:
                out[resource] = {
                    "remaining": round(window.level_at(now), 1),
                    "limit": window.limit,
                    "reset_in": format_duration(window.reset_at - now),
                }
        return out

    def __repr__(self) -> str:
        return f"<ProviderPacer {self.snapshot()}>"

    def _openai(self, headers: Headers, resource: Resource, now: float) -> _Window | None:
        remaining = _number(headers.get(f"x-ratelimit-remaining-{resource}"))
        if remaining is None:
            return None
        reset = parse_duration(headers.get(f"x-ratelimit-reset-{resource}"))
        if reset is None or reset <= 0:
            return None
        limit = _number(headers.get(f"x-ratelimit-limit-{resource}"))
        return _Window(remaining, limit, reset, now)

    def _anthropic(self, headers: Headers, resource: Resource, now: float) -> _Window | None:
        # Anthropic reports tokens overall and input tokens apart; the tighter one binds.
        names = ("requests",) if resource == "requests" else ("tokens", "input-tokens")
        best: _Window | None = None
        for name in names:
            prefix = f"anthropic-ratelimit-{name}-"
            remaining = _number(headers.get(prefix + "remaining"))
            if remaining is None:
                continue
            reset = self._instant(headers.get(prefix + "reset"))
            if reset is None or reset <= 0:
                continue
            window = _Window(remaining, _number(headers.get(prefix + "limit")), reset, now)
            if best is None or window.level < best.level:
                best = window
        return best

    def _instant(self, value: str | None) -> float | None:
        """Seconds from now until an RFC 3339 instant."""
        if not value:
            return None
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
        if when.tzinfo is None:
            return None
        return when.timestamp() - self._wall()


def parse_duration(value: str | None) -> float | None:
    """Seconds of a reset duration: "20ms", "1.5s", "6m0s", "1h2m3s", or a bare number."""
    if not value:
        return None
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    total = 0.0
    end = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != end:
            return None
        amount = float(match[1])
        total += amount * {"ms": 0.001, "h": 3600.0, "m": 60.0, "s": 1.0}[match[2]]
        end = match.end()
    return total if end == len(text) and end > 0 else None


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number >= 0 else None

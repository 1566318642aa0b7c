"""Spend budget of one tenant in USD, per UTC day and per UTC month.

State without I/O: time comes from an injected wall clock (UTC windows need calendar time, not
a monotonic clock). The stage calls :meth:`BudgetTracker.check` before sending (refusing with
:class:`BudgetExceeded` once a period's spend reached its limit) and :meth:`spend` with the cost
when the usage is known. Spend is admitted before it is known, so concurrent requests can
overshoot a limit by what they cost; the next request is refused. Spend lives in memory, per
process: a restart starts from zero.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

from sidecar.config.model import Budget

Period = Literal["day", "month"]


class BudgetExceeded(Exception):
    """A tenant spent its budget for `period`; it renews in `retry_after_s` (UTC midnight)."""

    def __init__(self, period: Period, retry_after_s: float, limit_usd: float, spent_usd: float):
        super().__init__(
            f"{period} budget of ${limit_usd:g} spent (${spent_usd:.4f}); "
            f"renews in {retry_after_s:.0f}s"
        )
        self.period: Period = period
        self.retry_after_s = retry_after_s
        self.limit_usd = limit_usd
        self.spent_usd = spent_usd
        self.headers = {"retry-after": str(max(1, math.ceil(retry_after_s)))}


class BudgetTracker:
    """Spend of one tenant in the current UTC day and month; kept across config reloads."""

    def __init__(self, settings: Budget, *, clock_wall: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock_wall
        self._day = self._month = ""
        self._spent: dict[Period, float] = {"day": 0.0, "month": 0.0}
        self._roll()

    @property
    def settings(self) -> Budget:
        return self._settings

    def check(self) -> None:
        """Raise :class:`BudgetExceeded` if a period is spent (the later renewal wins)."""
        now = self._roll()
        worst: BudgetExceeded | None = None
        for period, limit in self._limits().items():
            if self._spent[period] >= limit:
                retry = (_period_end(now, period) - now).total_seconds()
                if worst is None or retry > worst.retry_after_s:
                    worst = BudgetExceeded(period, retry, limit, self._spent[period])
        if worst is not None:
            raise worst

    def spend(self, usd: float) -> None:
        """Add a request's cost to the current day and month (ignores non-positive values)."""
        self._roll()
        if usd > 0 and math.isfinite(usd):
            self._spent["day"] += usd
            self._spent["month"] += usd

    def remaining(self) -> dict[Period, float]:
        """USD left per configured period (never negative)."""
        self._roll()
        return {p: max(0.0, limit - self._spent[p]) for p, limit in self._limits().items()}

    def spent(self) -> dict[Period, float]:
        """USD spent in the current day and month."""
        self._roll()
        return dict(self._spent)

    def snapshot(self) -> dict[str, object]:
        """JSON-able state for the admin API."""
        self._roll()
        return {
            "day": self._day,
            "month": self._month,
            "spent_usd": {p: round(v, 6) for p, v in self._spent.items()},
            "limit_usd": dict(self._limits()),
        }

    def reconfigure(self, settings: Budget) -> None:
        """New limits; the spend so far is kept."""
        self._settings = settings

    def __repr__(self) -> str:
        spent = self.spent()
        limits = self._limits()
        text = ", ".join(f"{p} ${spent[p]:.4f}/{limits.get(p, '-')}" for p in ("day", "month"))
        return f"<BudgetTracker {text}>"

    def _limits(self) -> dict[Period, float]:
        limits: dict[Period, float] = {}
        if self._settings.per_day is not None:
            limits["day"] = self._settings.per_day
        if self._settings.per_month is not None:
            limits["month"] = self._settings.per_month
        return limits

    def _roll(self) -> datetime:
        now = datetime.fromtimestamp(self._clock(), UTC)
        day, month = now.strftime("%Y-%m-%d"), now.strftime("%Y-%m")
        if day != self._day:
            self._day, self._spent["day"] = day, 0.0
        if month != self._month:
            self._month, self._spent["month"] = month, 0.0
        return now


def _period_end(now: datetime, period: Period) -> datetime:
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return start + timedelta(days=1)
    start = start.replace(day=1)
    return (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )

"""Pure pieces of the dispatcher: Retry-After parsing, backoff, the retry budget."""

from __future__ import annotations

import email.utils
import time

from sidecar.http.message import Headers
from sidecar.policies.breaker import parse_retry_after
from sidecar.policies.dispatch import MIN_RETRY_CONCURRENCY, RetryBudget


def test_retry_after_forms():
    assert parse_retry_after(Headers([("retry-after", "3")])) == 3.0
    assert parse_retry_after(Headers([("retry-after-ms", "250"), ("retry-after", "9")])) == 0.25
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < (parse_retry_after(Headers([("retry-after", date)])) or 0) <= 30
    assert parse_retry_after(Headers([("retry-after", "soon")])) is None
    assert parse_retry_after(Headers()) is None


def test_retry_budget_allows_a_floor_then_a_share_of_active_requests():
    budget = RetryBudget(percent=20)
    budget.active = 100
    budget.retrying = 19
    assert budget.allows_retry()
    budget.retrying = 20
    assert not budget.allows_retry()
    budget.active = 1
    budget.retrying = MIN_RETRY_CONCURRENCY - 1
    assert budget.allows_retry()
    budget.retrying = MIN_RETRY_CONCURRENCY
    assert not budget.allows_retry()

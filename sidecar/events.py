"""Typed events that policies and the listener emit, and the bus that metrics and logs subscribe to.

Policies never import prometheus or the logger: they emit an event, and subscribers (the
metrics module, the access log, the audit log) turn it into what they need. Subscribers are
called synchronously and must be cheap; one that raises is logged, never propagated.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from sidecar.exchange import Exchange

log = logging.getLogger("sidecar.events")
E = TypeVar("E")


# The two events of every request are NamedTuples: immutable like the frozen dataclasses below,
# but built at a third of the cost (a frozen dataclass sets each field through object.__setattr__).
class RequestFinished(NamedTuple):
    exchange: Exchange


@dataclass(frozen=True, slots=True)
class ConfigReloaded:
    ok: bool
    text_hash: str | None
    error: str | None
    changes: dict[str, list[str]]


@dataclass(frozen=True, slots=True)
class BreakerTransitioned:
    """A circuit breaker changed state (states: closed, half_open, open)."""

    upstream: str
    from_state: str
    to_state: str
    reason: str


@dataclass(frozen=True, slots=True)
class BreakerRejected:
    """A request was refused by an open (or saturated half-open) breaker, no connection made."""

    upstream: str


@dataclass(frozen=True, slots=True)
class Retried:
    route: str
    upstream: str
    reason: str


@dataclass(frozen=True, slots=True)
class FellBack:
    route: str
    from_upstream: str
    to_upstream: str


class UpstreamAttempted(NamedTuple):
    """One attempt against one upstream ended at its response head (or failed before it).

    ``status`` is the response status (0 when there was none); ``error`` the failure kind:
    an UpstreamError kind (connect_error, timeout, reset, protocol, pool_exhausted),
    ``circuit_open`` (refused by the breaker), or another stage's refusal kind.
    """

    upstream: str
    route: str
    status: int
    error: str | None
    seconds: float


@dataclass(frozen=True, slots=True)
class AuditWritten:
    """The audit log wrote ``records`` records in one batch; ``lost`` more were dropped
    (``error`` is the failed write's errno name, or ``backlog`` when the queue overflowed)."""

    records: int
    lost: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class TunnelOpened:
    """A CONNECT tunnel was established (``mode``: blind or intercept)."""

    host: str
    mode: str


@dataclass(frozen=True, slots=True)
class TunnelClosed:
    """A tunnel ended; bytes_in went client -> upstream, bytes_out upstream -> client.

    ``reason``: closed, idle, reset or cancelled. Byte counts are 0 for intercepted tunnels,
    whose requests are measured one by one like base-URL traffic.
    """

    host: str
    mode: str
    bytes_in: int
    bytes_out: int
    duration_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class EgressRefused:
    """A proxy request or CONNECT was refused: ``reason`` is host_not_allowed,
    private_address or tunnel_limit (the host is not a label: clients choose it)."""

    host: str
    reason: str


@dataclass(frozen=True, slots=True)
class LimitRejected:
    """A limit refused a request before it was sent.

    ``scope``: upstream, route, tenant, or provider (pacing on the upstream's own headers);
    ``name``: the upstream, route label or tenant id; ``limit``: requests, tokens, in_flight,
    queue_full, queue_timeout, provider, budget_day or budget_month.
    """

    scope: str
    name: str
    limit: str


@dataclass(frozen=True, slots=True)
class QueueWaited:
    """A request was admitted by a queue-mode limit, or by provider pacing, after ``seconds``."""

    scope: str
    name: str
    seconds: float


@dataclass(frozen=True, slots=True)
class UsageRecorded:
    """The real LLM usage of one request, priced (``cost_usd`` None: the model has no price)."""

    upstream: str
    model: str
    tenant: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None


@dataclass(frozen=True, slots=True)
class BudgetUpdated:
    """A tenant's budget after a spend or a refusal: USD left per period (day, month)."""

    tenant: str
    remaining: dict[str, float]


class EventBus:
    """Synchronous publish/subscribe by event type."""

    def __init__(self) -> None:
        self._handlers: dict[type[Any], list[Callable[[Any], None]]] = defaultdict(list)

    def subscribe(self, event_type: type[E], handler: Callable[[E], None]) -> None:
        self._handlers[event_type].append(handler)

    def emit(self, event: object) -> None:
        handlers = self._handlers.get(type(event))
        if not handlers:
            return
        for handler in handlers:
            try:
                handler(event)
            except Exception:
                log.exception("event subscriber failed on %s", type(event).__name__)

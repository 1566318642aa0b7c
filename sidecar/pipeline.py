"""The request pipeline: the one place that says which stages run, in which order.

Every stage has the same shape, ``async def stage(exchange, call_next) -> Response``: it may
act before calling ``call_next`` (request side), after it (response side, so response filters
run in reverse order), or answer locally and stop the chain (Envoy's ``sendLocalReply``).

Two tiers, as in linkerd2-proxy:

* the **route tier** runs once per request: stages that see the whole request, ending in the
  retry/fallback dispatcher that picks upstream targets;
* the **upstream tier** runs once per attempt against one upstream: limits, then the circuit
  breaker (which fails fast, so the dispatcher can move to a fallback at once), then the pooled
  send.

To add a policy, write a module under ``sidecar/policies/`` with a stage class, and add it to
one of the two lists below. A stage whose policy the config leaves off is not built at all
(a disabled breaker, an upstream with neither limits nor pacing): every stage in the chain
costs a coroutine frame per request, so "off" must mean "absent", not "checked and skipped".
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from sidecar.exchange import Exchange
from sidecar.http.message import Response

if TYPE_CHECKING:
    from sidecar.runtime import RouteRuntime, UpstreamRuntime

Handler = Callable[[Exchange], Awaitable[Response]]


class Stage(Protocol):
    """A policy stage."""

    async def __call__(self, exchange: Exchange, call_next: Handler) -> Response: ...


def compose(stages: Sequence[Stage], terminal: Handler) -> Handler:
    """Fold ``stages`` around ``terminal`` into one handler; the first stage runs first."""
    handler = terminal
    for stage in reversed(stages):
        handler = _bind(stage, handler)
    return handler


def _bind(stage: Stage, call_next: Handler) -> Handler:
    # A partial, not a wrapper coroutine: one coroutine frame per stage per request, not two.
    return functools.partial(stage.__call__, call_next=call_next)


def route_stages(route: RouteRuntime) -> list[Stage]:
    """Route tier, outermost first."""
    from sidecar.policies.accounting import AccountingStage
    from sidecar.policies.keepalive import KeepaliveStage
    from sidecar.policies.observe import ObserveStage
    from sidecar.policies.tenancy import TenantStage

    stages: list[Stage] = [ObserveStage(route)]
    if route.config.stream.keepalive_s is not None:
        stages.append(KeepaliveStage(route))
    stages += [TenantStage(route), AccountingStage(route)]
    return stages


def upstream_stages(upstream: UpstreamRuntime) -> list[Stage]:
    """Upstream tier, outermost first."""
    from sidecar.policies.breaker import BreakerStage
    from sidecar.policies.limits import LimitStage
    from sidecar.policies.observe import AttemptStage
    from sidecar.policies.state import limits_apply

    config = upstream.config
    stages: list[Stage] = []
    if config.pacing or limits_apply(config.limits):
        stages.append(LimitStage(upstream))
    stages.append(AttemptStage(upstream))
    if config.breaker.enabled:
        stages.append(BreakerStage(upstream))
    return stages


def build_route_handler(route: RouteRuntime) -> Handler:
    from sidecar.policies.dispatch import Dispatcher

    return compose(route_stages(route), Dispatcher(route))


def build_upstream_handler(upstream: UpstreamRuntime) -> Handler:
    from sidecar.upstream.forward import Forwarder

    return compose(upstream_stages(upstream), Forwarder(upstream))

"""Policy state that outlives config reloads: limiters, budgets and provider pacers.

The :class:`~sidecar.app.Sidecar` creates one :class:`PolicyState` and passes it to every
``build_snapshot``. Stages built for a snapshot take their limiters from here, so a reload
retunes the *same* objects (``reconfigure()``): bucket levels, in-flight counts, queues, budget
spend and what providers last said survive, whether or not the upstream or route object itself
is carried over. Scopes are named ``upstream:<name>``, ``route:<label>`` and ``tenant:<id>``.

Tenant state is created on first sight of a tenant. So that a stream of made-up tenant ids
cannot grow memory without bound, idle tenant limiters (nothing in flight, buckets full: as good
as new) and budget trackers with nothing spent are dropped once more than
:data:`MAX_TRACKED_TENANTS` are held. No I/O; one event loop.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sidecar.config.model import Accounting, Budget, Config, Limits, Price, Route, Tenants
from sidecar.events import EventBus
from sidecar.policies.budget import BudgetTracker
from sidecar.policies.pacing import ProviderPacer
from sidecar.policies.ratelimit import Limiter

Clock = Callable[[], float]
DEFAULT_TENANT = "default"  # requests that name no tenant
MAX_TRACKED_TENANTS = 10_000


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """What applies to one tenant: its override's settings, else the default's."""

    limits: Limits | None
    budget: Budget | None


def tenant_policy(tenants: Tenants, tenant: str) -> TenantPolicy:
    """The limits and budget of `tenant`: an override's own keys, the default for the rest.

    An unknown tenant gets the default, never nothing; to exempt a tenant on purpose, give it
    an override with an empty ``limits: {}``.
    """
    default = tenants.default
    override = tenants.overrides.get(tenant)
    if override is None:
        return TenantPolicy(default.limits, default.budget_usd)
    return TenantPolicy(
        override.limits if override.limits is not None else default.limits,
        override.budget_usd if override.budget_usd is not None else default.budget_usd,
    )


def limits_apply(limits: Limits | None) -> bool:
    """Whether a limits block limits anything (``{}`` does not)."""
    return limits is not None and (
        limits.requests is not None or limits.tokens is not None or limits.max_in_flight is not None
    )


def budget_applies(budget: Budget | None) -> bool:
    return budget is not None and (budget.per_day is not None or budget.per_month is not None)


def route_scopes(routes: tuple[Route, ...]) -> list[str]:
    """The scope name of each route: ``route:<label>``, with ``#<index>`` if labels repeat."""
    counts = Counter(route.label for route in routes)
    return [
        f"route:{r.label}" if counts[r.label] == 1 else f"route:{r.label}#{i}"
        for i, r in enumerate(routes)
    ]


class PolicyState:
    """Registries of limiters, budget trackers and pacers, keyed by scope; see the module doc."""

    def __init__(
        self,
        events: EventBus | None = None,
        *,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
    ) -> None:
        self.events = events if events is not None else EventBus()
        self.clock = clock
        self.wall = wall
        # The settings of the last synced config, read by stages when they are built.
        self.tenants = Tenants.model_validate({})
        self.prices: Mapping[str, Price] = {}
        self.accounting = Accounting.model_validate({})
        self.route_keys: list[str] = []
        self._limiters: dict[str, Limiter] = {}  # upstream and route scopes
        self._tenant_limiters: dict[str, Limiter] = {}
        self._budgets: dict[str, BudgetTracker] = {}
        self._pacers: dict[str, ProviderPacer] = {}

    def sync(self, config: Config) -> None:
        """Adopt `config` (before building a snapshot from it): retune the scopes it keeps,
        drop those it no longer has."""
        self.tenants, self.prices, self.accounting = (
            config.tenants,
            config.prices,
            config.accounting,
        )
        self.route_keys = route_scopes(config.routes)
        wanted: dict[str, Limits] = {}
        for name, upstream in config.upstreams.items():
            if upstream.limits is not None and limits_apply(upstream.limits):
                wanted[f"upstream:{name}"] = upstream.limits
        for key, route in zip(self.route_keys, config.routes, strict=True):
            if route.limits is not None and limits_apply(route.limits):
                wanted[key] = route.limits
        _retune(self._limiters, wanted.get)
        _retune(self._tenant_limiters, lambda t: _or_none(tenant_policy(self.tenants, t).limits))
        for tenant, tracker in list(self._budgets.items()):
            budget = tenant_policy(self.tenants, tenant).budget
            if budget is None or not budget_applies(budget):
                del self._budgets[tenant]
            elif tracker.settings != budget:
                tracker.reconfigure(budget)
        for name in list(self._pacers):
            kept = config.upstreams.get(name)
            if kept is None or not kept.pacing:
                del self._pacers[name]

    def limiter(self, scope: str, settings: Limits) -> Limiter:
        """The limiter of an upstream or route scope, created or retuned to `settings`."""
        return _get(self._limiters, scope, scope, settings, self.clock)

    def tenant_limiter(self, tenant: str, settings: Limits) -> Limiter:
        """The limiter of `tenant` (its own buckets, even when its settings are the default's)."""
        limiters = self._tenant_limiters
        if tenant not in limiters and len(limiters) >= MAX_TRACKED_TENANTS:
            for key in [k for k, v in limiters.items() if v.is_idle()]:
                del limiters[key]
        return _get(limiters, tenant, f"tenant:{tenant}", settings, self.clock)

    def budget(self, tenant: str, settings: Budget) -> BudgetTracker:
        """The budget tracker of `tenant`, created or retuned to `settings`."""
        budgets = self._budgets
        tracker = budgets.get(tenant)
        if tracker is None:
            if len(budgets) >= MAX_TRACKED_TENANTS:
                for key in [k for k, v in budgets.items() if not any(v.spent().values())]:
                    del budgets[key]
            tracker = budgets[tenant] = BudgetTracker(settings, clock_wall=self.wall)
        elif tracker.settings is not settings and tracker.settings != settings:
            tracker.reconfigure(settings)
        return tracker

    def pacer(self, upstream: str) -> ProviderPacer:
        """The provider pacer of `upstream`."""
        pacer = self._pacers.get(upstream)
        if pacer is None:
            pacer = self._pacers[upstream] = ProviderPacer(clock=self.clock, wall=self.wall)
        return pacer

    def snapshot(self) -> dict[str, object]:
        """JSON-able state of every scope, for the admin API and tests."""
        limiters = {**self._limiters}
        limiters.update((f"tenant:{t}", v) for t, v in self._tenant_limiters.items())
        return {
            "limiters": {key: limiter.snapshot() for key, limiter in sorted(limiters.items())},
            "budgets": {t: tracker.snapshot() for t, tracker in sorted(self._budgets.items())},
            "pacers": {name: pacer.snapshot() for name, pacer in sorted(self._pacers.items())},
        }

    def __repr__(self) -> str:
        return (
            f"<PolicyState {len(self._limiters)} scopes, {len(self._tenant_limiters)} tenants, "
            f"{len(self._budgets)} budgets, {len(self._pacers)} pacers>"
        )


def _get(
    registry: dict[str, Limiter], key: str, scope: str, settings: Limits, clock: Clock
) -> Limiter:
    limiter = registry.get(key)
    if limiter is None:
        limiter = registry[key] = Limiter(scope, settings, clock=clock)
    elif limiter.settings is not settings and limiter.settings != settings:
        limiter.reconfigure(settings)
    return limiter


def _retune(registry: dict[str, Limiter], wanted: Callable[[str], Limits | None]) -> None:
    for key, limiter in list(registry.items()):
        settings = wanted(key)
        if settings is None:
            del registry[key]
        elif limiter.settings != settings:
            limiter.reconfigure(settings)


def _or_none(limits: Limits | None) -> Limits | None:
    return limits if limits_apply(limits) else None

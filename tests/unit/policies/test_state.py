"""Long-lived policy state: tenant resolution, registries kept across syncs, pruning."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.config.model import Config, Limits, Tenants
from sidecar.policies import state as state_module
from sidecar.policies.ratelimit import Limiter
from sidecar.policies.state import (
    PolicyState,
    limits_apply,
    route_scopes,
    tenant_policy,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def config(**extra: Any) -> Config:
    base: dict[str, Any] = {
        "upstreams": {"a": {"url": "http://a.test"}, "b": {"url": "http://b.test"}},
        "routes": [{"path_prefix": "/x", "upstreams": ["a"]}],
    }
    return Config.model_validate(base | extra)


def limits(**kw: Any) -> Limits:
    return Limits.model_validate(kw)


def test_unknown_tenants_get_the_default_and_overrides_fall_back_key_by_key() -> None:
    tenants = Tenants.model_validate(
        {
            "default": {"limits": {"requests": {"per_s": 1}}, "budget_usd": {"per_day": 5}},
            "overrides": {
                "vip": {"limits": {"requests": {"per_s": 100}}},
                "rich": {"budget_usd": {"per_day": 500}},
                "free": {"limits": {}},
            },
        }
    )
    unknown = tenant_policy(tenants, "someone")
    assert unknown.limits == tenants.default.limits and unknown.budget is not None
    vip = tenant_policy(tenants, "vip")
    assert vip.limits is not None and vip.limits.requests is not None
    assert vip.limits.requests.per_s == 100
    assert vip.budget == tenants.default.budget_usd  # not unlimited by accident
    assert tenant_policy(tenants, "rich").limits == tenants.default.limits
    free = tenant_policy(tenants, "free")
    assert free.limits is not None and not limits_apply(free.limits)  # exempt on purpose


def test_route_scopes_are_labels_made_unique() -> None:
    routes = config(
        routes=[
            {"path_prefix": "/x", "upstreams": ["a"]},
            {"name": "chat", "path_prefix": "/y", "upstreams": ["a"]},
            {"name": "chat", "host": "h.test", "upstreams": ["a"]},
        ]
    ).routes
    assert route_scopes(routes) == ["route:/x", "route:chat#1", "route:chat#2"]


def test_limiter_is_kept_and_retuned_not_replaced() -> None:
    clock = FakeClock()
    state = PolicyState(clock=clock)
    first = state.limiter("upstream:a", limits(requests={"per_s": 1, "burst": 5}))
    first.try_acquire(0).release()
    again = state.limiter("upstream:a", limits(requests={"per_s": 2, "burst": 10}))
    assert again is first
    snapshot = first.snapshot()["requests"]
    assert snapshot == {"level": 4.0, "capacity": 10.0, "rate_per_s": 2.0, "reset_after_s": 3.0}


def test_sync_retunes_kept_scopes_and_drops_removed_ones() -> None:
    state = PolicyState(clock=FakeClock())
    state.sync(
        config(
            upstreams={
                "a": {"url": "http://a.test", "limits": {"requests": {"per_s": 1}}},
                "b": {"url": "http://b.test", "limits": {"requests": {"per_s": 1}}},
            },
            routes=[{"path_prefix": "/x", "upstreams": ["a"], "limits": {"max_in_flight": 2}}],
            tenants={
                "default": {"limits": {"requests": {"per_s": 1}}, "budget_usd": {"per_day": 1}}
            },
        )
    )
    a = state.limiter("upstream:a", limits(requests={"per_s": 1}))
    state.limiter("upstream:b", limits(requests={"per_s": 1}))
    state.limiter("route:/x", limits(max_in_flight=2))
    tenant = state.tenant_limiter("t1", state.tenants.default.limits)  # type: ignore[arg-type]
    budget = state.budget("t1", state.tenants.default.budget_usd)  # type: ignore[arg-type]
    budget.spend(0.25)
    state.pacer("a")
    state.pacer("b")

    state.sync(
        config(
            upstreams={
                "a": {"url": "http://a.test", "limits": {"requests": {"per_s": 7}}},
                "b": {"url": "http://b.test", "pacing": False},
            },
            routes=[{"path_prefix": "/x", "upstreams": ["a"]}],
            tenants={
                "default": {"limits": {"requests": {"per_s": 3}}, "budget_usd": {"per_day": 2}}
            },
        )
    )
    snap = state.snapshot()
    assert set(snap["limiters"]) == {"upstream:a", "tenant:t1"}  # type: ignore[arg-type]
    assert a.settings.requests is not None and a.settings.requests.per_s == 7
    assert tenant.settings.requests is not None and tenant.settings.requests.per_s == 3
    assert state.budget("t1", state.tenants.default.budget_usd) is budget  # type: ignore[arg-type]
    assert budget.spent()["day"] == 0.25 and budget.remaining()["day"] == 1.75
    assert set(snap["pacers"]) == {"a"}  # type: ignore[arg-type]

    state.sync(config())  # no tenant limits or budgets at all
    snap = state.snapshot()
    assert snap["limiters"] == {} and snap["budgets"] == {}


def test_idle_tenants_are_pruned_past_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_module, "MAX_TRACKED_TENANTS", 3)
    state = PolicyState(clock=FakeClock())
    settings = limits(requests={"per_s": 1, "burst": 2})
    busy = state.tenant_limiter("busy", settings)
    lease = busy.try_acquire(0)  # in flight: must survive pruning
    state.tenant_limiter("idle1", settings)
    state.tenant_limiter("idle2", settings)
    state.tenant_limiter("new", settings)
    tracked = set(state.snapshot()["limiters"])  # type: ignore[arg-type]
    assert tracked == {"tenant:busy", "tenant:new"}
    assert state.tenant_limiter("busy", settings) is busy
    lease.release()


def test_limiter_is_idle_only_when_as_good_as_new() -> None:
    clock = FakeClock()
    limiter = Limiter("x", limits(requests={"per_s": 1, "burst": 2}, max_in_flight=1), clock=clock)
    assert limiter.is_idle()
    lease = limiter.try_acquire(0)
    assert not limiter.is_idle()
    lease.release()
    assert not limiter.is_idle()  # a request was taken from the bucket
    clock.now += 1
    assert limiter.is_idle()

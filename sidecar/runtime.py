"""The immutable runtime snapshot built from a validated config.

A :class:`Snapshot` holds everything a request needs: compiled routes, and one
:class:`UpstreamRuntime` per upstream (its pool, breaker, limiter and pipeline). Hot reload
builds a new snapshot and swaps one reference; a request reads the reference once and keeps its
snapshot to the end. Upstreams whose settings did not change are carried over as the same
objects, so their connections, breaker state and bucket levels survive the reload.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from sidecar.config.loader import LoadedConfig
from sidecar.config.model import Route, Upstream
from sidecar.events import BreakerTransitioned, EventBus
from sidecar.http.message import Request
from sidecar.pipeline import Handler, build_route_handler, build_upstream_handler
from sidecar.policies.breaker import CircuitBreaker, Transition
from sidecar.policies.state import PolicyState
from sidecar.upstream.pool import AddressCheck, ConnectionPool, make_origin
from sidecar.upstream.resolver import Resolver

ApiStyle = Literal["openai", "anthropic"]


def _api_style(declared: str, url: str) -> ApiStyle:
    if declared in ("openai", "anthropic"):
        return declared  # type: ignore[return-value]
    return "anthropic" if "anthropic" in url else "openai"


class UpstreamRuntime:
    """One upstream's live state: pool, breaker, limiter, and its upstream-tier handler."""

    def __init__(
        self,
        name: str,
        config: Upstream,
        pool: ConnectionPool,
        events: EventBus,
        breaker: CircuitBreaker | None = None,
        policies: PolicyState | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.pool = pool
        self.events = events
        self.policies = policies if policies is not None else PolicyState(events)
        if breaker is None:
            breaker = CircuitBreaker(name, config.breaker, on_transition=self._on_transition)
        else:
            breaker.reconfigure(config.breaker)  # carried over: keep its state
        self.breaker = breaker
        self.origin = pool.origin
        self.api: ApiStyle = _api_style(config.api, config.url)
        self.overrides = tuple(config.headers.items())
        self.override_names = frozenset(config.headers)
        self.inflight = 0
        self.retired = False
        self.handler: Handler = build_upstream_handler(self)

    def __repr__(self) -> str:
        return f"<UpstreamRuntime {self.name} {self.pool!r}>"

    def _on_transition(self, t: Transition) -> None:
        self.events.emit(
            BreakerTransitioned(
                t.upstream, t.from_state.name.lower(), t.to_state.name.lower(), t.reason
            )
        )

    def snapshot(self) -> dict[str, object]:
        return {
            "name": self.name,
            "url": self.config.url,
            "inflight": self.inflight,
            "pool": self.pool.snapshot(),
            "breaker": self.breaker.snapshot(),
            "retired": self.retired,
        }


@dataclass(frozen=True, slots=True)
class Target:
    upstream: UpstreamRuntime
    model: str | None


class RouteRuntime:
    """A compiled route: its matcher, its ordered targets, and its route-tier handler."""

    def __init__(
        self,
        index: int,
        config: Route,
        upstreams: dict[str, UpstreamRuntime],
        policies: PolicyState | None = None,
    ) -> None:
        self.index = index
        self.config = config
        self.policies = policies if policies is not None else PolicyState()
        self.label = config.label
        self.prefix = config.path_prefix
        self.host = config.host.lower() if config.host else None

        def resolve(specs: tuple[object, ...]) -> tuple[Target, ...]:
            out = []
            for spec in specs:
                name = spec if isinstance(spec, str) else spec.name  # type: ignore[attr-defined]
                model = None if isinstance(spec, str) else spec.model  # type: ignore[attr-defined]
                out.append(Target(upstreams[name], model))
            return tuple(out)

        self.targets = resolve(config.upstreams)
        self.model_targets = {glob: resolve(specs) for glob, specs in config.models.items()}
        primary = self.targets[0].upstream
        self.api: ApiStyle = primary.api if config.api == "auto" else config.api
        self.handler: Handler = build_route_handler(self)

    def __repr__(self) -> str:
        return f"<RouteRuntime {self.label} -> {[t.upstream.name for t in self.targets]}>"

    def matches_host(self, host: str) -> bool:
        if self.host is None:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host

    def upstream_path(self, target: str) -> str:
        """The path to send upstream: the route prefix stripped, the upstream's base prefixed."""
        if self.prefix and self.config.strip_prefix and self.prefix != "/":
            target = target[len(self.prefix) :] or "/"
            if target[0] == "?":
                target = "/" + target
        return target


@dataclass(slots=True)
class Snapshot:
    """Everything a request needs, built once per config version."""

    loaded: LoadedConfig
    upstreams: dict[str, UpstreamRuntime]
    routes: tuple[RouteRuntime, ...]
    loaded_at: float = field(default_factory=time.time)
    policies: PolicyState = field(default_factory=PolicyState)  # outlives the snapshot

    @property
    def config(self):  # type: ignore[no-untyped-def]
        return self.loaded.config

    def match(self, request: Request, host: str | None = None) -> RouteRuntime | None:
        """The route for a request: by host when given (proxy mode), else by path prefix."""
        if host is not None:
            for route in self.routes:
                if route.matches_host(host):
                    return route
            return None
        path = request.target
        best: RouteRuntime | None = None
        best_len = -1
        for route in self.routes:
            prefix = route.prefix
            if prefix is None:
                continue
            if prefix == "/" or (
                path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] in "/?")
            ):
                if len(prefix) > best_len:
                    best, best_len = route, len(prefix)
        return best


def _same_transport(a: Upstream, b: Upstream) -> bool:
    return a.url == b.url and a.pool == b.pool and a.tls == b.tls and a.timeouts == b.timeouts


def build_snapshot(
    loaded: LoadedConfig,
    previous: Snapshot | None,
    resolver: Resolver,
    address_check: AddressCheck | None = None,
    *,
    events: EventBus | None = None,
    on_upstream: Callable[[UpstreamRuntime, UpstreamRuntime | None], None] | None = None,
    policies: PolicyState | None = None,
) -> Snapshot:
    """Build a snapshot, carrying over unchanged upstreams (and pools of same-transport ones).

    `policies` (limiters, budgets, pacers) outlives snapshots: it is synced to the new config
    first, then the stages of new upstreams and routes take their state from it.
    """
    config = loaded.config
    if events is None:
        events = EventBus()
    if policies is None:
        policies = previous.policies if previous is not None else PolicyState(events)
    policies.sync(config)
    old = previous.upstreams if previous is not None else {}
    upstreams: dict[str, UpstreamRuntime] = {}
    for name, upstream_config in config.upstreams.items():
        before = old.get(name)
        if before is not None and before.config == upstream_config:
            upstreams[name] = before
            continue
        if before is not None and _same_transport(before.config, upstream_config):
            pool = before.pool
            pool.settings, pool.timeouts = upstream_config.pool, upstream_config.timeouts
        else:
            origin = make_origin(upstream_config.url, upstream_config.tls)
            pool = ConnectionPool(
                origin, upstream_config.pool, upstream_config.timeouts, resolver, address_check
            )
        breaker = before.breaker if before is not None else None
        runtime = UpstreamRuntime(name, upstream_config, pool, events, breaker, policies)
        if on_upstream is not None:
            on_upstream(runtime, before)
        upstreams[name] = runtime
    routes = tuple(RouteRuntime(i, r, upstreams, policies) for i, r in enumerate(config.routes))
    return Snapshot(loaded, upstreams, routes, policies=policies)


def retired_upstreams(old: Snapshot, new: Snapshot) -> list[UpstreamRuntime]:
    """Upstream runtimes of ``old`` that ``new`` no longer uses (their pools can be closed)."""
    kept = {id(u) for u in new.upstreams.values()}
    kept_pools = {id(u.pool) for u in new.upstreams.values()}
    return [u for u in old.upstreams.values() if id(u) not in kept and id(u.pool) not in kept_pools]

"""Prometheus metrics, fed by events: policies never import this module.

Each sidecar owns its own :class:`~prometheus_client.CollectorRegistry` (tests use their own,
nothing is global). Label children are bound once per label set and cached, so recording a
request costs a few dictionary lookups. What every request records (requests, latencies,
attempts, tokens, cost, the GenAI histograms) lives in :mod:`sidecar.instruments`, without
prometheus_client's locks; rarer events (reloads, breakers, tunnels, audit, budgets, limit
refusals) use prometheus_client directly. Label values come from config (routes, upstreams) or
are capped (models, tenants), so cardinality is bounded by construction.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sidecar import __version__
from sidecar.events import (
    AuditWritten,
    BreakerRejected,
    BreakerTransitioned,
    BudgetUpdated,
    ConfigReloaded,
    EgressRefused,
    EventBus,
    FellBack,
    LimitRejected,
    QueueWaited,
    RequestFinished,
    Retried,
    TunnelClosed,
    TunnelOpened,
    UpstreamAttempted,
    UsageRecorded,
)
from sidecar.genai import OTHER, GenAiMetrics, LabelCap
from sidecar.instruments import CounterChild, HistogramChild, LocklessCounter, LocklessHistogram
from sidecar.runtime import Snapshot

# No `*_created` series: they double the series count and Prometheus ignores them by default.
disable_created_metrics()  # type: ignore[no-untyped-call]

# LLM calls span milliseconds (errors, cache hits) to many minutes (long generations).
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    20,
    30,
    60,
    120,
    300,
    600,
    1200,
)
EXEMPLAR_ID_CHARS = 64  # OpenMetrics caps an exemplar's label set at 128 characters
OVERHEAD_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1,
)


ATTEMPT_ERRORS = frozenset(
    {"connect_error", "timeout", "reset", "protocol", "pool_exhausted", "circuit_open"}
)


def attempt_outcome(status: int, error: str | None) -> str:
    """The bounded ``outcome`` label of one attempt: a status class or a failure kind."""
    if error is not None:
        return error if error in ATTEMPT_ERRORS else "refused"
    if status >= 500:
        return "5xx"
    if status == 429:
        return "429"
    if status >= 400:
        return "4xx"
    return "success" if status else "refused"


class _LiveState(Collector):
    """Gauges read at scrape time from the current snapshot (in-flight, pool usage)."""

    def __init__(self, current: Callable[[], Snapshot]) -> None:
        self._current = current

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self._current()
        inflight = GaugeMetricFamily(
            "llm_sidecar_inflight_requests", "Requests in flight per upstream.", labels=["upstream"]
        )
        pool = GaugeMetricFamily(
            "llm_sidecar_upstream_connections",
            "Upstream pool connections by state (active, idle).",
            labels=["upstream", "state"],
        )
        circuit = GaugeMetricFamily(
            "llm_sidecar_circuit_state",
            "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open.",
            labels=["upstream"],
        )
        for name, upstream in snapshot.upstreams.items():
            circuit.add_metric([name], int(upstream.breaker.state))
            inflight.add_metric([name], upstream.inflight)
            pool.add_metric([name, "active"], upstream.pool.active)
            pool.add_metric([name, "idle"], upstream.pool.idle)
        yield inflight
        yield pool
        yield circuit


TUNNEL_BUCKETS = (0.1, 1, 10, 60, 300, 900, 1800, 3600, 7200, 21600)
MAX_TUNNEL_HOSTS = 100  # host labels beyond this many are reported as `other`


class EgressMetrics:
    """CONNECT tunnels and egress refusals (sidecar/egress), children bound once per host."""

    def __init__(self, events: EventBus, r: CollectorRegistry) -> None:
        self.active = Gauge(
            "llm_sidecar_tunnels_active", "Open CONNECT tunnels per host.", ["host"], registry=r
        )
        self.opened = Counter(
            "llm_sidecar_tunnels",
            "CONNECT tunnels established, by host and mode (blind, intercept).",
            ["host", "mode"],
            registry=r,
        )
        self.bytes = Counter(
            "llm_sidecar_tunnel_bytes",
            "Bytes carried by blind tunnels, counted when they close; direction in is "
            "client to upstream, out is upstream to client.",
            ["host", "direction"],
            registry=r,
        )
        self.duration = Histogram(
            "llm_sidecar_tunnel_duration_seconds",
            "How long tunnels stayed open.",
            ["host"],
            buckets=TUNNEL_BUCKETS,
            registry=r,
        )
        self.refused = Counter(
            "llm_sidecar_egress_refused",
            "Proxy requests and CONNECTs refused: host_not_allowed, private_address, tunnel_limit.",
            ["reason"],
            registry=r,
        )
        self._hosts: dict[str, tuple[Any, ...]] = {}
        events.subscribe(TunnelOpened, self._on_open)
        events.subscribe(TunnelClosed, self._on_close)
        events.subscribe(EgressRefused, lambda event: self.refused.labels(event.reason).inc())

    def _bound(self, host: str) -> tuple[Any, ...]:
        children = self._hosts.get(host)
        if children is None:
            if len(self._hosts) >= MAX_TUNNEL_HOSTS:
                return self._bound("other")
            children = self._hosts[host] = (
                self.active.labels(host),
                self.bytes.labels(host, "in"),
                self.bytes.labels(host, "out"),
                self.duration.labels(host),
            )
        return children

    def _on_open(self, event: TunnelOpened) -> None:
        self._bound(event.host)[0].inc()
        self.opened.labels(event.host if event.host in self._hosts else "other", event.mode).inc()

    def _on_close(self, event: TunnelClosed) -> None:
        active, bytes_in, bytes_out, duration = self._bound(event.host)
        active.dec()
        bytes_in.inc(event.bytes_in)
        bytes_out.inc(event.bytes_out)
        duration.observe(event.duration_s)


class _LimitState(Collector):
    """Configured limits and how full their buckets are, read at scrape time.

    ``llm_sidecar_ratelimit_per_minute`` comes from the config (every scope it names:
    upstreams, routes, the default tenant and tenant overrides), so dashboards can draw usage
    against the limit. ``llm_sidecar_ratelimit_fill_ratio`` is 1 - level/capacity of the live
    buckets of upstream and route scopes (0: untouched, 1: the next request waits or is
    refused); tenant buckets are left out, their number is not bounded by the config.
    """

    def __init__(self, current: Callable[[], Snapshot]) -> None:
        self._current = current

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self._current()
        config = snapshot.config
        per_minute = GaugeMetricFamily(
            "llm_sidecar_ratelimit_per_minute",
            "Configured rate limits per scope, in requests or tokens per minute.",
            labels=["scope", "limit"],
        )
        scopes = [(f"upstream:{n}", u.limits) for n, u in config.upstreams.items()]
        scopes += [(f"route:{r.label}", r.limits) for r in config.routes]
        scopes.append(("tenant:default", config.tenants.default.limits))
        scopes += [(f"tenant:{t}", o.limits) for t, o in config.tenants.overrides.items()]
        for scope, limits in scopes:
            if limits is None:
                continue
            if limits.requests is not None:
                per_minute.add_metric([scope, "requests"], limits.requests.rate_per_s * 60)
            if limits.tokens is not None:
                per_minute.add_metric([scope, "tokens"], limits.tokens.per_min)
        yield per_minute
        fill = GaugeMetricFamily(
            "llm_sidecar_ratelimit_fill_ratio",
            "How full each upstream and route limit is now: 0 untouched, 1 exhausted.",
            labels=["scope", "limit"],
        )
        policies = getattr(snapshot, "policies", None)
        report = policies.snapshot() if policies is not None else {}
        limiters = report.get("limiters", {}) if isinstance(report, dict) else {}
        for scope, limiter in limiters.items():
            if scope.startswith(("upstream:", "route:")) and isinstance(limiter, dict):
                for limit, ratio in _fill(limiter):
                    fill.add_metric([scope, limit], ratio)
        yield fill


def _fill(limiter: dict[str, Any]) -> Iterator[tuple[str, float]]:
    for name in ("requests", "tokens"):
        bucket = limiter.get(name)
        if isinstance(bucket, dict) and bucket.get("capacity"):
            level = float(bucket.get("level", 0.0))
            yield name, min(1.0, max(0.0, 1.0 - level / float(bucket["capacity"])))
    in_flight, most = limiter.get("in_flight"), limiter.get("max_in_flight")
    if isinstance(in_flight, int) and isinstance(most, int) and most:
        yield "in_flight", min(1.0, in_flight / most)


# requests, duration, ttfb, overhead, ttft: what one (route, upstream, code) records.
_RequestChildren = tuple[
    CounterChild, HistogramChild, HistogramChild, HistogramChild, HistogramChild
]


class Metrics:
    """The sidecar's metric set, subscribed to the event bus."""

    def __init__(
        self,
        events: EventBus,
        current: Callable[[], Snapshot],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # Registration order is exposition order: keep it when moving a metric.
        self.requests = LocklessCounter(
            "llm_sidecar_requests",
            "Requests answered, by route, upstream and status code.",
            ["route", "upstream", "code"],
            registry=r,
        )
        self.duration = LocklessHistogram(
            "llm_sidecar_request_duration_seconds",
            "Time from request received to response fully sent.",
            ["route", "upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = LocklessHistogram(
            "llm_sidecar_upstream_ttfb_seconds",
            "Time from request received to the upstream's response head.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = LocklessHistogram(
            "llm_sidecar_overhead_seconds",
            "Sidecar overhead: total duration minus time spent waiting on the upstream.",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.ttft = LocklessHistogram(
            "llm_sidecar_time_to_first_token_seconds",
            "Successful streams: time from request received to the first body chunk.",
            ["route", "upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.attempts = LocklessCounter(
            "llm_sidecar_upstream_attempts",
            "Tries against each upstream (retried and fallen-back ones too), by outcome.",
            ["upstream", "outcome"],
            registry=r,
        )
        self.audit_records = Counter(
            "llm_sidecar_audit_records",
            "Audit records written to the audit file.",
            registry=r,
        )
        self.audit_write_errors = Counter(
            "llm_sidecar_audit_write_errors",
            "Failed audit writes (disk full, I/O error); their records are lost, serving goes on.",
            registry=r,
        )
        self.audit_dropped = Counter(
            "llm_sidecar_audit_dropped_records",
            "Audit records lost: a failed write, or a backlog past the queue bound.",
            registry=r,
        )
        self.genai = GenAiMetrics(r)
        self.limits = LimitMetrics(r, events, current)
        self.proxy_errors = LocklessCounter(
            "llm_sidecar_proxy_errors",
            "Replies made or streams cut by the sidecar, by x-llm-sidecar-error kind.",
            ["route", "kind"],
            registry=r,
        )
        self.client_gone = LocklessCounter(
            "llm_sidecar_client_disconnects",
            "Requests whose client went away before the response was complete.",
            ["route"],
            registry=r,
        )
        self.reloads = Counter(
            "llm_sidecar_config_reloads",
            "Config reload attempts by result (success, error).",
            ["result"],
            registry=r,
        )
        self.last_reload = Gauge(
            "llm_sidecar_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load.",
            registry=r,
        )
        self.config_info = Gauge(
            "llm_sidecar_config_info", "1 for the active config's hash.", ["hash"], registry=r
        )
        self.circuit_transitions = Counter(
            "llm_sidecar_circuit_transitions",
            "Circuit breaker state changes.",
            ["upstream", "from_state", "to_state"],
            registry=r,
        )
        self.circuit_rejections = Counter(
            "llm_sidecar_circuit_rejections",
            "Requests refused by an open breaker without contacting the upstream.",
            ["upstream"],
            registry=r,
        )
        self.retries = Counter(
            "llm_sidecar_retries",
            "Retries by route, upstream and reason (status code or error kind).",
            ["route", "upstream", "reason"],
            registry=r,
        )
        self.fallbacks = Counter(
            "llm_sidecar_fallbacks",
            "Requests moved from one upstream to the next of their route.",
            ["route", "from_upstream", "to_upstream"],
            registry=r,
        )
        Info("llm_sidecar_build", "Build information.", registry=r).info(
            {"version": __version__, "python": platform.python_version()}
        )
        r.register(_LiveState(current))
        r.register(_LimitState(current))
        self._children: dict[tuple[str, str, int], _RequestChildren] = {}
        self._attempt_children: dict[tuple[str, int, str | None], CounterChild] = {}
        self._config_hash: str | None = None
        self.egress = EgressMetrics(events, r)
        events.subscribe(RequestFinished, self._on_request)
        events.subscribe(ConfigReloaded, self._on_reload)
        events.subscribe(AuditWritten, self._on_audit)
        events.subscribe(UpstreamAttempted, self._on_attempt)
        events.subscribe(
            BreakerTransitioned,
            lambda e: self.circuit_transitions.labels(e.upstream, e.from_state, e.to_state).inc(),
        )
        events.subscribe(
            BreakerRejected, lambda e: self.circuit_rejections.labels(e.upstream).inc()
        )
        events.subscribe(
            Retried, lambda e: self.retries.labels(e.route, e.upstream, e.reason).inc()
        )
        events.subscribe(
            FellBack,
            lambda e: self.fallbacks.labels(e.route, e.from_upstream, e.to_upstream).inc(),
        )

    def _bound(self, route: str, upstream: str, code: int) -> _RequestChildren:
        key = (route, upstream, code)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(route, upstream, str(code)),
                self.duration.labels(route, upstream),
                self.ttfb.labels(upstream),
                self.overhead.labels(route),
                self.ttft.labels(route, upstream),
            )
            self._children[key] = children
        return children

    def _on_request(self, event: RequestFinished) -> None:
        ex = event.exchange
        route = ex.route_label
        code = 499 if ex.client_gone and ex.status == 0 else ex.status
        requests, duration, ttfb, overhead, ttft = self._bound(route, ex.upstream_label, code)
        exemplar = {"request_id": ex.request_id[:EXEMPLAR_ID_CHARS]}
        requests.inc(1, exemplar)
        finished = ex.finished or ex.started
        total = finished - ex.started
        duration.observe(total, exemplar)
        if ex.ttfb is not None:
            ttfb.observe(ex.ttfb)
        if ex.ttft is not None and 200 <= code < 300 and ex.error is None:
            ttft.observe(ex.ttft, exemplar)
        self.genai.record(ex, code, total)
        if ex.upstream_started is not None:
            upstream_end = ex.upstream_ended or finished
            overhead.observe(max(0.0, total - (upstream_end - ex.upstream_started)))
        if ex.error is not None:
            self.proxy_errors.labels(route, ex.error).inc()
        if ex.client_gone:
            self.client_gone.labels(route).inc()

    def _on_attempt(self, event: UpstreamAttempted) -> None:
        key = (event.upstream, event.status, event.error)
        child = self._attempt_children.get(key)
        if child is None:
            outcome = attempt_outcome(event.status, event.error)
            child = self._attempt_children[key] = self.attempts.labels(event.upstream, outcome)
        child.inc()

    def _on_audit(self, event: AuditWritten) -> None:
        if event.records:
            self.audit_records.inc(event.records)
        if event.lost:
            self.audit_dropped.inc(event.lost)
        if event.error is not None and event.error != "backlog":
            self.audit_write_errors.inc()

    def _on_reload(self, event: ConfigReloaded) -> None:
        self.reloads.labels("success" if event.ok else "error").inc()
        if event.ok and event.text_hash:
            self.last_reload.set(time.time())
            if self._config_hash is not None and self._config_hash != event.text_hash:
                self.config_info.remove(self._config_hash)
            self.config_info.labels(event.text_hash).set(1)
            self._config_hash = event.text_hash


# Rate limits, LLM usage, cost and budgets -------------------------------------------------------

QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
MAX_UNPRICED_MODELS = 50  # model labels not named in `prices`; the rest are `other`


class LimitMetrics:
    """What the limit and accounting stages report (see docs/LIMITS.md).

    Tenants beyond ``tenants.max_label_values`` are labelled ``other``; so are models not
    named in ``prices`` beyond :data:`MAX_UNPRICED_MODELS`. A ``scope`` label is
    ``<kind>:<name>``: ``upstream:<name>``, ``route:<label>``, ``tenant:<id>`` or
    ``provider:<upstream>`` (pacing on the provider's own headers).
    """

    def __init__(
        self, registry: CollectorRegistry, events: EventBus, current: Callable[[], Snapshot]
    ) -> None:
        r = registry
        self.rejections = Counter(
            "llm_sidecar_ratelimit_rejections",
            "Requests refused by a rate limit or budget, by scope and limit.",
            ["scope", "limit"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "llm_sidecar_ratelimit_queue_wait_seconds",
            "Time admitted requests waited in a queue-mode limit or for provider pacing.",
            ["scope"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.tokens = LocklessCounter(
            "llm_sidecar_tokens",
            "LLM tokens used, as upstreams reported them, by kind (prompt, completion).",
            ["upstream", "model", "tenant", "kind"],
            registry=r,
        )
        self.cost = LocklessCounter(
            "llm_sidecar_cost_usd",
            "Spend in USD at the configured prices.",
            ["tenant", "model"],
            registry=r,
        )
        self.budget_remaining = Gauge(
            "llm_sidecar_budget_remaining_usd",
            "USD left of a tenant's budget in the current period (day, month).",
            ["tenant", "period"],
            registry=r,
        )
        self._current = current
        self._tenants = LabelCap(1)
        self._models = LabelCap(MAX_UNPRICED_MODELS)
        self._priced: frozenset[str] = frozenset()
        self._usage_children: dict[
            tuple[str, str, str], tuple[CounterChild, CounterChild, CounterChild]
        ] = {}
        self._on_reload(None)
        events.subscribe(ConfigReloaded, self._on_reload)
        events.subscribe(LimitRejected, self._on_rejected)
        events.subscribe(QueueWaited, self._on_waited)
        events.subscribe(UsageRecorded, self._on_usage)
        events.subscribe(BudgetUpdated, self._on_budget)

    def _on_reload(self, event: ConfigReloaded | None) -> None:
        config = self._current().config
        self._tenants.limit = config.tenants.max_label_values
        self._priced = frozenset(config.prices)

    def _scope(self, scope: str, name: str) -> str:
        return f"{scope}:{self._tenants(name) if scope == 'tenant' else name}"

    def _on_rejected(self, event: LimitRejected) -> None:
        self.rejections.labels(self._scope(event.scope, event.name), event.limit).inc()

    def _on_waited(self, event: QueueWaited) -> None:
        self.queue_wait.labels(self._scope(event.scope, event.name)).observe(event.seconds)

    def _on_usage(self, event: UsageRecorded) -> None:
        model = event.model if event.model in self._priced else self._models(event.model)
        key = (event.upstream, model, self._tenants(event.tenant))
        children = self._usage_children.get(key)
        if children is None:
            upstream, _, tenant = key
            children = self._usage_children[key] = (
                self.tokens.labels(upstream, model, tenant, "prompt"),
                self.tokens.labels(upstream, model, tenant, "completion"),
                self.cost.labels(tenant, model),
            )
        prompt, completion, cost = children
        prompt.inc(event.prompt_tokens)
        completion.inc(event.completion_tokens)
        if event.cost_usd:
            cost.inc(event.cost_usd)

    def _on_budget(self, event: BudgetUpdated) -> None:
        tenant = self._tenants(event.tenant)
        if tenant == OTHER:
            return  # one gauge cannot stand for many tenants
        for period, usd in event.remaining.items():
            self.budget_remaining.labels(tenant, period).set(usd)

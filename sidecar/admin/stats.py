"""Live per-upstream statistics for the built-in dashboard and ``llm-sidecar status``.

Hystrix-style: every upstream keeps one bucket per second for the last :data:`WINDOW_S`
seconds, filled from events (attempts, retries, fallbacks, requests); a report adds what the
runtime objects say about themselves right now (breaker, pool, in-flight, limits). Counting is
a few integer additions per event; percentiles are computed only when a report is asked for,
from at most :data:`SAMPLES_PER_BUCKET` latencies per second (a uniform reservoir beyond that).
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from sidecar import __version__
from sidecar.events import (
    BreakerTransitioned,
    EventBus,
    FellBack,
    RequestFinished,
    Retried,
    UpstreamAttempted,
)
from sidecar.runtime import Snapshot, UpstreamRuntime

WINDOW_S = 10
SAMPLES_PER_BUCKET = 512
TRANSITIONS_KEPT = 50
FAILURE_KINDS = frozenset({"connect_error", "timeout", "reset", "protocol", "pool_exhausted"})


class _Bucket:
    __slots__ = ("second", "count", "failures", "rejected", "retries", "fallbacks", "samples", "n")

    def __init__(self, second: int) -> None:
        self.second = second
        self.count = 0  # attempts (upstreams) or requests (routes), refused ones included
        self.failures = 0
        self.rejected = 0  # refused without contacting the upstream (breaker open, limits)
        self.retries = 0
        self.fallbacks = 0  # requests that moved away from this upstream
        self.samples: list[float] = []
        self.n = 0  # latencies seen (for the reservoir)

    def sample(self, seconds: float) -> None:
        self.n += 1
        if len(self.samples) < SAMPLES_PER_BUCKET:
            self.samples.append(seconds)
        else:
            slot = int(random.random() * self.n)  # randrange() costs 5x more, per request
            if slot < SAMPLES_PER_BUCKET:
                self.samples[slot] = seconds


class Rolling:
    """Per-second buckets over the last :data:`WINDOW_S` seconds, plus running totals."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._buckets: deque[_Bucket] = deque()
        self.total = 0
        self.total_failures = 0
        self.total_rejected = 0

    def current(self) -> _Bucket:
        second = int(self._clock())
        buckets = self._buckets
        if not buckets or buckets[-1].second != second:
            buckets.append(_Bucket(second))
            while buckets[0].second <= second - WINDOW_S:
                buckets.popleft()
        return buckets[-1]

    def window(self) -> list[_Bucket]:
        floor = int(self._clock()) - WINDOW_S
        return [b for b in self._buckets if b.second > floor]

    def summary(self) -> dict[str, Any]:
        buckets = self.window()
        count = sum(b.count for b in buckets)
        failures = sum(b.failures for b in buckets)
        rejected = sum(b.rejected for b in buckets)
        judged = count - rejected
        samples = sorted(s for b in buckets for s in b.samples)
        return {
            "rate_per_s": round(count / WINDOW_S, 2),
            "requests": count,
            "failures": failures,
            "rejected": rejected,
            "error_pct": round(100.0 * failures / judged, 1) if judged else 0.0,
            "retries": sum(b.retries for b in buckets),
            "fallbacks": sum(b.fallbacks for b in buckets),
            "latency_ms": _percentiles(samples),
            "total": self.total,
            "total_failures": self.total_failures,
            "total_rejected": self.total_rejected,
        }


def _percentiles(samples: list[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p90": None, "p99": None, "max": None}

    def at(q: float) -> float:
        return round(samples[min(len(samples) - 1, math.ceil(q * len(samples)) - 1)] * 1000, 1)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(samples[-1] * 1000, 1)}


def is_failure(status: int, error: str | None) -> bool:
    """Whether an attempt's outcome says the upstream is unhealthy (5xx, 429, transport)."""
    if error is not None:
        return error in FAILURE_KINDS
    return status >= 500 or status == 429


class LiveStats:
    """Rolling statistics per upstream and per route, fed by the event bus."""

    def __init__(self, events: EventBus, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started = clock()
        self.upstreams: dict[str, Rolling] = {}
        self.routes: dict[str, Rolling] = {}
        self.transitions: deque[dict[str, Any]] = deque(maxlen=TRANSITIONS_KEPT)
        events.subscribe(UpstreamAttempted, self._on_attempt)
        events.subscribe(Retried, self._on_retry)
        events.subscribe(FellBack, self._on_fallback)
        events.subscribe(RequestFinished, self._on_request)
        events.subscribe(BreakerTransitioned, self._on_transition)

    def _rolling(self, table: dict[str, Rolling], name: str) -> Rolling:
        rolling = table.get(name)
        if rolling is None:
            rolling = table[name] = Rolling(self._clock)
        return rolling

    def _on_attempt(self, event: UpstreamAttempted) -> None:
        rolling = self._rolling(self.upstreams, event.upstream)
        bucket = rolling.current()
        bucket.count += 1
        rolling.total += 1
        if event.status == 0 and event.error is not None and event.error not in FAILURE_KINDS:
            bucket.rejected += 1
            rolling.total_rejected += 1
            return
        if is_failure(event.status, event.error):
            bucket.failures += 1
            rolling.total_failures += 1
        bucket.sample(event.seconds)

    def _on_retry(self, event: Retried) -> None:
        self._rolling(self.upstreams, event.upstream).current().retries += 1

    def _on_fallback(self, event: FellBack) -> None:
        self._rolling(self.upstreams, event.from_upstream).current().fallbacks += 1

    def _on_request(self, event: RequestFinished) -> None:
        ex = event.exchange
        rolling = self._rolling(self.routes, ex.route_label)
        bucket = rolling.current()
        bucket.count += 1
        rolling.total += 1
        status = ex.status
        if (ex.error is not None and not ex.client_gone) or status >= 500 or status == 429:
            bucket.failures += 1
            rolling.total_failures += 1
        bucket.sample((ex.finished or ex.started) - ex.started)

    def _on_transition(self, event: BreakerTransitioned) -> None:
        self.transitions.append(
            {
                "at": time.time(),
                "upstream": event.upstream,
                "from": event.from_state,
                "to": event.to_state,
                "reason": event.reason,
            }
        )

    def report(
        self,
        snapshot: Snapshot,
        limiters: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Everything the dashboard shows, as JSON-able data (``GET /stats``)."""
        limiters = limiters or {}
        upstreams = [
            self._upstream(name, upstream, limiters.get(f"upstream:{name}"))
            for name, upstream in snapshot.upstreams.items()
        ]
        routes = []
        for route in snapshot.routes:
            summary = self._rolling(self.routes, route.label).summary()
            targets = [t.upstream.name for t in route.targets]
            routes.append({"name": route.label, "targets": targets, **summary})
        unrouted = self.routes.get("none")
        if unrouted is not None:
            routes.append({"name": "none", "targets": [], **unrouted.summary()})
        return {
            "ts": time.time(),
            "version": __version__,
            "uptime_s": round(self._clock() - self.started, 1),
            "window_s": WINDOW_S,
            "config": dict(config or {}),
            "upstreams": upstreams,
            "routes": routes,
            "transitions": list(self.transitions)[-10:][::-1],
        }

    def _upstream(
        self, name: str, upstream: UpstreamRuntime, limiter: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        summary = self._rolling(self.upstreams, name).summary()
        pool = upstream.pool
        card: dict[str, Any] = {
            "name": name,
            "url": upstream.config.url,
            "api": upstream.api,
            "inflight": upstream.inflight,
            "pool": {
                "active": pool.active,
                "idle": pool.idle,
                "max": upstream.config.pool.max_connections,
            },
            **summary,
            "breaker": _breaker(upstream),
            "limits": _limit_fill(limiter),
        }
        return card


def _breaker(upstream: UpstreamRuntime) -> dict[str, Any]:
    breaker = getattr(upstream, "breaker", None)
    if breaker is None:
        return {"state": "none", "enabled": False}
    snap = dict(breaker.snapshot())
    opens_in = snap.get("opens_until")
    snap["next_trial_in_s"] = opens_in
    snap["next_trial_at"] = None if opens_in is None else time.time() + float(opens_in)
    return snap


def _limit_fill(limiter: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """How full each limit of an upstream is, 0..1 (1: the next request waits or is refused)."""
    if not limiter:
        return []
    out: list[dict[str, Any]] = []
    for name in ("requests", "tokens"):
        bucket = limiter.get(name)
        if isinstance(bucket, Mapping) and bucket.get("capacity"):
            capacity = float(bucket["capacity"])
            level = float(bucket.get("level", capacity))
            fill = min(1.0, max(0.0, 1.0 - level / capacity))
            out.append({"limit": name, "fill": round(fill, 3), "capacity": capacity})
    in_flight, most = limiter.get("in_flight"), limiter.get("max_in_flight")
    if isinstance(in_flight, int) and isinstance(most, int) and most:
        out.append({"limit": "in_flight", "fill": round(min(1.0, in_flight / most), 3)})
    queued, max_queue = limiter.get("queued"), limiter.get("max_queue")
    if isinstance(queued, int) and isinstance(max_queue, int) and max_queue:
        out.append({"limit": "queue", "fill": round(min(1.0, queued / max_queue), 3)})
    return out


def table(report: Mapping[str, Any]) -> str:
    """The report as a terminal table, one upstream a line (``llm-sidecar status``)."""
    header: tuple[str, ...] = ("UPSTREAM", "BREAKER", "NEXT TRIAL", "RATE/S", "ERR%", "REJ")
    header += ("P50 MS", "P99 MS", "INFLIGHT", "POOL A/I", "LIMIT FILL")
    rows: list[tuple[str, ...]] = [header]
    for card in report.get("upstreams", []):
        breaker = card.get("breaker") or {}
        state = str(breaker.get("state", "none")).upper().replace("_", "-")
        trial = breaker.get("next_trial_in_s")
        latency = card.get("latency_ms") or {}
        pool = card.get("pool") or {}
        fills = card.get("limits") or []
        fill = max((f["fill"] for f in fills), default=None)
        rows.append(
            (
                str(card["name"]),
                state,
                "-" if trial is None else f"{float(trial):.1f}s",
                f"{card.get('rate_per_s', 0):g}",
                f"{card.get('error_pct', 0):.1f}",
                str(card.get("rejected", 0)),
                _num(latency.get("p50")),
                _num(latency.get("p99")),
                str(card.get("inflight", 0)),
                f"{pool.get('active', 0)}/{pool.get('idle', 0)}",
                "-" if fill is None else f"{fill * 100:.0f}%",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    config = report.get("config") or {}
    title = f"llm-sidecar {report.get('version', '?')}, up {report.get('uptime_s', 0):g}s"
    if config.get("hash"):
        title += f", config {config['hash']}"
    if config.get("last_error"):
        title += " (LAST RELOAD FAILED)"
    title += f"; rates over the last {report.get('window_s', WINDOW_S)}s"
    return "\n".join([title, *(line.rstrip() for line in lines)])


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def status_command(admin: str, as_json: bool = False, watch: float | None = None) -> int:
    """``llm-sidecar status``: fetch ``GET /stats`` from a running sidecar and print it."""
    import json
    import sys
    import urllib.error
    import urllib.request

    url = admin.rstrip("/")
    if "://" not in url:
        url = "http://" + url
    while True:
        try:
            with urllib.request.urlopen(url + "/stats", timeout=5) as response:  # noqa: S310
                report = json.load(response)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            print(f"llm-sidecar status: cannot reach {url}/stats: {exc}", file=sys.stderr)
            return 1
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            if watch:
                print("\033[H\033[2J", end="")  # clear the terminal between refreshes
            print(table(report), flush=True)
        if not watch:
            return 0
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return 0

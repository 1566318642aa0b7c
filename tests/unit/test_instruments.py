"""Lock-free instruments: bucket placement, exposition equal to prometheus_client's, and the
per-request metrics they carry, read back through a registry (no sockets)."""

from __future__ import annotations

import re

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from sidecar.config.loader import load_text
from sidecar.events import EventBus, RequestFinished, UpstreamAttempted, UsageRecorded
from sidecar.exchange import Exchange
from sidecar.http.message import Headers, Request
from sidecar.instruments import LocklessCounter, LocklessHistogram
from sidecar.metrics import Metrics
from sidecar.runtime import build_snapshot
from sidecar.upstream.resolver import Resolver

BUCKETS = (0.1, 1, 10)
# Around and on every bound, zero, a negative value and one past the last bound.
VALUES = (-1.0, 0.0, 0.05, 0.1, 0.1000001, 0.5, 1.0, 1.0000001, 10.0, 10.5, 1e6)


def histogram() -> tuple[CollectorRegistry, LocklessHistogram]:
    registry = CollectorRegistry()
    return registry, LocklessHistogram(
        "h_seconds", "A histogram.", ["route"], buckets=BUCKETS, registry=registry
    )


def bucket(registry: CollectorRegistry, le: str, route: str = "a") -> float | None:
    return registry.get_sample_value("h_seconds_bucket", {"route": route, "le": le})


def without_exemplar_times(text: bytes) -> str:
    return re.sub(r"(# \{[^}]*\} \S+) \d+(\.\d+)?", r"\1 T", text.decode())


@pytest.mark.parametrize(
    ("value", "le"),
    [(0.0, "0.1"), (0.1, "0.1"), (0.1000001, "1.0"), (1.0, "1.0"), (10.0, "10.0"), (10.5, "+Inf")],
)
def test_a_value_on_a_bound_belongs_to_that_bucket(value: float, le: str):
    registry, h = histogram()
    h.labels("a").observe(value)
    les = ["0.1", "1.0", "10.0", "+Inf"]
    first = les.index(le)
    assert [bucket(registry, b) for b in les] == [0.0] * first + [1.0] * (len(les) - first)


def test_buckets_are_cumulative_with_sum_and_count():
    registry, h = histogram()
    child = h.labels("a")
    for value in VALUES:
        child.observe(value)
    assert child.counts == [4, 3, 2, 2]  # per bucket, as stored
    assert [bucket(registry, le) for le in ("0.1", "1.0", "10.0", "+Inf")] == [4, 7, 9, 11]
    assert registry.get_sample_value("h_seconds_count", {"route": "a"}) == 11
    assert registry.get_sample_value("h_seconds_sum", {"route": "a"}) == pytest.approx(sum(VALUES))
    assert h.labels("a") is child  # bound once per label set
    assert bucket(registry, "+Inf", route="b") is None  # never bound, never exported


def test_exposition_equals_prometheus_client_including_exemplars():
    ours, reference = CollectorRegistry(), CollectorRegistry()
    fast_h = LocklessHistogram("h_seconds", "Doc.", ["r", "u"], buckets=BUCKETS, registry=ours)
    fast_c = LocklessCounter("c", "Doc \\ with \n escapes.", ["r", "code"], registry=ours)
    slow_h = Histogram("h_seconds", "Doc.", ["r", "u"], buckets=BUCKETS, registry=reference)
    slow_c = Counter("c", "Doc \\ with \n escapes.", ["r", "code"], registry=reference)
    for i, value in enumerate(VALUES):
        labels = ("x" if i % 2 else "y", "z")
        exemplar = {"request_id": f"req-{i}"} if i % 3 else None
        fast_h.labels(*labels).observe(value, exemplar)
        slow_h.labels(*labels).observe(value, exemplar)
        fast_c.labels(labels[0], "200").inc(i, exemplar)
        slow_c.labels(labels[0], "200").inc(i, exemplar)
    fast_h.labels("bound", "only")  # a bound child is exported with zeros, as before
    slow_h.labels("bound", "only")
    assert generate_latest(ours) == generate_latest(reference)
    text = without_exemplar_times(generate_openmetrics(ours))
    assert text == without_exemplar_times(generate_openmetrics(reference))
    # The latest exemplar of each bucket and counter child, with its observed value; a later
    # recording without an exemplar keeps the one before.
    for line in (
        'h_seconds_bucket{le="10.0",r="x",u="z"} 4.0 # {request_id="req-7"} 1.0000001 T',
        'h_seconds_bucket{le="+Inf",r="y",u="z"} 6.0 # {request_id="req-10"} 1e+06 T',
        'h_seconds_bucket{le="1.0",r="y",u="z"} 4.0 # {request_id="req-4"} 0.1000001 T',
        'c_total{code="200",r="y"} 30.0 # {request_id="req-10"} 10.0 T',
        'c_total{code="200",r="x"} 25.0 # {request_id="req-7"} 7.0 T',
    ):
        assert line in text.splitlines()


def test_counter_refuses_to_go_down_and_a_wrong_label_count():
    registry = CollectorRegistry()
    counter = LocklessCounter("c", "Doc.", ["a", "b"], registry=registry)
    with pytest.raises(ValueError):
        counter.labels("x").inc()
    with pytest.raises(ValueError):
        counter.labels("x", "y").inc(-1)
    counter.labels("x", "y").inc(2.5)
    assert registry.get_sample_value("c_total", {"a": "x", "b": "y"}) == 2.5
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("c", "Doc.", registry=registry)


CONFIG = {
    "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
    "upstreams": {"primary": {"url": "http://127.0.0.1:9"}},
    "routes": [{"name": "openai", "path_prefix": "/openai", "upstreams": ["primary"]}],
    "prices": {"gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}},
}


def test_metrics_fed_known_events_expose_their_values():
    events = EventBus()
    snapshot = build_snapshot(load_text(yaml.safe_dump(CONFIG)), None, Resolver(), events=events)
    metrics = Metrics(events, lambda: snapshot, CollectorRegistry())

    def finished(request_id: str, status: int, total: float, **fields: object) -> None:
        request = Request("POST", "/openai/v1/chat/completions", Headers())
        ex = Exchange(request, request_id, "127.0.0.1:1", 100.0)
        ex.route, ex.upstream = snapshot.routes[0], snapshot.upstreams["primary"]
        ex.model, ex.status, ex.finished = "gpt-4o-mini", status, 100.0 + total
        for name, value in fields.items():
            setattr(ex, name, value)
        events.emit(RequestFinished(ex))

    finished(
        "req-ok",
        200,
        0.5,
        ttfb=0.2,
        ttft=0.25,
        tokens=(30, 11),
        upstream_started=100.0,
        upstream_ended=100.49,
    )
    finished("req-bad", 502, 2.0, error="upstream_unavailable")
    finished("req-gone", 0, 3.0, client_gone=True)
    events.emit(UpstreamAttempted("primary", "openai", 503, None, 0.1))
    events.emit(UsageRecorded("primary", "gpt-4o-mini", "t", 30, 11, 0.0012))

    def get(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    pair = {"route": "openai", "upstream": "primary"}
    assert get("llm_sidecar_requests_total", code="200", **pair) == 1
    assert get("llm_sidecar_requests_total", code="502", **pair) == 1
    assert get("llm_sidecar_requests_total", code="499", **pair) == 1
    duration = "llm_sidecar_request_duration_seconds"
    assert get(f"{duration}_bucket", le="0.25", **pair) == 0
    assert get(f"{duration}_bucket", le="0.5", **pair) == 1  # 0.5 is a bound: its bucket
    assert get(f"{duration}_bucket", le="2.5", **pair) == 2
    assert get(f"{duration}_count", **pair) == 3
    assert get(f"{duration}_sum", **pair) == pytest.approx(5.5)
    assert get("llm_sidecar_upstream_ttfb_seconds_sum", upstream="primary") == 0.2
    assert get("llm_sidecar_time_to_first_token_seconds_count", **pair) == 1
    assert get("llm_sidecar_overhead_seconds_bucket", route="openai", le="0.01") == 0
    assert get("llm_sidecar_overhead_seconds_bucket", route="openai", le="0.025") == 1
    assert get("llm_sidecar_proxy_errors_total", route="openai", kind="upstream_unavailable") == 1
    assert get("llm_sidecar_client_disconnects_total", route="openai") == 1
    assert get("llm_sidecar_upstream_attempts_total", upstream="primary", outcome="5xx") == 1
    usage = {"upstream": "primary", "model": "gpt-4o-mini", "tenant": "t"}
    assert get("llm_sidecar_tokens_total", kind="prompt", **usage) == 30
    assert get("llm_sidecar_tokens_total", kind="completion", **usage) == 11
    assert get("llm_sidecar_cost_usd_total", tenant="t", model="gpt-4o-mini") == 0.0012
    genai = {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": "openai",
        "gen_ai_request_model": "gpt-4o-mini",
    }
    assert get("gen_ai_server_request_duration_seconds_count", error_type="", **genai) == 1
    assert get("gen_ai_server_request_duration_seconds_count", error_type="499", **genai) == 1
    assert get("gen_ai_client_token_usage_sum", gen_ai_token_type="input", **genai) == 30
    assert get("gen_ai_server_time_per_output_token_seconds_sum", **genai) == 0.025
    assert get("gen_ai_server_time_to_first_token_seconds_bucket", le="0.25", **genai) == 1

    text = generate_openmetrics(metrics.registry).decode()
    for series in (
        'llm_sidecar_requests_total{code="200",route="openai",upstream="primary"} 1.0 '
        '# {request_id="req-ok"} 1.0 ',
        'llm_sidecar_request_duration_seconds_bucket{le="0.5",route="openai",upstream="primary"}'
        ' 1.0 # {request_id="req-ok"} 0.5 ',
        'llm_sidecar_time_to_first_token_seconds_bucket{le="0.25",route="openai",'
        'upstream="primary"} 1.0 # {request_id="req-ok"} 0.25 ',
    ):
        assert series in text

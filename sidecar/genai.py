"""OpenTelemetry GenAI semantic-convention metrics, under their Prometheus names.

The same requests :mod:`sidecar.metrics` counts, recorded a second time under the names the
OpenTelemetry GenAI conventions define (as an OTLP-to-Prometheus translation spells them), so
dashboards built for Envoy AI Gateway and other GenAI-convention gateways work unchanged:

* ``gen_ai_server_request_duration_seconds``: request received to response fully sent;
* ``gen_ai_server_time_to_first_token_seconds``: successful streams, to the first body chunk;
* ``gen_ai_server_time_per_output_token_seconds``: successful streams, (total - TTFT) divided
  by the output tokens after the first;
* ``gen_ai_client_token_usage``: tokens per request, by ``gen_ai_token_type`` (input, output).

Labels are the conventions' attributes with dots as underscores: ``gen_ai_operation_name``
(chat, text_completion, embeddings; from the request path), ``gen_ai_provider_name`` (openai,
anthropic: the upstream's API shape), ``gen_ai_request_model`` (at most :data:`MAX_MODELS`
distinct values, then ``other``), and on the duration ``error_type`` (empty on success, else the
x-llm-sidecar-error kind or the status code). Only LLM API calls are recorded; other paths
(``/models``, health checks) are not GenAI operations. Buckets are the conventions' advice.
Every LLM call records here, so the histograms are :mod:`sidecar.instruments` ones (no locks).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from sidecar.exchange import Exchange
from sidecar.instruments import HistogramChild, LocklessHistogram

MAX_MODELS = 100
OTHER = "other"

# The conventions' advice, extended past 82 s and 10 s: LLM calls can run for minutes.
DURATION_BUCKETS = tuple(0.01 * 2**i for i in range(17))  # 0.01, 0.02, ... 655.36
TTFT_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25)
TTFT_BUCKETS += (0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1, 4, 16, ... 67108864

# Path suffix -> gen_ai.operation.name. OpenAI Responses and Anthropic Messages are chat.
_OPERATIONS = (
    ("/chat/completions", "chat"),
    ("/completions", "text_completion"),
    ("/embeddings", "embeddings"),
    ("/messages", "chat"),
    ("/responses", "chat"),
)
_BASE = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")


def operation_of(path: str) -> str | None:
    """The GenAI operation of a request path, or None when it is not an LLM call."""
    path = path.rstrip("/")
    for suffix, operation in _OPERATIONS:
        if path.endswith(suffix):
            return operation
    return None


class LabelCap:
    """Keeps the first ``limit`` distinct values of a label; later ones become ``other``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        seen = self._seen
        if value in seen:
            return value
        if len(seen) >= self.limit:
            return OTHER
        seen.add(value)
        return value


# duration, ttft, tpot, input tokens, output tokens: what one label set records.
_GenAiChildren = tuple[
    HistogramChild, HistogramChild, HistogramChild, HistogramChild, HistogramChild
]


class GenAiMetrics:
    """Records one finished exchange under the GenAI names (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.duration = LocklessHistogram(
            "gen_ai_server_request_duration_seconds",
            "GenAI conventions: request received to response fully sent.",
            [*_BASE, "error_type"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = LocklessHistogram(
            "gen_ai_server_time_to_first_token_seconds",
            "GenAI conventions: time to the first token of successful streams.",
            list(_BASE),
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = LocklessHistogram(
            "gen_ai_server_time_per_output_token_seconds",
            "GenAI conventions: time per output token after the first, successful streams.",
            list(_BASE),
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.tokens = LocklessHistogram(
            "gen_ai_client_token_usage",
            "GenAI conventions: tokens used per request, by gen_ai_token_type.",
            [*_BASE, "gen_ai_token_type"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.models = LabelCap(MAX_MODELS)
        self._children: dict[tuple[str, ...], _GenAiChildren] = {}

    def _bound(self, operation: str, provider: str, model: str, error: str) -> _GenAiChildren:
        key = (operation, provider, model, error)
        children = self._children.get(key)
        if children is None:
            base = (operation, provider, model)
            children = (
                self.duration.labels(*base, error),
                self.ttft.labels(*base),
                self.tpot.labels(*base),
                self.tokens.labels(*base, "input"),
                self.tokens.labels(*base, "output"),
            )
            self._children[key] = children
        return children

    def record(self, ex: Exchange, status: int, total: float) -> None:
        """Record ``ex`` if it was an LLM call routed to an upstream."""
        upstream = ex.upstream
        if upstream is None:
            return
        operation = operation_of(ex.request.path)
        if operation is None:
            return
        model = self.models(ex.model) if ex.model else ""
        failed = status >= 400 or status == 0 or ex.error is not None
        error = (ex.error or str(status)) if failed else ""
        duration, ttft, tpot, tokens_in, tokens_out = self._bound(
            operation, upstream.api, model, error
        )
        duration.observe(total)
        if ex.tokens is not None:
            prompt, completion = ex.tokens
            tokens_in.observe(prompt)
            tokens_out.observe(completion)
        if not failed and ex.ttft is not None:
            ttft.observe(ex.ttft)
            if ex.tokens is not None and ex.tokens[1] > 1:
                tpot.observe(max(0.0, total - ex.ttft) / (ex.tokens[1] - 1))

"""The one vocabulary of replies the proxy makes itself.

Each refusal kind maps to a status the official SDKs treat correctly, an error body in the
upstream API's own shape (OpenAI or Anthropic), and ``x-llm-sidecar-error: <kind>``; the SDKs
retry 408/409/429/5xx on their own, so kinds where retrying cannot help also send
``x-should-retry: false``. Every other module builds proxy-made replies through here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import orjson

from sidecar.http.message import Headers, Response

ApiStyle = Literal["openai", "anthropic"]
ERROR_HEADER = "x-llm-sidecar-error"


@dataclass(frozen=True, slots=True)
class Kind:
    status: int
    openai_type: str
    anthropic_type: str
    retryable: bool  # whether an SDK retry could help


KINDS: dict[str, Kind] = {
    "bad_request": Kind(400, "invalid_request_error", "invalid_request_error", False),
    "no_route": Kind(404, "invalid_request_error", "not_found_error", False),
    "egress_denied": Kind(403, "permission_error", "permission_error", False),
    "tunnel_limit": Kind(429, "rate_limit_error", "rate_limit_error", True),
    "body_too_large": Kind(413, "invalid_request_error", "request_too_large", False),
    "headers_too_large": Kind(431, "invalid_request_error", "invalid_request_error", False),
    "rate_limited": Kind(429, "rate_limit_error", "rate_limit_error", True),
    "budget_exceeded": Kind(429, "insufficient_quota", "rate_limit_error", False),
    "circuit_open": Kind(503, "service_unavailable", "overloaded_error", True),
    "retries_exhausted": Kind(502, "api_error", "api_error", False),
    "upstream_connect": Kind(502, "api_error", "api_error", True),
    "upstream_reset": Kind(502, "api_error", "api_error", True),
    "upstream_protocol": Kind(502, "api_error", "api_error", True),
    "upstream_timeout": Kind(504, "timeout", "api_error", True),
    "pool_exhausted": Kind(503, "service_unavailable", "overloaded_error", True),
    "internal_error": Kind(500, "api_error", "api_error", True),
    "shutting_down": Kind(503, "service_unavailable", "overloaded_error", True),
}


def error_body(kind: str, message: str, api: ApiStyle) -> dict[str, object]:
    spec = KINDS[kind]
    if api == "anthropic":
        return {"type": "error", "error": {"type": spec.anthropic_type, "message": message}}
    return {"error": {"message": message, "type": spec.openai_type, "code": kind, "param": None}}


def local_reply(
    kind: str,
    message: str,
    api: ApiStyle = "openai",
    *,
    retry_after_s: float | None = None,
    should_retry: bool | None = None,
    extra: dict[str, str] | None = None,
) -> Response:
    """A complete proxy-made reply for a refusal ``kind`` (a key of :data:`KINDS`)."""
    spec = KINDS[kind]
    headers = Headers([("content-type", "application/json"), (ERROR_HEADER, kind)])
    if retry_after_s is not None:
        headers.add("retry-after", str(max(1, math.ceil(retry_after_s))))
        headers.add("retry-after-ms", str(max(1, math.ceil(retry_after_s * 1000))))
    if should_retry is None:
        should_retry = spec.retryable
    if not should_retry:
        headers.add("x-should-retry", "false")
    if extra:
        for name, value in extra.items():
            headers.set(name, value)
    body = orjson.dumps(error_body(kind, message, api))
    return Response.from_bytes(spec.status, headers, body)


def sse_error_event(kind: str, message: str, api: ApiStyle) -> bytes:
    """A final SSE record telling a streaming client that the stream broke (not a clean end)."""
    payload = orjson.dumps(error_body(kind, message, api))
    return b"event: error\ndata: " + payload + b"\n\n"

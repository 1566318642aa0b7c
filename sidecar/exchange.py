"""The per-request context that flows through the pipeline.

An :class:`Exchange` is created by the listener for each request, carries the request, the
config snapshot it was routed with (read once, used to the end, even across a reload), and what
policies learn along the way (route, upstream, attempts, tokens, outcome). The access log and
metrics read it when the request finishes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sidecar.http.message import Request

if TYPE_CHECKING:
    from sidecar.runtime import RouteRuntime, Snapshot, UpstreamRuntime


class Exchange:
    """One request's journey: inputs, decisions and measurements."""

    __slots__ = (
        "request",
        "request_id",
        "client",
        "started",
        "snapshot",
        "route",
        "upstream",
        "upstream_path",
        "upstream_body",
        "model",
        "tenant",
        "attempts",
        "status",
        "error",
        "ttfb",
        "ttft",
        "upstream_started",
        "upstream_ended",
        "bytes_out",
        "finished",
        "client_gone",
        "tokens",
        "cost_usd",
        "breaker",
        "cache",
        "attrs",
        "_on_finish",
    )

    def __init__(self, request: Request, request_id: str, client: str, started: float) -> None:
        self.request = request
        self.request_id = request_id
        self.client = client
        self.started = started
        self.snapshot: Snapshot | None = None
        self.route: RouteRuntime | None = None
        self.upstream: UpstreamRuntime | None = None
        self.upstream_path = request.target
        self.upstream_body: bytes | None = None  # a rewritten body (model rewrite), if any
        self.model: str | None = None
        self.tenant: str | None = None
        self.attempts = 0
        self.status = 0
        self.error: str | None = None  # x-llm-sidecar-error kind, or a mid-stream failure kind
        self.ttfb: float | None = None  # seconds from start to upstream response head
        self.ttft: float | None = None  # seconds from start to a stream's first body chunk
        self.upstream_started: float | None = None
        self.upstream_ended: float | None = None
        self.bytes_out = 0
        self.finished: float | None = None
        self.client_gone = False
        self.tokens: tuple[int, int] | None = None  # (prompt, completion) when known
        self.cost_usd: float | None = None
        self.breaker: str | None = None  # the breaker's decision, for the access log
        self.cache: str | None = None
        self.attrs: dict[str, Any] = {}
        self._on_finish: list[Callable[[Exchange], None]] | None = None

    def on_finish(self, callback: Callable[[Exchange], None]) -> None:
        """Run ``callback`` once the response was fully sent, failed, or the client left.

        This is how a stage observes the end of a streamed body without wrapping it.
        """
        if self._on_finish is None:
            self._on_finish = []
        self._on_finish.append(callback)

    def run_finish_callbacks(self) -> list[BaseException]:
        errors: list[BaseException] = []
        if self._on_finish:
            for callback in reversed(self._on_finish):  # response filters run in reverse order
                try:
                    callback(self)
                except Exception as exc:  # a broken observer must not break the request
                    errors.append(exc)
        return errors

    def close(self) -> None:
        """Drop what policies hung on the exchange once everyone has seen it.

        Callbacks and attrs often point back at the exchange (closures, ledgers); clearing them
        breaks those cycles so the request is freed by reference counting, not by the cyclic
        GC, which otherwise did a tenth of the proxy's CPU work.
        """
        self._on_finish = None
        self.attrs = {}

    @property
    def route_label(self) -> str:
        return self.route.label if self.route is not None else "none"

    @property
    def upstream_label(self) -> str:
        return self.upstream.name if self.upstream is not None else "none"

    def __repr__(self) -> str:
        return (
            f"<Exchange {self.request_id} {self.request.method} {self.request.target} "
            f"route={self.route_label} upstream={self.upstream_label} status={self.status}>"
        )

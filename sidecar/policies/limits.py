"""Upstream-tier rate limits: the upstream's own ``limits`` and provider-header pacing.

:class:`LimitStage` runs first in the upstream tier, once per attempt, before the breaker: a
request refused here never reaches the breaker or the network, and the dispatcher may move on to
a fallback at once. It waits while the provider's last reported limits say a request would be
refused (pacing, see :mod:`sidecar.policies.pacing`), then takes a lease from the upstream
scope's :class:`~sidecar.policies.ratelimit.Limiter`. The lease is held until the response body
ends, so ``max_in_flight`` counts streams to their end, and settled by the route tier's ledger
(see :mod:`sidecar.policies.accounting`) when the real usage is known.

The helpers here (:func:`take`, :func:`refusal`, :func:`show_limits`)
are shared with the route tier, which applies the route and tenant scopes the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from sidecar.events import EventBus, LimitRejected, QueueWaited
from sidecar.exchange import Exchange
from sidecar.http.message import Headers, Response
from sidecar.policies.ratelimit import Lease, Limiter, LimitExceeded, merge_headers
from sidecar.policies.state import limits_apply
from sidecar.replies import ERROR_HEADER, ApiStyle, local_reply
from sidecar.upstream.errors import UpstreamError

if TYPE_CHECKING:
    from sidecar.pipeline import Handler
    from sidecar.policies.accounting import Ledger
    from sidecar.runtime import UpstreamRuntime

LEDGER = "ledger"  # exchange.attrs key of the request's accounting Ledger, when it has one
DEFAULT_PACING_WAIT_S = 10.0  # pacing wait bound of an upstream without a limits block
_NOT_SENT = frozenset({"connect_error", "pool_exhausted"})


class LimitStage:
    """Upstream tier, first: provider pacing, then the upstream scope's limiter."""

    def __init__(self, upstream: UpstreamRuntime) -> None:
        self.upstream = upstream
        policies = upstream.policies
        self.events = policies.events
        limits = upstream.config.limits
        self.limiter: Limiter | None = None
        if limits is not None and limits_apply(limits):
            self.limiter = policies.limiter(f"upstream:{upstream.name}", limits)
        self.pacer = policies.pacer(upstream.name) if upstream.config.pacing else None
        self.max_wait_s = limits.max_wait_s if limits is not None else DEFAULT_PACING_WAIT_S
        # Read once: the stage is rebuilt whenever the upstream's config changes.
        self.queue_mode = limits is not None and limits.on_limit == "queue"
        self.reserves_tokens = limits is not None and limits.tokens is not None

    async def __call__(self, exchange: Exchange, call_next: Handler) -> Response:
        limiter, pacer = self.limiter, self.pacer
        if limiter is None and pacer is None:
            return await call_next(exchange)
        ledger: Ledger | None = exchange.attrs.get(LEDGER)
        if pacer is not None:
            tokens = ledger.tokens if ledger is not None and pacer.tracks_tokens else 0
            # admit() counts the request when the provider has room (nearly always): only a
            # request that must wait or be refused pays for the _pace() coroutine.
            if pacer.admit(tokens) > 0:
                refused = await self._pace(exchange, tokens)
                if refused is not None:
                    return refused
        lease: Lease | None = None
        if limiter is not None:
            tokens = ledger.tokens if ledger is not None and self.reserves_tokens else 0
            try:
                if self.queue_mode:
                    lease = await take(limiter, tokens, self.events)
                else:  # reject mode: synchronous, no coroutine for take()
                    lease = limiter.try_acquire(tokens)
            except LimitExceeded as exc:
                return refusal(exc, _api(exchange, self.upstream), self.events)
        try:
            response = await call_next(exchange)
        except UpstreamError as exc:
            if lease is not None:
                lease.cancel() if exc.kind in _NOT_SENT else lease.release()
            raise
        except asyncio.CancelledError:
            if lease is not None:
                lease.release()  # sent, maybe billed: the estimate stays charged
            raise
        except BaseException:  # e.g. the breaker failing fast: nothing was sent
            if lease is not None:
                lease.cancel()
            raise
        if pacer is not None:
            pacer.observe(response.status, response.headers)
        if lease is None:
            return response
        if ERROR_HEADER in response.headers:
            lease.cancel()  # refused below us: nothing was sent
        elif response.status >= 400:
            lease.reconcile(0)  # providers do not bill refused requests
        elif ledger is not None:
            ledger.leases.append(lease)  # settled with the real usage at the end
        show_limits(response.headers, (lease.headers,))
        # Released when the body ends, fails or is closed: the listener closes every response
        # it sends, and the dispatcher every one it discards.
        response.watch(done=lease.body_done)
        return response

    async def _pace(self, exchange: Exchange, tokens: int) -> Response | None:
        """Wait until the provider should have room; a refusal if that is too far off.

        Called when ``admit()`` just said "not yet" (which counted nothing)."""
        assert self.pacer is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.max_wait_s
        name = self.upstream.name
        paced = False
        while (wait := self.pacer.admit(tokens)) > 0:
            paced = True
            if loop.time() + wait > deadline:
                self.events.emit(LimitRejected("provider", name, "provider"))
                return local_reply(
                    "rate_limited",
                    f"upstream {name!r} reported its rate limit reached; room again in {wait:.3g}s",
                    _api(exchange, self.upstream),
                    retry_after_s=wait,
                )
            await asyncio.sleep(wait)
        if paced:
            self.events.emit(QueueWaited("provider", name, loop.time() - start))
        return None


async def take(limiter: Limiter, tokens: int, events: EventBus) -> Lease:
    """A lease from `limiter` (waiting in queue mode, and recording how long)."""
    if limiter.settings.on_limit != "queue":
        return limiter.try_acquire(tokens)
    loop = asyncio.get_running_loop()
    start = loop.time()
    lease = await limiter.acquire(tokens)
    kind, _, name = limiter.scope.partition(":")
    events.emit(QueueWaited(kind, name, loop.time() - start))
    return lease


def refusal(exc: LimitExceeded, api: ApiStyle, events: EventBus) -> Response:
    """The 429 for a refused lease, with Retry-After and the scope's x-ratelimit-* headers."""
    kind, _, name = exc.scope.partition(":")
    events.emit(LimitRejected(kind, name, exc.limit))
    return local_reply(
        "rate_limited", str(exc), api, retry_after_s=exc.retry_after_s, extra=exc.headers
    )


def show_limits(headers: Headers, ours: Sequence[Mapping[str, str]]) -> None:
    """Set x-ratelimit-* to the tightest of the response's own and our scopes', per resource.

    ``ours``: the leases' headers, which hold x-ratelimit-* fields only.
    """
    if len(ours) == 1 and not headers.has_prefix("x-ratelimit-"):
        headers.extend(ours[0].items())  # the common case: one scope, none from upstream
        return
    mine = [h for h in ours if h]
    if not mine:
        return
    theirs = {name: value for name, value in headers.items() if name.startswith("x-ratelimit-")}
    try:
        merged = merge_headers([theirs, *mine])
    except ValueError:  # the upstream's values are not numbers: leave them alone
        return
    for name, value in merged.items():
        if name.startswith("x-ratelimit-") and theirs.get(name) != value:
            headers.set(name, value)


def _api(exchange: Exchange, upstream: UpstreamRuntime) -> ApiStyle:
    return exchange.route.api if exchange.route is not None else upstream.api

"""Route-tier limits and LLM token accounting: tenant and route scopes, budgets, usage.

:class:`AccountingStage` runs in the route tier, after the tenant is known and before retries
and fallbacks. Per request it:

1. refuses with 429 ``budget_exceeded`` when the tenant's budget for the day or month is spent;
2. takes a lease from the tenant's limiter, then the route's (429 ``rate_limited`` with
   Retry-After and x-ratelimit-* when one refuses; queue mode waits FIFO up to ``max_wait_s``);
3. when a route has ``stream.include_usage``, asks a streamed OpenAI request for its usage;
4. lets the response through and reads its usage on the way: the ``usage`` of a JSON body (a
   copy of at most :data:`MAX_JSON_BYTES`), or the usage record of an SSE stream, fed chunk by
   chunk, never buffered; the injected usage chunk is removed for a client that did not ask;
5. at the end of the body settles every lease of the request (its own and the upstream tier's)
   with the real token count, refunding the unused reservation or charging the overrun, prices
   the usage, spends it from the tenant's budget and reports it (:class:`UsageRecorded`).

Usage is read for every LLM API call (a path :func:`~sidecar.genai.operation_of` names), so
the access log, ``llm_sidecar_tokens_total`` and the GenAI token metrics see it without any
limit configured (a few microseconds: taps on the body, one parse of a JSON body's copy or of
each SSE record with a usage count), and for any other path when a token limit, price or
budget needs it. The token estimate (:func:`~sidecar.policies.usage.estimate_tokens`, a JSON
parse of the request) is made only when a token bucket, a price, a budget or include_usage
needs it. A body that is not JSON is never refused for it: it reserves no tokens and is
charged what the response reports.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING

from sidecar.events import BudgetUpdated, EventBus, LimitRejected, UsageRecorded
from sidecar.exchange import Exchange
from sidecar.genai import operation_of
from sidecar.http.message import Response
from sidecar.policies.budget import BudgetExceeded, BudgetTracker
from sidecar.policies.limits import LEDGER, refusal, show_limits, take
from sidecar.policies.ratelimit import Lease, Limiter, LimitExceeded
from sidecar.policies.state import (
    DEFAULT_TENANT,
    budget_applies,
    limits_apply,
    tenant_policy,
)
from sidecar.policies.usage import (
    StreamUsageScanner,
    Usage,
    UsageChunkStripper,
    add_include_usage,
    cost_usd,
    estimate_tokens,
    usage_and_model_from_json,
)
from sidecar.replies import ERROR_HEADER, local_reply

if TYPE_CHECKING:
    from sidecar.config.model import Accounting, Price
    from sidecar.pipeline import Handler
    from sidecar.runtime import RouteRuntime

MAX_JSON_BYTES = 4 * 1024 * 1024  # a larger JSON response is passed on without reading usage
_DECODABLE = frozenset({"gzip", "x-gzip", "deflate"})


class AccountingStage:
    """Route tier: budgets, tenant and route limits, usage reconciliation (see module doc)."""

    def __init__(self, route: RouteRuntime) -> None:
        policies = route.policies
        self.policies = policies
        self.events = policies.events
        # The settings of this snapshot's config (synced just before the routes are built).
        self.tenants = policies.tenants
        self.prices = policies.prices
        self.accounting = policies.accounting
        self.api = route.api
        self.include_usage = route.config.stream.include_usage
        limits = route.config.limits
        self.limiter: Limiter | None = None
        if limits is not None and limits_apply(limits):
            keys = policies.route_keys
            key = keys[route.index] if 0 <= route.index < len(keys) else f"route:{route.label}"
            self.limiter = policies.limiter(key, limits)
        targets = list(route.targets) + [t for ts in route.model_targets.values() for t in ts]
        upstream_tokens = any(
            t.upstream.config.limits is not None and t.upstream.config.limits.tokens is not None
            for t in targets
        )
        tenants = self.tenants
        self.tenant_scoped = any(
            limits_apply(t.limits) or budget_applies(t.budget_usd)
            for t in (tenants.default, *tenants.overrides.values())
        )
        self.always_usage = bool(
            self.prices
            or self.include_usage
            or upstream_tokens
            or (self.limiter is not None and self.limiter.settings.tokens is not None)
        )

    async def __call__(self, exchange: Exchange, call_next: Handler) -> Response:
        tenant = exchange.tenant or DEFAULT_TENANT
        tenant_limiter: Limiter | None = None
        budget: BudgetTracker | None = None
        if self.tenant_scoped:  # else no tenant has limits or a budget: skip the look-up
            policy = tenant_policy(self.tenants, tenant)
            if policy.limits is not None and limits_apply(policy.limits):
                tenant_limiter = self.policies.tenant_limiter(tenant, policy.limits)
            if policy.budget is not None and budget_applies(policy.budget):
                budget = self.policies.budget(tenant, policy.budget)
        needs_usage = (
            self.always_usage
            or budget is not None
            or (tenant_limiter is not None and tenant_limiter.settings.tokens is not None)
            or operation_of(exchange.upstream_path.partition("?")[0]) is not None
        )
        if not needs_usage and tenant_limiter is None and self.limiter is None:
            return _note_refusal(exchange, await call_next(exchange))

        if budget is not None:
            try:
                budget.check()
            except BudgetExceeded as exc:
                self.events.emit(LimitRejected("tenant", tenant, f"budget_{exc.period}"))
                self.events.emit(BudgetUpdated(tenant, _remaining(budget)))
                exchange.error = "budget_exceeded"
                return local_reply(
                    "budget_exceeded",
                    f"tenant {tenant!r}: {exc}",
                    self.api,
                    retry_after_s=exc.retry_after_s,
                )
        ledger: Ledger | None = None
        if needs_usage:
            ledger = Ledger(exchange, self.accounting, self.prices, budget, self.events)
            exchange.attrs[LEDGER] = ledger
            if self.include_usage:
                ledger.ask_for_usage()

        leases: list[Lease] = []
        try:
            for limiter in (tenant_limiter, self.limiter):
                if limiter is None:
                    continue
                tokens = ledger.tokens if ledger is not None and limiter.settings.tokens else 0
                leases.append(await take(limiter, tokens, self.events))
        except LimitExceeded as exc:
            for lease in leases:
                lease.cancel()
            exchange.error = "rate_limited"
            return refusal(exc, self.api, self.events)
        except BaseException:  # cancelled while queued: give back what is held
            for lease in leases:
                lease.cancel()
            raise

        try:
            response = await call_next(exchange)
        except BaseException:
            for lease in leases:
                lease.release()  # maybe sent: the estimates stay charged
            raise
        _note_refusal(exchange, response)
        show_limits(response.headers, [lease.headers for lease in leases])
        if ledger is not None:
            ledger.leases[:0] = leases
            return ledger.watch(response)

        for lease in leases:
            response.watch(done=lease.body_done)  # the body always ends or is closed
        return response


def _note_refusal(exchange: Exchange, response: Response) -> Response:
    """Name a 429 made below (an upstream scope, pacing) as the exchange's error."""
    if response.status == 429 and exchange.error is None:
        exchange.error = response.headers.get(ERROR_HEADER)
    return response


class Ledger:
    """One request's token accounting: the estimate, the leases to settle, what it cost.

    Created by the route tier when anything needs the usage; the upstream tier finds it in
    ``exchange.attrs[LEDGER]`` and adds its own leases. :meth:`settle` runs once.
    """

    __slots__ = (
        "exchange",
        "leases",
        "strip_usage",
        "_accounting",
        "_prices",
        "_budget",
        "_events",
        "_estimate",
        "_settled",
        "_status",
        "_reader",
    )

    def __init__(
        self,
        exchange: Exchange,
        accounting: Accounting,
        prices: Mapping[str, Price],
        budget: BudgetTracker | None,
        events: EventBus,
    ) -> None:
        self.exchange = exchange
        self.leases: list[Lease] = []
        self.strip_usage = False  # include_usage was injected: hide the usage chunk
        self._accounting = accounting
        self._prices = prices
        self._budget = budget
        self._events = events
        self._estimate: tuple[str | None, int, int] | None = None
        self._settled = False
        self._status = 0
        self._reader: _SseUsage | _JsonUsage | None = None

    @property
    def tokens(self) -> int:
        """Tokens to reserve: the prompt estimate plus the completion allowance."""
        _, prompt, completion = self.estimate()
        return prompt + completion

    def estimate(self) -> tuple[str | None, int, int]:
        """(model, prompt, completion) estimated from the request body, once."""
        if self._estimate is None:
            exchange = self.exchange
            path = exchange.upstream_path.partition("?")[0]
            self._estimate = estimate_tokens(exchange.request.body, self._accounting, path=path)
            if exchange.model is None:
                exchange.model = self._estimate[0]
        return self._estimate

    def ask_for_usage(self) -> None:
        """Add ``stream_options.include_usage`` to a streamed OpenAI request that lacks it."""
        request = self.exchange.request
        path = self.exchange.upstream_path.partition("?")[0]
        body = add_include_usage(request.body, path=path)
        if body is not None:
            request.body = body
            request.headers.set("accept-encoding", "identity")  # the chunk must be readable
            self.strip_usage = True

    def watch(self, response: Response) -> Response:
        """Read the usage as the body passes; settle at its end (or when the exchange ends)."""
        status = response.status
        headers = response.headers
        if ERROR_HEADER in headers or status >= 400:
            self.settle(status, None, sent=self.exchange.upstream_started is not None)
            return response
        encoding = (headers.get("content-encoding") or "identity").strip().lower()
        reader: _SseUsage | _JsonUsage | None = None
        stripper: UsageChunkStripper | None = None
        if (headers.get("content-type") or "").startswith("text/event-stream"):
            if encoding == "identity":
                reader = _SseUsage()
                if self.strip_usage:
                    stripper = UsageChunkStripper()
                    headers.remove("content-length")
        elif encoding == "identity" or encoding in _DECODABLE:
            reader = _JsonUsage(encoding)
        self._status, self._reader = status, reader
        # The reader sees the body as the upstream sent it (with any injected usage chunk);
        # the stripper, when there is one, then cuts that chunk out for the client.
        response.watch(tap=reader.feed if reader is not None else None, done=self.body_done)
        if stripper is not None:
            response.body = StrippedBody(response.body, stripper)
        self.exchange.on_finish(self.exchange_done)
        return response

    def body_done(self, completed: bool) -> None:
        """The body ended (read to its end or not): settle with the usage it showed."""
        reader = self._reader
        if reader is None:
            self.settle(self._status, None, completed=completed)
        else:
            usage = reader.usage(completed)
            self.settle(self._status, usage, completed=completed, model=reader.model)

    def exchange_done(self, exchange: Exchange) -> None:
        self.body_done(False)  # a no-op when the body already settled

    def settle(
        self,
        status: int,
        usage: Usage | None,
        *,
        completed: bool = True,
        sent: bool = True,
        model: str | None = None,
    ) -> None:
        """Settle every lease with the real usage, then price, spend and report it (once).

        Without usage the estimate stays charged (the safe side), except for a refused
        request: never sent to any upstream (everything given back, the request too) or
        answered with an error status (no tokens billed). A body cut short keeps at least its
        estimate: the provider bills what it generated.
        """
        if self._settled:
            return
        self._settled = True
        for lease in self.leases:
            if not sent:
                lease.cancel()
            elif usage is not None:
                lease.reconcile(usage.total if completed else max(usage.total, lease.tokens))
            elif status >= 400:
                lease.reconcile(0)
            lease.release()
        if usage is not None:
            self._record(usage, model)

    def _record(self, usage: Usage, reported: str | None) -> None:
        """`reported`: the model the response named (the one that answered), if it did."""
        exchange = self.exchange
        exchange.tokens = (usage.prompt_tokens, usage.completion_tokens)
        if exchange.model is None:
            exchange.model = reported or (self._estimate[0] if self._estimate else None)
        model = reported or exchange.model
        cost = cost_usd(model, usage, self._prices) if self._prices else None
        exchange.cost_usd = cost
        budget = self._budget
        tenant = exchange.tenant or DEFAULT_TENANT
        if budget is not None and cost:
            budget.spend(cost)
            self._events.emit(BudgetUpdated(tenant, _remaining(budget)))
        self._events.emit(
            UsageRecorded(
                exchange.upstream_label,
                model or "unknown",
                tenant,
                usage.prompt_tokens,
                usage.completion_tokens,
                cost,
            )
        )


class StrippedBody:
    """The response body with the usage chunk that the sidecar asked for cut out.

    A class, not an async generator, so that ``aclose()`` reaches the inner body even when
    iteration never started.
    """

    __slots__ = ("_inner", "_stripper", "_done")

    def __init__(self, inner: AsyncIterator[bytes], stripper: UsageChunkStripper) -> None:
        self._inner = inner
        self._stripper = stripper
        self._done = False

    def __aiter__(self) -> StrippedBody:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        while True:
            try:
                chunk = await self._inner.__anext__()
            except StopAsyncIteration:
                self._done = True
                tail = self._stripper.close()
                if tail:
                    return tail
                raise
            chunk = self._stripper.feed(chunk)
            if chunk:
                return chunk

    async def aclose(self) -> None:
        close = getattr(self._inner, "aclose", None)
        if close is not None:
            await close()


class _SseUsage:
    __slots__ = ("_scanner",)

    def __init__(self) -> None:
        self._scanner = StreamUsageScanner()

    @property
    def model(self) -> str | None:
        return self._scanner.model

    def feed(self, chunk: bytes) -> None:
        self._scanner.feed(chunk)

    def usage(self, completed: bool) -> Usage | None:
        if completed:
            self._scanner.close()
        return self._scanner.usage


class _JsonUsage:
    """A copy of a JSON body up to :data:`MAX_JSON_BYTES`, read for ``usage`` at the end."""

    __slots__ = ("_encoding", "_parts", "_size", "model")

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._parts: list[bytes] | None = []
        self._size = 0
        self.model: str | None = None

    def feed(self, chunk: bytes) -> None:
        if self._parts is None:
            return
        self._size += len(chunk)
        if self._size > MAX_JSON_BYTES:
            self._parts = None
        else:
            self._parts.append(chunk)

    def usage(self, completed: bool) -> Usage | None:
        if not completed or not self._parts:
            return None
        data = b"".join(self._parts)
        self._parts = None
        if self._encoding != "identity":
            try:
                inflater = zlib.decompressobj(47)  # gzip or zlib header, detected
                data = inflater.decompress(data, MAX_JSON_BYTES)
            except zlib.error:
                return None
        usage, self.model = usage_and_model_from_json(data)
        return usage


def _remaining(budget: BudgetTracker) -> dict[str, float]:
    return {str(period): usd for period, usd in budget.remaining().items()}

"""The route tier's terminal: retries with backoff, ordered fallbacks, and honest failures.

For each target of the route in order (primary first), try up to ``retry.attempts`` times. An
open breaker fails fast (``CircuitOpen``), so the next target is tried at once. A retryable
failure (``retry.on``) is retried after exponential backoff with full jitter, or after the
upstream's ``Retry-After``/``retry-after-ms`` (capped by ``max_backoff_s``), while the route's
retry budget allows; once a target's tries are spent on retryable failures, the next target is
tried. Everything here happens before the first response byte reaches the client: the chosen
response is returned at its head, and its body streams from there.
"""

from __future__ import annotations

import asyncio
import fnmatch
import random
import re
import time
from typing import TYPE_CHECKING

import orjson

from sidecar.events import FellBack, Retried
from sidecar.exchange import Exchange
from sidecar.http.message import Response
from sidecar.policies.breaker import CircuitOpen, parse_retry_after
from sidecar.policies.usage import requested_model
from sidecar.replies import local_reply
from sidecar.upstream.errors import REPLY_KIND, UpstreamError

if TYPE_CHECKING:
    from sidecar.runtime import RouteRuntime, Target

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_AZURE_DEPLOYMENT = re.compile(r"(/deployments/)([^/?]+)")
MIN_RETRY_CONCURRENCY = 3  # as Envoy: the budget never blocks the first few retries


class RetryBudget:
    """Retries in flight may not exceed ``budget_percent`` of requests in flight (Envoy-style)."""

    def __init__(self, percent: float) -> None:
        self.percent = percent
        self.active = 0
        self.retrying = 0

    def allows_retry(self) -> bool:
        limit = max(MIN_RETRY_CONCURRENCY, self.active * self.percent / 100.0)
        return self.retrying < limit


class Dispatcher:
    def __init__(self, route: RouteRuntime) -> None:
        self.route = route
        config = route.config
        self.retry = config.retry
        self.retry_on = frozenset(config.retry.on)
        # Status codes as ints, once: every response is checked against them.
        self._retry_statuses = frozenset(int(x) for x in self.retry_on if x.isdigit())
        self._retry_5xx = "5xx" in self.retry_on
        self.budget = RetryBudget(config.retry.budget_percent)
        self._needs_model = bool(
            config.models
            or config.model_aliases
            or any(t.model for t in route.targets)
            or any(t.model for ts in route.model_targets.values() for t in ts)
        )

    def _retryable_status(self, status: int) -> bool:
        return status in self._retry_statuses or (status >= 500 and self._retry_5xx)

    def _targets(self, exchange: Exchange) -> tuple[Target, ...]:
        route = self.route
        if self._needs_model and exchange.model is None:
            exchange.model = requested_model(exchange.request.body)
        if exchange.model is not None:
            for pattern, targets in route.model_targets.items():
                if fnmatch.fnmatchcase(exchange.model, pattern):
                    return targets
        return route.targets

    def _prepare(self, exchange: Exchange, target: Target) -> None:
        """Point the exchange at ``target``, rewriting the model name if configured."""
        exchange.upstream = target.upstream
        exchange.upstream_body = None
        model = exchange.model
        if not self._needs_model or model is None:
            return
        alias = self.route.config.model_aliases.get(model)
        wanted = target.model
        if wanted is None and alias is not None:
            wanted = alias if isinstance(alias, str) else alias.get(target.upstream.name)
        if wanted is None or wanted == model:
            return
        try:
            body = orjson.loads(exchange.request.body)
        except orjson.JSONDecodeError:
            return
        if isinstance(body, dict):
            body["model"] = wanted
            exchange.upstream_body = orjson.dumps(body)
        exchange.upstream_path = _AZURE_DEPLOYMENT.sub(
            lambda m: m.group(1) + wanted, exchange.upstream_path
        )

    async def __call__(self, exchange: Exchange) -> Response:
        route = self.route
        retry = self.retry
        targets = self._targets(exchange)
        may_retry = retry.non_idempotent or exchange.request.method in _IDEMPOTENT
        original_path = exchange.upstream_path
        budget = self.budget
        budget.active += 1
        retrying = False
        last_error: UpstreamError | None = None
        open_circuits: list[CircuitOpen] = []
        tries = 0
        try:
            for index, target in enumerate(targets):
                upstream = target.upstream
                if index > 0:
                    previous = targets[index - 1].upstream.name
                    upstream.events.emit(FellBack(route.label, previous, upstream.name))
                exchange.upstream_path = original_path
                self._prepare(exchange, target)
                is_last_target = index == len(targets) - 1
                for attempt in range(retry.attempts):
                    more_here = may_retry and attempt + 1 < retry.attempts
                    exchange.attempts += 1
                    tries += 1
                    if retry.per_try_timeout_s is not None:
                        exchange.attrs["per_try_deadline"] = (
                            time.monotonic() + retry.per_try_timeout_s
                        )
                    upstream.inflight += 1
                    try:
                        response = await upstream.handler(exchange)
                    except CircuitOpen as exc:
                        open_circuits.append(exc)
                        break  # fail fast: next target at once
                    except UpstreamError as exc:
                        last_error = exc
                        if exc.kind not in self.retry_on and not (
                            exc.kind == "pool_exhausted" and "connect_error" in self.retry_on
                        ):
                            break
                        reason: str = exc.kind
                        delay: float | None = None
                    else:
                        status = response.status
                        if not self._retryable_status(status):
                            return self._finish(exchange, response)
                        retry_here = more_here and (retrying or budget.allows_retry())
                        if not retry_here and is_last_target:
                            return self._finish(exchange, response)  # the upstream's own answer
                        reason, delay = str(status), parse_retry_after(response.headers)
                        await response.aclose()
                        last_error = None
                        exchange.attrs["last_status"] = status
                    finally:
                        upstream.inflight -= 1
                    if not more_here:
                        break
                    if not retrying:
                        if not budget.allows_retry():
                            break
                        budget.retrying += 1
                        retrying = True
                    upstream.events.emit(Retried(route.label, upstream.name, reason))
                    await asyncio.sleep(self._backoff(attempt, delay))
            return self._give_up(exchange, last_error, open_circuits, tries)
        finally:
            budget.active -= 1
            if retrying:
                budget.retrying -= 1

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = self.retry.max_backoff_s
        if retry_after is not None:
            return min(retry_after, cap)
        return random.uniform(0, min(cap, self.retry.backoff_s * (2**attempt)))

    def _finish(self, exchange: Exchange, response: Response) -> Response:
        assert exchange.upstream is not None
        # The chosen attempt stays in flight until its body has been relayed to the end.
        exchange.upstream.inflight += 1
        exchange.on_finish(_inflight_done)
        response.headers.set("x-llm-sidecar-upstream", exchange.upstream.name)
        response.headers.set("x-llm-sidecar-attempts", str(exchange.attempts))
        return response

    def _give_up(
        self,
        exchange: Exchange,
        error: UpstreamError | None,
        open_circuits: list[CircuitOpen],
        tries: int,
    ) -> Response:
        route = self.route
        hint = route.config.x_should_retry
        extra = {"x-llm-sidecar-attempts": str(exchange.attempts)}
        if error is None and open_circuits:
            # Every target refused by its breaker: nothing was sent anywhere.
            names = ", ".join(c.upstream for c in open_circuits)
            soonest = min(c.retry_after_s for c in open_circuits)
            exchange.error = "circuit_open"
            return local_reply(
                "circuit_open",
                f"circuit breaker open for {names}; no healthy upstream",
                route.api,
                retry_after_s=max(1.0, soonest),
                should_retry=False if hint else None,
                extra=extra,
            )
        if error is not None:
            kind = REPLY_KIND[error.kind]
            spent = tries > 1
            if spent:
                kind_message = f"{kind} after {tries} attempts: {error}"
                exchange.error = "retries_exhausted"
                return local_reply(
                    "retries_exhausted",
                    kind_message,
                    route.api,
                    should_retry=False if hint else None,
                    extra={**extra, "x-llm-sidecar-cause": kind},
                )
            exchange.error = kind
            upstream = exchange.upstream.name if exchange.upstream else "upstream"
            return local_reply(kind, f"{upstream}: {error}", route.api, extra=extra)
        # A retryable status on a non-last target whose tries ran out, then nothing left.
        status = exchange.attrs.get("last_status", 502)
        exchange.error = "retries_exhausted"
        return local_reply(
            "retries_exhausted",
            f"upstreams kept failing (last status {status}) after {tries} attempts",
            route.api,
            should_retry=False if hint else None,
            extra=extra,
        )


def _inflight_done(exchange: Exchange) -> None:
    if exchange.upstream is not None:
        exchange.upstream.inflight -= 1

"""The route tier's terminal: send the request to the route's first target.

(The resilience issue replaces this with retries and ordered fallbacks.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sidecar.exchange import Exchange
from sidecar.http.message import Response
from sidecar.replies import local_reply
from sidecar.upstream.errors import REPLY_KIND, UpstreamError

if TYPE_CHECKING:
    from sidecar.runtime import RouteRuntime


class Dispatcher:
    def __init__(self, route: RouteRuntime) -> None:
        self.route = route

    async def __call__(self, exchange: Exchange) -> Response:
        route = self.route
        target = route.targets[0]
        upstream = target.upstream
        exchange.upstream = upstream
        exchange.attempts += 1
        upstream.inflight += 1
        try:
            return await upstream.handler(exchange)
        except UpstreamError as exc:
            kind = REPLY_KIND[exc.kind]
            exchange.error = kind
            return local_reply(kind, f"{upstream.name}: {exc}", route.api)
        finally:
            upstream.inflight -= 1

"""The proxy core: one request from the listener through routing and the pipeline, and back.

It reads the current snapshot once, routes the request, runs the route's handler, sends the
response through the listener, and, whatever happens, records the outcome on the exchange and
emits :class:`~sidecar.events.RequestFinished` for metrics and logs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sidecar.events import EventBus, RequestFinished
from sidecar.exchange import Exchange
from sidecar.http.message import Request
from sidecar.http.server import ConnectionHandler, ResponseWriter, new_request_id
from sidecar.replies import local_reply, sse_error_event
from sidecar.runtime import Snapshot
from sidecar.upstream.errors import REPLY_KIND, UpstreamError

log = logging.getLogger("sidecar.proxy")


class Proxy(ConnectionHandler):
    """Routes requests through the current snapshot's pipeline."""

    def __init__(self, current: Callable[[], Snapshot], events: EventBus) -> None:
        self._current = current
        self._events = events
        self.inflight = 0

    async def handle(self, request: Request, client: str, send: ResponseWriter) -> bool:
        loop = asyncio.get_running_loop()
        request_id = request.headers.get("x-request-id")
        if not request_id:
            request_id = new_request_id()
            request.headers.add("x-request-id", request_id)
        exchange = Exchange(request, request_id, client, loop.time())
        snapshot = exchange.snapshot = self._current()
        keep = True
        self.inflight += 1
        try:
            route = snapshot.match(request)
            if route is None:
                response = local_reply("no_route", f"no route matches {request.path!r}")
                exchange.error = "no_route"
            else:
                exchange.route = route
                exchange.upstream_path = route.upstream_path(request.target)
                response = await route.handler(exchange)
            response.headers.set("x-request-id", request_id)
            exchange.status = response.status
            exchange.bytes_out = await send(response, request, _error_event(exchange))
        except asyncio.CancelledError:
            exchange.client_gone = True
            raise
        except (ConnectionError, OSError):
            exchange.client_gone = True
            keep = False
        except UpstreamError as exc:  # the body broke after the head was sent
            exchange.error = REPLY_KIND[exc.kind]
            keep = False
        except Exception:
            log.exception("request %s failed inside the proxy", request_id)
            exchange.error = "internal_error"
            keep = False
        finally:
            self.inflight -= 1
            exchange.finished = loop.time()
            for error in exchange.run_finish_callbacks():
                log.error("finish callback failed for %s: %r", request_id, error)
            self._events.emit(RequestFinished(exchange))
        return keep


def _error_event(exchange: Exchange) -> Callable[[BaseException], bytes | None]:
    def event(exc: BaseException) -> bytes | None:
        kind = REPLY_KIND.get(getattr(exc, "kind", ""), "upstream_reset")
        exchange.error = kind
        route = exchange.route
        api = route.api if route is not None else "openai"
        return sse_error_event(kind, f"stream from upstream broke: {exc}", api)

    return event

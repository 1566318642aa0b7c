"""The proxy core: one request from the listener through routing and the pipeline, and back.

It reads the current snapshot once, routes the request, runs the route's handler, sends the
response through the listener, and, whatever happens, records the outcome on the exchange and
emits :class:`~sidecar.events.RequestFinished` for metrics and logs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from sidecar.egress.target import ProxyTarget, is_absolute_form
from sidecar.events import EventBus, RequestFinished
from sidecar.exchange import Exchange
from sidecar.http.message import Request
from sidecar.http.server import ClientConnection, ConnectionHandler, ResponseWriter, new_request_id
from sidecar.replies import ERROR_HEADER, local_reply, sse_error_event
from sidecar.runtime import Snapshot
from sidecar.upstream.errors import REPLY_KIND, UpstreamError

if TYPE_CHECKING:
    from sidecar.egress.gate import EgressGate

log = logging.getLogger("sidecar.proxy")


class Proxy(ConnectionHandler):
    """Routes requests through the current snapshot's pipeline."""

    def __init__(
        self, current: Callable[[], Snapshot], events: EventBus, egress: EgressGate | None = None
    ) -> None:
        self._current = current
        self._events = events
        self.egress = egress  # HTTP_PROXY/HTTPS_PROXY traffic; None: base-URL mode only
        self.inflight = 0

    async def handle(
        self,
        request: Request,
        client: str,
        send: ResponseWriter,
        target: ProxyTarget | None = None,
    ) -> bool:
        """Answer one request; ``target`` is the origin of an intercepted tunnel it came in."""
        request_id = request.headers.get("x-request-id")
        if not request_id:
            request_id = new_request_id()
            request.headers.add("x-request-id", request_id)
        exchange = Exchange(request, request_id, client, time.monotonic())
        snapshot = exchange.snapshot = self._current()
        keep = True
        self.inflight += 1
        try:
            egress, refusal = self.egress, None
            if egress is not None and (target is not None or is_absolute_form(request.target)):
                # HTTP_PROXY absolute-form, or decrypted from an intercepted tunnel: by host.
                route, refusal = await egress.route(exchange, target)
            else:
                route = snapshot.match(request)
                if route is not None:
                    exchange.upstream_path = route.upstream_path(request.target)
            if refusal is not None:
                response = refusal
                exchange.error = refusal.headers.get(ERROR_HEADER)
            elif route is None:
                response = local_reply("no_route", f"no route matches {request.path!r}")
                exchange.error = "no_route"
            else:
                exchange.route = route
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
            exchange.finished = time.monotonic()
            for error in exchange.run_finish_callbacks():
                log.error("finish callback failed for %s: %r", request_id, error)
            self._events.emit(RequestFinished(exchange))
            exchange.close()
        return keep

    async def tunnel(self, request: Request, conn: ClientConnection, leftover: bytes) -> None:
        """CONNECT (HTTPS_PROXY): a blind tunnel, or interception served by :meth:`handle`."""
        if self.egress is None:
            reply = local_reply("bad_request", "CONNECT is not supported here")
            reply.headers.set("connection", "close")
            await conn.write_response(reply, request, None)
            return
        await self.egress.tunnels.handle(request, conn, leftover, self.handle)


def _error_event(exchange: Exchange) -> Callable[[BaseException], bytes | None]:
    def event(exc: BaseException) -> bytes | None:
        kind = REPLY_KIND.get(getattr(exc, "kind", ""), "upstream_reset")
        exchange.error = kind
        route = exchange.route
        api = route.api if route is not None else "openai"
        return sse_error_event(kind, f"stream from upstream broke: {exc}", api)

    return event

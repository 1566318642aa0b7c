"""SSE keep-alive comments while a stream waits for a slow token (``routes[].stream.keepalive_s``).

Load balancers and NATs drop connections that stay silent (often after 60 s); a reasoning model
can think longer than that before its first token. While an SSE response has sent nothing for
``keepalive_s``, this stage writes ``: keep-alive`` comment lines, which every SSE client
ignores. Only routes that set ``keepalive_s`` pay for it: the body is wrapped only there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from sidecar.exchange import Exchange
from sidecar.http.message import Response

if TYPE_CHECKING:
    from sidecar.pipeline import Handler
    from sidecar.runtime import RouteRuntime

COMMENT = b": keep-alive\n\n"


class KeepaliveStage:
    def __init__(self, route: RouteRuntime) -> None:
        self.interval = route.config.stream.keepalive_s

    async def __call__(self, exchange: Exchange, call_next: Handler) -> Response:
        response = await call_next(exchange)
        if self.interval is not None and (response.headers.get("content-type") or "").startswith(
            "text/event-stream"
        ):
            response.body = _with_keepalive(response.body, self.interval)
        return response


async def _with_keepalive(body: AsyncIterator[bytes], interval: float) -> AsyncIterator[bytes]:
    # The pending read runs as its own task so that waiting for it with a timeout never
    # cancels the read itself (a cancelled read would cost the upstream connection).
    pending: asyncio.Task[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(body))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield COMMENT
                continue
            task, pending = pending, None
            try:
                yield task.result()
            except StopAsyncIteration:
                return
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        close = getattr(body, "aclose", None)
        if close is not None:
            await close()

"""Admin HTTP API on ``listen.admin``.

aiohttp serves it (the data path does not): it is low-traffic and benefits from aiohttp's
routing and prometheus-client's aiohttp handler (content negotiation, OpenMetrics).
``handler_cancellation=True`` matches aiohttp's test server, so tests and production agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

if TYPE_CHECKING:
    from sidecar.app import Sidecar


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS),
        status=status,
        content_type="application/json",
    )


class AdminServer:
    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.app = web.Application()
        self.app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", make_aiohttp_handler(sidecar.metrics.registry)),
                web.get("/config", self.config),
                web.post("/reload", self.reload),
                web.get("/upstreams", self.upstreams),
            ]
        )
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None
        sockname = server.sockets[0].getsockname()  # type: ignore[attr-defined]
        self.address = (str(sockname[0]), int(sockname[1]))
        return self.address

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, reason = self.sidecar.readiness()
        return _json({"ready": ready, "reason": reason}, 200 if ready else 503)

    async def config(self, request: web.Request) -> web.Response:
        return _json(self.sidecar.config_report())

    async def reload(self, request: web.Request) -> web.Response:
        result = await self.sidecar.reload(trigger="admin")
        return _json(result, 200 if result.get("ok") else 400)

    async def upstreams(self, request: web.Request) -> web.Response:
        snapshot = self.sidecar.snapshot
        return _json({name: u.snapshot() for name, u in snapshot.upstreams.items()})

"""Admin HTTP API on ``listen.admin``.

aiohttp serves it (the data path does not): it is low-traffic and benefits from aiohttp's
routing and prometheus-client's aiohttp handler (content negotiation, OpenMetrics).
``handler_cancellation=True`` matches aiohttp's test server, so tests and production agree.
"""

from __future__ import annotations

import asyncio
import contextlib
from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from sidecar.admin.stats import LiveStats

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
                web.get("/", self.dashboard),
                web.get("/dashboard", self.dashboard),
                web.get("/stats", self.stats_json),
                web.get("/stats/stream", self.stats_stream),
            ]
        )
        self.stats = LiveStats(sidecar.events)
        self._page = resources.files("sidecar.admin").joinpath("dashboard.html").read_bytes()
        self._closing = asyncio.Event()
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
        self._closing.set()  # ends /stats/stream responses, so cleanup need not wait for them
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

    # live dashboard ----------------------------------------------------------------------------
    def stats_report(self) -> dict[str, Any]:
        """The live dashboard's data: per-upstream cards, routes, config status."""
        sidecar = self.sidecar
        report = sidecar.config_report()
        config = {k: report.get(k) for k in ("hash", "source", "loaded_at", "last_error")}
        return self.stats.report(sidecar.snapshot, _limiters(sidecar), config)

    async def dashboard(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", headers=_PAGE_HEADERS)

    async def stats_json(self, request: web.Request) -> web.Response:
        return _json(self.stats_report())

    async def stats_stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: one ``data:`` report every ``?interval=`` seconds (0.2-10, 1)."""
        try:
            interval = min(10.0, max(0.2, float(request.query.get("interval", "1"))))
        except ValueError:
            raise web.HTTPBadRequest(text="interval is not a number") from None
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            await response.write(b"retry: 2000\n\n")
            while not self._closing.is_set():
                await response.write(b"data: " + orjson.dumps(self.stats_report()) + b"\n\n")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), interval)
        return response


_PAGE_HEADERS = {
    "cache-control": "no-store",
    # Self-contained by contract: nothing may load from anywhere but the admin port itself.
    "content-security-policy": (
        "default-src 'none'; connect-src 'self'; script-src 'unsafe-inline'; "
        "style-src 'unsafe-inline'; img-src data:"
    ),
}
_SSE_HEADERS = {
    "content-type": "text/event-stream",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}


def _limiters(sidecar: Sidecar) -> dict[str, Any]:
    """Limiter snapshots by scope (``upstream:<name>``), when the limits policy is wired."""
    for name in ("policy_state", "policies", "policy"):
        state = getattr(sidecar, name, None)
        snapshot = getattr(state, "snapshot", None)
        if callable(snapshot):
            limiters = snapshot().get("limiters")
            return dict(limiters) if isinstance(limiters, dict) else {}
    return {}

"""The admin listener (aiohttp): health, readiness, metrics, config, upstream state, dashboard."""

from sidecar.admin.server import AdminServer

__all__ = ["AdminServer"]

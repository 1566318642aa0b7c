"""Who is asking: the tenant of a request, for per-tenant limits, budgets and metrics.

:class:`TenantStage` runs first in the route tier and sets ``exchange.tenant``: the value of
the configured header (``tenants.header``, default ``x-tenant-id``); else, with
``tenants.from_api_key``, ``key-`` and a hash of the API key the client sent (``Authorization:
Bearer``, ``x-api-key`` or ``api-key``; the key itself is never kept); else ``default``. An id
longer than :data:`MAX_TENANT_CHARS` or with control characters is replaced by a hash, so a
tenant id is always safe to log and bounded in size.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from sidecar.exchange import Exchange
from sidecar.http.message import Headers, Response
from sidecar.policies.state import DEFAULT_TENANT

if TYPE_CHECKING:
    from sidecar.pipeline import Handler
    from sidecar.runtime import RouteRuntime

MAX_TENANT_CHARS = 128


class TenantStage:
    """Route tier, first: identify the tenant (see the module doc)."""

    def __init__(self, route: RouteRuntime) -> None:
        tenants = route.policies.tenants
        self.header = tenants.header.lower()
        self.from_api_key = tenants.from_api_key

    async def __call__(self, exchange: Exchange, call_next: Handler) -> Response:
        exchange.tenant = identify(exchange.request.headers, self.header, self.from_api_key)
        return await call_next(exchange)


def identify(headers: Headers, header: str, from_api_key: bool) -> str:
    """The tenant id of a request (see the module doc)."""
    value = (headers.get(header) or "").strip()
    if value:
        if len(value) <= MAX_TENANT_CHARS and value.isprintable():
            return value
        return "h-" + _digest(value)
    if from_api_key:
        key = api_key(headers)
        if key:
            return "key-" + _digest(key)
    return DEFAULT_TENANT


def api_key(headers: Headers) -> str | None:
    """The API key a client sent, in any of the usual headers."""
    auth = (headers.get("authorization") or "").strip()
    if auth:
        scheme, _, credentials = auth.partition(" ")
        return credentials.strip() or None if scheme.lower() == "bearer" else auth
    return (headers.get("x-api-key") or headers.get("api-key") or "").strip() or None


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:16]

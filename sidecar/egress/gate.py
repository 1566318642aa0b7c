"""The proxy core's door for HTTP_PROXY and HTTPS_PROXY traffic: policy, routing by host.

An absolute-form request (``POST http://api.openai.com/v1/... HTTP/1.1``) or a request
decrypted from an intercepted tunnel is routed by its host: a route whose ``host`` matches
takes it through the full pipeline to its configured upstreams (so the upstream's URL decides
the scheme: plain HTTP from the app can leave as TLS). A host without a route is forwarded as
is, but only if ``egress.allow`` allows it and its addresses pass the private-address rule; it
gets an ad-hoc upstream with default settings (cached per origin, bounded) whose pool checks
every address again right before connecting to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from sidecar.config.model import Route, Upstream
from sidecar.egress.connect import Tunnels
from sidecar.egress.policy import EgressDenied, EgressPolicy
from sidecar.egress.target import ProxyTarget, parse_absolute
from sidecar.events import EgressRefused, EventBus
from sidecar.exchange import Exchange
from sidecar.http.message import Response
from sidecar.replies import local_reply
from sidecar.runtime import RouteRuntime, Snapshot, UpstreamRuntime
from sidecar.upstream.errors import UpstreamError
from sidecar.upstream.pool import ConnectionPool, make_origin
from sidecar.upstream.resolver import Resolver

if TYPE_CHECKING:
    from sidecar.egress.intercept import CertificateAuthority

log = logging.getLogger("sidecar.egress")

MAX_ADHOC_UPSTREAMS = 64


class EgressGate:
    """Egress policy per snapshot, routing of proxy requests, and ad-hoc upstreams."""

    def __init__(
        self, current: Callable[[], Snapshot], events: EventBus, resolver: Resolver
    ) -> None:
        self.current = current
        self.events = events
        self.resolver = resolver
        self._policy: tuple[Snapshot, EgressPolicy] | None = None
        self._ca: tuple[tuple[str, str], CertificateAuthority] | None = None
        self._adhoc: OrderedDict[tuple[str, str, int], UpstreamRuntime] = OrderedDict()
        self._routes: dict[tuple[str, str, int], RouteRuntime] = {}
        self._routes_of: Snapshot | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.tunnels = Tunnels(self)

    def __repr__(self) -> str:
        return f"<EgressGate {len(self._adhoc)} ad-hoc upstreams>"

    def snapshot(self) -> dict[str, object]:
        return {
            "tunnels": self.tunnels.snapshot(),
            "adhoc_upstreams": [upstream.snapshot() for upstream in self._adhoc.values()],
        }

    # policy ------------------------------------------------------------------------------------
    def policy(self, snapshot: Snapshot | None = None) -> EgressPolicy:
        """The policy of ``snapshot`` (default: the current one), built once per snapshot."""
        snapshot = snapshot if snapshot is not None else self.current()
        cached = self._policy
        if cached is None or cached[0] is not snapshot:
            cached = self._policy = (snapshot, EgressPolicy.from_config(snapshot.config))
        return cached[1]

    def authority(self, snapshot: Snapshot) -> CertificateAuthority:
        """The interception CA of ``snapshot``, loaded once per pair of paths; raises if bad."""
        intercept = snapshot.config.intercept
        paths = (intercept.ca_cert or "", intercept.ca_key or "")
        if self._ca is None or self._ca[0] != paths:
            # Imported here: cryptography's x509 costs ~7 MB of RSS that only interception needs.
            from sidecar.egress.intercept import CertificateAuthority

            self._ca = (paths, CertificateAuthority.from_files(*paths))
        return self._ca[1]

    def refusal(self, host: str, exc: EgressDenied) -> Response:
        """A 403 ``egress_denied`` reply for ``exc``, observed as an event."""
        self.events.emit(EgressRefused(host, exc.reason))
        return local_reply("egress_denied", str(exc))

    async def resolve_checked(self, policy: EgressPolicy, host: str, port: int) -> list[str]:
        """Resolve ``host`` once; raise EgressDenied if any of its addresses is refused."""
        addresses = await self.resolver.resolve(host, port)
        for address in addresses:
            policy.check_address(host, address)
        if not addresses:
            raise OSError(f"{host} has no addresses")
        return addresses

    # routing -----------------------------------------------------------------------------------
    async def route(
        self, exchange: Exchange, target: ProxyTarget | None
    ) -> tuple[RouteRuntime | None, Response | None]:
        """Route a proxy request by host: (route, None), or (None, a reply refusing it).

        ``target`` is the origin of an intercepted tunnel; None means the request target is
        absolute-form. Either way the request is reduced to origin-form (``/path?query``), so
        policies and logs see what they see in base-URL mode, and ``exchange.upstream_path``
        is set.
        """
        request = exchange.request
        if target is None:
            try:
                target, path = parse_absolute(request.target)
            except ValueError as exc:
                return None, local_reply("bad_request", f"bad proxy request target: {exc}")
        else:
            path = request.target
            if not path.startswith("/"):
                return None, local_reply("bad_request", "expected an origin-form request target")
        request.target = exchange.upstream_path = path
        exchange.attrs["egress_target"] = target.url
        snapshot = exchange.snapshot if exchange.snapshot is not None else self.current()
        route = snapshot.match(request, host=target.host)
        if route is not None:
            return route, None
        policy = self.policy(snapshot)
        try:
            policy.check_host(target.host, target.port)
            await self.resolve_checked(policy, target.host, target.port)
        except EgressDenied as exc:
            return None, self.refusal(target.host, exc)
        except OSError as exc:
            return None, local_reply("upstream_connect", f"cannot resolve {target.host}: {exc}")
        return self.adhoc(target, snapshot), None

    def adhoc(self, target: ProxyTarget, snapshot: Snapshot) -> RouteRuntime:
        """The ad-hoc route (one upstream, default settings) forwarding to ``target`` as is.

        The upstream (pool, breaker) lives in a bounded LRU cache across reloads; the route
        around it is rebuilt per snapshot, so tenant limits, budgets and prices of the current
        config apply to it as to any route.
        """
        if self._routes_of is not snapshot:
            self._routes_of, self._routes = snapshot, {}
        key = (target.scheme, target.host, target.port)
        route = self._routes.get(key)
        upstream = self._adhoc.get(key)
        if upstream is not None:
            self._adhoc.move_to_end(key)
            if route is not None:
                return route
        else:
            name = f"egress:{target.authority}"
            config = Upstream.model_validate({"url": target.url})
            pool = ConnectionPool(
                make_origin(config.url, config.tls),
                config.pool,
                config.timeouts,
                self.resolver,
                self._check_address,
            )
            upstream = UpstreamRuntime(name, config, pool, self.events, None, snapshot.policies)
            self._adhoc[key] = upstream
            while len(self._adhoc) > MAX_ADHOC_UPSTREAMS:
                evicted_key, evicted = self._adhoc.popitem(last=False)
                self._routes.pop(evicted_key, None)
                self._close(evicted)
        route_config = Route.model_validate(
            {"name": "egress", "host": target.host, "upstreams": [upstream.name]}
        )
        route = RouteRuntime(-1, route_config, {upstream.name: upstream}, snapshot.policies)
        self._routes[key] = route
        return route

    def tunnel_upstream(self, snapshot: Snapshot, target: ProxyTarget) -> UpstreamRuntime:
        """The upstream whose breaker judges tunnels to ``target``: a configured upstream at
        that very origin, else the ad-hoc one."""
        for upstream in snapshot.upstreams.values():
            origin = upstream.origin
            if origin.host == target.host and origin.port == target.port:
                return upstream
        return self.adhoc(target, snapshot).targets[0].upstream

    def _check_address(self, host: str, address: str) -> None:
        """The ad-hoc pools' address check (the current policy, right before each connect)."""
        try:
            self.policy().check_address(host, address)
        except EgressDenied as exc:
            self.events.emit(EgressRefused(host, exc.reason))
            raise UpstreamError("connect_error", str(exc)) from None

    # lifecycle ---------------------------------------------------------------------------------
    def prune(self) -> None:
        """Close idle ad-hoc connections past their keep-alive (the janitor calls this)."""
        for upstream in self._adhoc.values():
            upstream.pool.prune()

    def _close(self, upstream: UpstreamRuntime) -> None:
        upstream.retired = True
        task = asyncio.get_running_loop().create_task(upstream.pool.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Close every ad-hoc pool."""
        self._routes.clear()
        while self._adhoc:
            _, upstream = self._adhoc.popitem()
            await upstream.pool.aclose()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

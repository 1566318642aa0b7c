"""Egress policy: which hosts the proxy may reach, and which addresses it may connect to.

Synchronous and free of I/O, so it is unit-tested without sockets. Callers resolve a name
once, ask :meth:`EgressPolicy.check_address` about each address, and connect to exactly the
address that was checked: a DNS answer that changes between check and connect (rebinding)
cannot slip a private address through. The sidecar is never an open proxy: with no
``egress.allow`` entry, only hosts that routes or interception name are reachable.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from sidecar.config.model import Config
from sidecar.egress.target import normalize_host

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS = frozenset({80, 443})
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT; some pod networks use it
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_METADATA = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)


class EgressDenied(Exception):
    """A destination the policy refuses; ``reason`` is a metric label (bounded)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # "host_not_allowed" or "private_address"


@dataclass(frozen=True, slots=True)
class HostRule:
    """One allow entry: ``host``, ``*.suffix``, optionally ``:PORT`` or ``:*``."""

    pattern: str
    ports: frozenset[int] | None  # None: any port

    @classmethod
    def parse(cls, entry: str, default_ports: frozenset[int] | None = DEFAULT_PORTS) -> HostRule:
        text = entry.strip().lower()
        ports = default_ports
        host, sep, port = text.rpartition(":")
        if sep and (port == "*" or port.isdigit()) and (not host.count(":") or host[-1] == "]"):
            text, ports = host, (None if port == "*" else frozenset({int(port)}))
        if text.startswith("*."):
            return cls("*." + normalize_host(text[2:]), ports)
        return cls(normalize_host(text), ports)

    def matches(self, host: str, port: int) -> bool:
        if self.ports is not None and port not in self.ports:
            return False
        return host_matches(self.pattern, host)


def host_matches(pattern: str, host: str) -> bool:
    """Exact match, or ``*.suffix`` matching any name below the suffix (not the suffix)."""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def address_refusal(address: IPAddress) -> str | None:
    """Why ``address`` is not a public destination, or None if it is one.

    IPv4 addresses embedded in IPv6 (mapped, 6to4, Teredo, NAT64) are judged as IPv4, so
    ``::ffff:169.254.169.254`` is refused like ``169.254.169.254``.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address.teredo is not None:
            embedded = address.teredo[1]
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            why = address_refusal(embedded)
            return f"{why} (embedded {embedded})" if why else None
    if address in _METADATA:
        return "link-local (cloud metadata)"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv6Address) and address in _UNIQUE_LOCAL:
        return "unique-local"
    if address.is_private or address in _SHARED:
        return "private"
    if address.is_reserved or not address.is_global:
        return "reserved"
    return None


class EgressPolicy:
    """The allow list, the private-address rule and the interception list of one config."""

    def __init__(
        self,
        allow: Iterable[str],
        *,
        deny_private: bool = True,
        allow_addresses: Iterable[str] = (),
        implicit_hosts: Iterable[str] = (),
        intercept_hosts: Iterable[str] = (),
    ) -> None:
        rules = [HostRule.parse(entry) for entry in allow]
        rules += [HostRule.parse(host) for host in implicit_hosts]
        self.rules = tuple(rules)
        self.deny_private = deny_private
        self.allowed_networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(item, strict=False) for item in allow_addresses
        )
        self.intercept = tuple(HostRule.parse(host, None).pattern for host in intercept_hosts)

    @classmethod
    def from_config(cls, config: Config) -> EgressPolicy:
        """Route hosts and intercepted hosts are allowed implicitly (on ports 80 and 443)."""
        routes = [route.host for route in config.routes if route.host]
        return cls(
            config.egress.allow,
            deny_private=config.egress.deny_private,
            allow_addresses=config.egress.allow_addresses,
            implicit_hosts=[*routes, *config.intercept.hosts],
            intercept_hosts=config.intercept.hosts,
        )

    def __repr__(self) -> str:
        return (
            f"<EgressPolicy {len(self.rules)} host rules, deny_private={self.deny_private}, "
            f"{len(self.allowed_networks)} allowed networks, {len(self.intercept)} intercepted>"
        )

    def allowed_by(self, host: str, port: int) -> HostRule | None:
        """The first rule allowing ``host:port``, or None."""
        for rule in self.rules:
            if rule.matches(host, port):
                return rule
        return None

    def check_host(self, host: str, port: int) -> None:
        """Raise :class:`EgressDenied` unless ``host:port`` is allowed."""
        if self.allowed_by(host, port) is None:
            raise EgressDenied(
                "host_not_allowed", f"egress to {host}:{port} is not allowed (egress.allow)"
            )

    def check_address(self, host: str, address: str) -> None:
        """Raise :class:`EgressDenied` if connecting to ``address`` (for ``host``) is refused."""
        if not self.deny_private:
            return
        ip = ipaddress.ip_address(address.partition("%")[0])
        why = address_refusal(ip)
        if why is None or self._explicitly_allowed(ip):
            return
        shown = host if host == address else f"{host} ({address})"
        raise EgressDenied(
            "private_address",
            f"egress to {shown} is refused: {why} address (egress.deny_private; "
            "list it in egress.allow_addresses to allow it)",
        )

    def _explicitly_allowed(self, ip: IPAddress) -> bool:
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        networks = self.allowed_networks
        return any(c.version == n.version and c in n for c in candidates for n in networks)

    def intercepts(self, host: str) -> bool:
        """Whether CONNECT tunnels to ``host`` are decrypted (intercept.hosts)."""
        return any(host_matches(pattern, host) for pattern in self.intercept)

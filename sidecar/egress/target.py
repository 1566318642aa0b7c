"""Where a proxy request goes: parsing CONNECT authorities and absolute-form targets.

Host names are normalised once (lower case, one trailing dot dropped, IP literals in canonical
form) so that policy matching cannot be sidestepped by spelling (``API.OpenAI.com.``,
``[0:0::1]``); anything that is not a plain DNS name or an IP literal is refused.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
DEFAULT_PORT = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class ProxyTarget:
    """An origin a client asked the proxy for: scheme, normalised host, port."""

    scheme: str  # "http" or "https"
    host: str
    port: int

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}"


def normalize_host(host: str) -> str:
    """The canonical form of a host name or IP literal; ValueError if it is neither."""
    text = host.strip().lower()
    if text.startswith("[") and text.endswith("]"):
        address = ipaddress.ip_address(text[1:-1])
        if address.version != 6:
            raise ValueError(f"not an IPv6 literal: {host!r}")
        return str(address)
    if text.endswith("."):
        text = text[:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not text or len(text) > 253 or not all(_LABEL.match(label) for label in text.split(".")):
        raise ValueError(f"not a valid host name: {host!r}")
    return text


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"not a valid port: {text!r}")
    return int(text)


def parse_authority(authority: str, scheme: str = "https") -> ProxyTarget:
    """A CONNECT request target, ``host:port`` or ``[v6]:port`` (the port is required)."""
    host, sep, port = authority.rpartition(":")
    if not sep or not host:
        raise ValueError(f"CONNECT needs host:port, got {authority!r}")
    if ":" in host and not host.startswith("["):
        raise ValueError(f"IPv6 addresses must be bracketed: {authority!r}")
    return ProxyTarget(scheme, normalize_host(host), _port(port))


def parse_absolute(target: str) -> tuple[ProxyTarget, str]:
    """An absolute-form target (``http://host[:port]/path?q``): the origin and the path+query."""
    parts = urlsplit(target)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORT or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {target[:200]!r}")
    netloc = parts.netloc.rpartition("@")[2]  # userinfo is never forwarded
    if netloc.startswith("["):
        host, _, rest = netloc[1:].partition("]")
        host = f"[{host}]"
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad authority: {netloc!r}")
    else:
        host, _, port_text = netloc.partition(":")
    port = _port(port_text) if port_text else DEFAULT_PORT[scheme]
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return ProxyTarget(scheme, normalize_host(host), port), path


def is_absolute_form(target: str) -> bool:
    """Whether a request target is absolute-form (sent by clients through HTTP_PROXY)."""
    if target.startswith("/"):  # origin-form, nearly every request: no slicing, no lower()
        return False
    return target[:7].lower() == "http://" or target[:8].lower() == "https://"

"""DNS resolution with a short positive cache, so each request does not pay a lookup."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable


class Resolver:
    """Resolves host names to addresses; results are cached for ``ttl_s``."""

    def __init__(self, ttl_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[tuple[str, int], tuple[float, list[str]]] = {}

    async def resolve(self, host: str, port: int) -> list[str]:
        """Addresses for ``host`` (an IP literal is returned as is)."""
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            pass
        now = self._clock()
        cached = self._cache.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        self._cache[(host, port)] = (now + self._ttl_s, addresses)
        return addresses

"""The request and response types every policy sees, independent of the transport.

Header names are stored lower-case (HTTP field names are case-insensitive, and HTTP/2 sends
them lower-case anyway), values as latin-1 ``str``; one list of pairs keeps order and repeats.
A response body is an async iterator of ``bytes`` so that streams pass through unbuffered;
``aclose()`` must be called on a response that will not be sent, so its upstream connection is
freed instead of leaked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

# RFC 9110 7.6.1 hop-by-hop fields; the proxy re-frames every message itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


class Headers:
    """An ordered multi-map of lower-case names to values."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = list(items)

    def get(self, name: str, default: str | None = None) -> str | None:
        for key, value in self._items:
            if key == name:
                return value
        return default

    # Plain loops rather than any(<genexpr>) below: these run several times per request, and a
    # generator costs more than the handful of fields it scans.
    def __contains__(self, name: object) -> bool:
        for key, _ in self._items:
            if key == name:
                return True
        return False

    def has_prefix(self, prefix: str | tuple[str, ...]) -> bool:
        """Whether any field name starts with ``prefix`` (or one of several)."""
        for key, _ in self._items:
            if key.startswith(prefix):
                return True
        return False

    def set(self, name: str, value: str) -> None:
        """Replace every value of ``name`` with one value (appended if absent)."""
        self.remove(name)
        self._items.append((name, value))

    def add(self, name: str, value: str) -> None:
        self._items.append((name, value))

    def extend(self, fields: Iterable[tuple[str, str]]) -> None:
        """Append fields (lower-case names) as they are."""
        self._items.extend(fields)

    def remove(self, name: str) -> None:
        if name in self:
            self._items = [item for item in self._items if item[0] != name]

    def items(self) -> list[tuple[str, str]]:
        return self._items

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def without_hop_by_hop(self) -> Headers:
        """A copy without hop-by-hop fields, including those the Connection field names."""
        drop = HOP_BY_HOP
        listed = self.get("connection")
        if listed:
            drop = drop | {token.strip().lower() for token in listed.split(",")}
        return Headers([item for item in self._items if item[0] not in drop])


@dataclass(slots=True)
class Request:
    """A client request with its body fully buffered (so retries can resend it)."""

    method: str
    target: str
    headers: Headers
    body: bytes = b""
    http_version: str = "1.1"
    keep_alive: bool = True

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


async def _once(data: bytes) -> AsyncIterator[bytes]:
    if data:
        yield data


@dataclass(slots=True)
class Response:
    """A response head plus a streamed body."""

    status: int
    headers: Headers
    body: AsyncIterator[bytes] = field(default_factory=lambda: _once(b""))
    reason: str = ""

    @classmethod
    def from_bytes(cls, status: int, headers: Headers, data: bytes) -> Response:
        headers.set("content-length", str(len(data)))
        return cls(status, headers, _once(data))

    def watch(
        self,
        *,
        tap: Callable[[bytes], None] | None = None,
        done: Callable[[bool], None] | None = None,
    ) -> None:
        """Observe the body as it passes, without wrapping it in another async layer.

        ``tap(chunk)`` sees every chunk; ``done(completed)`` runs once, when the body was read
        to its end (True), or failed or was closed before it (False). The upstream's body
        stream calls them itself; any other body gets one thin wrapper that does.
        """
        watchers: BodyWatchers | None = getattr(self.body, "watchers", None)
        if watchers is None:
            wrapped = _WatchedBody(self.body)
            self.body, watchers = wrapped, wrapped.watchers
        watchers.add(tap, done)

    async def aclose(self) -> None:
        """Abandon the body (frees or closes the upstream connection behind it)."""
        close = getattr(self.body, "aclose", None)
        if close is not None:
            await close()

    async def read(self, limit: int = 1 << 20) -> bytes:
        """Buffer the whole body, up to ``limit`` bytes (for policies that opt in)."""
        parts: list[bytes] = []
        size = 0
        try:
            async for chunk in self.body:
                size += len(chunk)
                if size > limit:
                    raise ValueError(f"response body larger than {limit} bytes")
                parts.append(chunk)
        finally:
            await self.aclose()
        data = b"".join(parts)
        self.body = _once(data)
        return data


class BodyWatchers:
    """The observers of one response body (see :meth:`Response.watch`), called by the body."""

    __slots__ = ("taps", "_done", "ended")

    def __init__(self) -> None:
        self.taps: list[Callable[[bytes], None]] = []
        self._done: list[Callable[[bool], None]] = []
        self.ended: bool | None = None  # None while the body runs, then whether it completed

    def add(self, tap: Callable[[bytes], None] | None, done: Callable[[bool], None] | None) -> None:
        if tap is not None:
            self.taps.append(tap)
        if done is not None:
            if self.ended is None:
                self._done.append(done)
            else:
                done(self.ended)  # the body ended before anyone watched (an empty body)

    def end(self, completed: bool) -> None:
        if self.ended is not None:
            return
        self.ended = completed
        callbacks, self._done = self._done, []
        for callback in callbacks:
            callback(completed)


class _WatchedBody:
    """Any body iterator, with :class:`BodyWatchers` called as it passes.

    A class, not an async generator, so that ``aclose()`` reaches the inner body (and frees its
    connection) even when iteration never started.
    """

    __slots__ = ("_inner", "watchers")

    def __init__(self, inner: AsyncIterator[bytes]) -> None:
        self._inner = inner
        self.watchers = BodyWatchers()

    def __aiter__(self) -> _WatchedBody:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._inner.__anext__()
        except StopAsyncIteration:
            self.watchers.end(True)
            raise
        except BaseException:
            self.watchers.end(False)
            raise
        for tap in self.watchers.taps:
            tap(chunk)
        return chunk

    async def aclose(self) -> None:
        self.watchers.end(False)
        close = getattr(self._inner, "aclose", None)
        if close is not None:
            await close()

"""A deadline for a wait that recurs many times a second, kept with one lazy timer.

A keep-alive client connection waits for its next request, an upstream connection waits for
each body chunk: arming a ``call_later`` timer before every wait and cancelling it after cost
a timer handle per request and per chunk. :class:`LazyDeadline` keeps at most one timer per
connection. :meth:`start` records the wait's deadline and arms the timer only when none is
armed or the armed one would fire too late; a timer that fires early re-arms for the time
left, and one that fires while nothing waits is dropped (the next :meth:`start` arms again).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class LazyDeadline:
    """Calls ``on_expiry`` when a wait started with :meth:`start` outlives its deadline."""

    __slots__ = ("_loop", "_on_expiry", "_timer", "_timer_at", "_deadline", "_waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expiry: Callable[[], None]) -> None:
        self._loop = loop
        self._on_expiry = on_expiry
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0  # of the wait in progress, on the time.monotonic() clock
        self._waiting = False

    def start(self, deadline: float) -> None:
        """A wait begins that must end by ``deadline`` (``time.monotonic()`` seconds)."""
        self._deadline = deadline
        self._waiting = True
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._arm(deadline)

    def stop(self) -> None:
        """The wait ended in time."""
        self._waiting = False

    def cancel(self) -> None:
        """No more waits (the connection closes): drop the timer."""
        self._waiting = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, deadline: float) -> None:
        self._timer = self._loop.call_later(deadline - time.monotonic(), self._fire)
        self._timer_at = deadline

    def _fire(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        if time.monotonic() >= self._deadline:
            self._waiting = False
            self._on_expiry()
        else:
            self._arm(self._deadline)

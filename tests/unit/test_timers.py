"""LazyDeadline: one timer for many short waits, on a real event loop."""

from __future__ import annotations

import asyncio
import time

from sidecar.timers import LazyDeadline


def _recorder() -> tuple[list[float], asyncio.Event, LazyDeadline]:
    expired: list[float] = []
    fired = asyncio.Event()

    def on_expiry() -> None:
        expired.append(time.monotonic())
        fired.set()

    return expired, fired, LazyDeadline(asyncio.get_running_loop(), on_expiry)


async def test_a_wait_past_its_deadline_expires_once() -> None:
    expired, fired, deadline = _recorder()
    started = time.monotonic()
    deadline.start(started + 0.05)
    await asyncio.wait_for(fired.wait(), 2)
    assert len(expired) == 1
    assert 0.04 < expired[0] - started < 1.0
    await asyncio.sleep(0.1)
    assert len(expired) == 1


async def test_many_short_waits_never_expire_and_share_the_timer() -> None:
    expired, _, deadline = _recorder()
    started = time.monotonic()
    while time.monotonic() - started < 0.3:  # 6x the deadline in all, each wait 10 ms
        deadline.start(time.monotonic() + 0.05)
        await asyncio.sleep(0.01)
        deadline.stop()
    await asyncio.sleep(0.1)  # a timer still armed fires while nothing waits: dropped
    assert expired == []
    deadline.cancel()


async def test_an_earlier_deadline_rearms_the_timer() -> None:
    expired, fired, deadline = _recorder()
    deadline.start(time.monotonic() + 5)  # armed for 5 s
    deadline.stop()
    started = time.monotonic()
    deadline.start(started + 0.05)  # sooner: must not wait for the 5 s timer
    await asyncio.wait_for(fired.wait(), 1)
    assert expired[0] - started < 1.0

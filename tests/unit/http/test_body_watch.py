"""Response.watch: observers of a body that is not the upstream's own stream (a local reply)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from sidecar.http.message import Headers, Response


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_taps_see_every_chunk_and_done_reports_a_completed_body() -> None:
    response = Response(200, Headers(), _chunks(b"ab", b"cd"))
    seen: list[bytes] = []
    ended: list[bool] = []
    response.watch(tap=seen.append, done=ended.append)
    response.watch(done=ended.append)  # a second watcher wraps nothing more
    body = [chunk async for chunk in response.body]
    assert body == [b"ab", b"cd"]
    assert seen == [b"ab", b"cd"]
    assert ended == [True, True]
    await response.aclose()
    assert ended == [True, True]  # once only


async def test_a_body_closed_before_its_end_is_reported_incomplete() -> None:
    response = Response(200, Headers(), _chunks(b"ab", b"cd"))
    ended: list[bool] = []
    response.watch(done=ended.append)
    assert await response.body.__anext__() == b"ab"
    await response.aclose()
    assert ended == [False]
    late: list[bool] = []
    response.watch(done=late.append)  # watching an ended body answers at once
    assert late == [False]


async def test_a_failing_body_is_reported_incomplete() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"ab"
        raise ConnectionResetError("cut")

    response = Response(200, Headers(), broken())
    ended: list[bool] = []
    response.watch(done=ended.append)
    got = []
    try:
        async for chunk in response.body:
            got.append(chunk)
    except ConnectionResetError:
        pass
    assert got == [b"ab"]
    assert ended == [False]

"""The byte pipe on real loopback sockets: copying, counting, reset and idle handling."""

from __future__ import annotations

import asyncio
import socket
import struct

from sidecar.egress.tunnel import Pipe


async def _pair() -> tuple[tuple, tuple, asyncio.Server]:
    """(client side, server side) stream pairs of one loopback connection."""
    accepted: asyncio.Future[tuple] = asyncio.get_running_loop().create_future()

    async def on_accept(reader, writer):
        accepted.set_result((reader, writer))

    server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    near = await asyncio.open_connection("127.0.0.1", port)
    far = await accepted
    return near, far, server


async def test_pipe_copies_both_ways_and_counts():
    app, client_side, s1 = await _pair()  # app <-> pipe's client side
    upstream_side, provider, s2 = await _pair()  # pipe's upstream side <-> provider
    pipe = Pipe(client_side, upstream_side, idle_s=5)
    task = asyncio.create_task(pipe.run(b"early "))
    app[1].write(b"hello")
    app[1].write_eof()
    assert await provider[0].read() == b"early hello"
    provider[1].write(b"world!")
    provider[1].close()
    assert await app[0].read() == b"world!"
    assert await asyncio.wait_for(task, 5) == "closed"
    assert (pipe.bytes_in, pipe.bytes_out) == (11, 6)
    app[1].close()
    s1.close()
    s2.close()


async def test_pipe_closes_an_idle_tunnel():
    app, client_side, s1 = await _pair()
    upstream_side, provider, s2 = await _pair()
    pipe = Pipe(client_side, upstream_side, idle_s=0.2)
    reason = await asyncio.wait_for(pipe.run(), 5)
    assert reason == "idle"
    assert await asyncio.wait_for(app[0].read(), 5) == b""
    assert await asyncio.wait_for(provider[0].read(), 5) == b""
    app[1].close()
    provider[1].close()
    s1.close()
    s2.close()


async def test_pipe_ends_when_one_side_resets():
    app, client_side, s1 = await _pair()
    upstream_side, provider, s2 = await _pair()
    pipe = Pipe(client_side, upstream_side, idle_s=5)
    task = asyncio.create_task(pipe.run())
    sock = provider[1].get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    provider[1].transport.abort()  # closing with zero linger sends RST towards the pipe
    await asyncio.wait_for(task, 5)
    assert await asyncio.wait_for(app[0].read(), 5) == b""
    assert pipe.reason == "reset"
    app[1].close()
    s1.close()
    s2.close()
